"""A first run without friction: what a new user meets before any kernel runs.

- `make` installs the CPU build of torch from PyTorch's CPU wheel index when it answers, else from the
  default index (scripts/install_torch_cpu.sh; both branches, with a stub pip and a local index);
- .ci/run fails when pytest collected no test, although make turns pytest's exit 5 into 2;
- every command the README shows runs as written on a fresh clone after `make test`.
"""
from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL_TORCH = ROOT / "scripts" / "install_torch_cpu.sh"
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
needs_make = pytest.mark.skipif(shutil.which("make") is None or shutil.which("bash") is None,
                                reason="needs make and bash")


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _makefile_var(name: str) -> str:
    m = re.search(rf"^{name}\s*\??=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(), re.M)
    assert m, f"Makefile has no {name}"
    return m.group(1)


# -- torch: the CPU build ------------------------------------------------------------------------------
@pytest.fixture
def stub_pip(tmp_path):
    """A `pip` that records its arguments instead of installing anything."""
    log = tmp_path / "pip_args"
    pip = _executable(tmp_path / "bin" / "pip", f'#!/bin/sh\necho "$@" > "{log}"\n')
    return pip, log


@pytest.fixture
def local_index(tmp_path):
    """A PEP 503 index on localhost whose torch page lists 2.13.0+cpu (PyTorch's CPU index, in small)."""
    root = tmp_path / "index"
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "index.html").write_text(
        '<a href="torch-2.13.0%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl">'
        "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl</a>\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]   # closed once the socket is: connections are refused at once


def _install_torch(index: str, pip: Path, timeout: str = "5") -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_CPU_INDEX": index, "TORCH_INDEX_TIMEOUT": timeout, "PIP": str(pip)}
    return subprocess.run(["bash", str(INSTALL_TORCH), sys.executable, "2.13.0"], env=env,
                          capture_output=True, text=True, timeout=60)


@needs_bash
def test_torch_from_the_cpu_index_when_it_answers(stub_pip, local_index):
    pip, log = stub_pip
    p = _install_torch(local_index, pip)
    assert p.returncode == 0, p.stderr
    assert log.read_text().split() == ["install", "-q", "--index-url", local_index, "torch==2.13.0"]
    assert "the CPU build" in p.stdout


@needs_bash
@pytest.mark.parametrize("answer", ["refused", "lacks the version"])
def test_torch_from_the_default_index_otherwise(stub_pip, local_index, answer):
    pip, log = stub_pip
    index = f"http://127.0.0.1:{_closed_port()}/" if answer == "refused" else local_index
    env = {**os.environ, "TORCH_CPU_INDEX": index, "TORCH_INDEX_TIMEOUT": "5", "PIP": str(pip)}
    t0 = time.monotonic()
    version = "2.13.0" if answer == "refused" else "9.9.9"
    p = subprocess.run(["bash", str(INSTALL_TORCH), sys.executable, version], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert log.read_text().split() == ["install", "-q", f"torch=={version}"]   # the default index
    assert "falling back to the default index" in p.stdout
    assert time.monotonic() - t0 < 30


@needs_make
def test_make_installs_torch_through_the_script_and_readme_says_which():
    """On a machine without a GPU, the venv recipe installs torch with the script, before the project;
    the README's top names the same torch version."""
    venv = "/nonexistent/pod-venv"
    p = subprocess.run(["make", "-n", f"VENV={venv}", "HAS_GPU=", "venv"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    version = _makefile_var("TORCH_VERSION")
    install = [i for i, line in enumerate(lines) if "scripts/install_torch_cpu.sh" in line]
    assert install and lines[install[0]].split()[1:] == [f"{venv}/bin/python", version], p.stdout
    project = [i for i, line in enumerate(lines) if "install -q -e" in line]
    assert project and install[0] < project[0]
    assert not any(re.search(r"pip install\b.*\btorch==", line) for line in lines), p.stdout
    assert f"torch=={version}" in (ROOT / "README.md").read_text()


# -- the GPU set-up: the flashinfer extra, said up front, optional ---------------------------------------
@pytest.fixture
def gpu_setup(tmp_path):
    """The Makefile's venv recipe with the GPU branch forced (HAS_GPU=1) and a stub `python3`: its
    `-m venv` makes a venv whose python logs each pip call and fails the flashinfer one when
    $STUB_OFFLINE is set (no network)."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    log = tmp_path / "calls"
    venv_python = (f'#!/bin/sh\necho "$@" >> "{log}"\n'
                   'case "$*" in *flashinfer*) [ -n "$STUB_OFFLINE" ] && exit 1;; esac\nexit 0\n')
    stub = _executable(tmp_path / "bin" / "python3", (
        '#!/bin/sh\n'                                       # python3 -m venv [--system-site-packages] DIR
        f'echo "python3 $*" >> "{log}"\n'
        'for a; do dir=$a; done\n'
        'mkdir -p "$dir/bin"\n'
        f"cat > \"$dir/bin/python\" <<'EOF'\n{venv_python}EOF\n"
        'chmod +x "$dir/bin/python"\n'))

    def make(offline: bool) -> tuple[subprocess.CompletedProcess, list[str]]:
        env = {k: v for k, v in os.environ.items() if k != "MAKEFLAGS"}
        env.update(STUB_OFFLINE="1" if offline else "")
        p = subprocess.run(["make", "HAS_GPU=1", f"PYTHON={stub}", "VENV=v", "venv"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
        calls = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        shutil.rmtree(tmp_path / "v", ignore_errors=True)
        return p, calls
    return make


@needs_make
@pytest.mark.parametrize("offline", [False, True])
def test_make_on_a_gpu_machine_installs_the_flashinfer_extra(gpu_setup, offline):
    """`make test`/`make reproduce` on a GPU machine installed `.[dev]` only: every FlashInfer baseline a
    skipped row. The GPU branch keeps the system's torch, installs the flashinfer extra, says first that
    FlashInfer JIT-builds for minutes on first use, and without a network says which extra to install
    later and finishes the set-up."""
    p, calls = gpu_setup(offline)
    assert p.returncode == 0, p.stdout + p.stderr
    assert calls[0].startswith("python3 -m venv --system-site-packages")
    installs = [c for c in calls[1:] if c.startswith("-m pip install")]
    assert any("'.[dev,flashinfer]'" in c or ".[dev,flashinfer]" in c for c in installs), calls
    assert not any("torch" in c for c in installs)          # the system's CUDA torch stays
    out = p.stdout
    jit = out.index("FlashInfer JIT-compiles its kernels")
    assert jit < out.index("-m pip install") and "minutes" in out[jit:jit + 200]
    said = [line for line in out.splitlines() if line.startswith("FlashInfer not installed (no network?)")]
    assert bool(said) == offline and (not offline or "v/bin/pip install -e '.[flashinfer]'" in said[0])


# -- .ci/run: "no tests collected" is a failure -----------------------------------------------------
@pytest.fixture
def ci_copy(tmp_path):
    """.ci/run and the Makefile in a scratch checkout whose venv is a stub: its python exits with
    $STUB_PYTEST_RC, as pytest would."""
    (tmp_path / ".ci").mkdir()
    for name in ("Makefile", "pyproject.toml", ".ci/run"):
        shutil.copy2(ROOT / name, tmp_path / name)
    _executable(tmp_path / ".venv" / "bin" / "python", '#!/bin/sh\nexit "${STUB_PYTEST_RC:-0}"\n')
    stamp = tmp_path / ".venv" / ".installed"
    stamp.touch()
    later = (tmp_path / "pyproject.toml").stat().st_mtime + 10
    os.utime(stamp, (later, later))   # the venv is up to date: make does not rebuild it
    return tmp_path


@needs_make
@pytest.mark.parametrize("pytest_rc, ci_rc, says_no_tests", [(5, 1, True), (0, 0, False),
                                                             (1, 2, False)])
def test_ci_run_fails_when_no_test_was_collected(ci_copy, pytest_rc, ci_rc, says_no_tests):
    env = {**os.environ, "STUB_PYTEST_RC": str(pytest_rc)}
    env.pop("MAKEFLAGS", None)
    p = subprocess.run(["bash", str(ci_copy / ".ci" / "run")], cwd=ci_copy, env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == ci_rc, p.stdout + p.stderr
    assert ("CI: pytest collected no tests" in p.stderr) == says_no_tests
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@needs_make
def test_make_test_records_pytests_own_exit_code(tmp_path):
    """The real `make test` with the real pytest, selecting no test: make exits 2, the file says 5."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("runs make against the venv this test runs in")
    rc_file = tmp_path / "rc"
    env = {k: v for k, v in os.environ.items() if k != "MAKEFLAGS"}
    # -o: never rebuild the venv here, whatever the stamp's age.
    p = subprocess.run(["make", "-o", f"{sys.prefix}/.installed", f"VENV={sys.prefix}", "test",
                        "PYTEST_ARGS=tests/test_first_run.py -k no_test_is_called_this -p no:cacheprovider",
                        f"PYTEST_RC={rc_file}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    assert rc_file.read_text().strip() == "5"


# -- the README's commands run as written after `make test` -----------------------------------------
TOOLS = {"python", "python3", "pip", "pip3", "pytest", "wandb", "jupyter"}   # what a venv's bin/ provides


def readme_commands() -> list[str]:
    """Every command the README shows: the lines of its code blocks and its inline code spans that run
    a program (python, pip, ... by name or by path, or make) with at least one argument."""
    text = (ROOT / "README.md").read_text()
    lines = [re.split(r"\s#\s", line, maxsplit=1)[0]
             for block in re.findall(r"```[\w-]*\n(.*?)```", text, re.S) for line in block.splitlines()]
    spans = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    commands = []
    for candidate in lines + spans:
        words = " ".join(candidate.split())
        program = _program(words)
        if program and len(words.split()) > 1 and (program == "make" or
                                                   program.split("/")[-1] in TOOLS):
            commands.append(words)
    return commands


def _program(command: str) -> str | None:
    """The program a command runs (leading VAR=value assignments skipped)."""
    for word in command.split():
        if not re.match(r"[A-Z_][A-Z0-9_]*=", word):
            return word
    return None


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def test_readme_commands_use_the_venv_that_make_test_builds():
    """No README command needs an activated venv: each names the interpreter (or tool) of the venv that
    `make test` creates, and `make X` names a target the Makefile has."""
    import shlex
    venv_bin = f"{_makefile_var('VENV')}/bin/"
    commands = readme_commands()
    assert len([c for c in commands if "python" in c]) >= 10, commands   # the parser found them
    for command in commands:
        program = _program(command)
        if program == "make":
            target = shlex.split(command)[1]
            assert target in _makefile_targets() or "=" in target, f"README: `{command}`: no such target"
            continue
        assert program.startswith(venv_bin), (
            f"README: `{command}` runs `{program}` from PATH; after `make test` only {venv_bin} has the "
            f"project's packages (write {venv_bin}{program.split('/')[-1]})")
        assert program.split("/")[-1] in TOOLS


def test_readme_python_commands_resolve_in_the_venv():
    """What each README command runs exists here, under this venv's interpreter, whatever the modules
    are called: `-m X` finds a runnable module (a package needs __main__), `-c CODE` compiles and its
    imports resolve, a script path exists, a venv tool is installed."""
    import ast
    import shlex
    modules, scripts, tools = set(), set(), set()
    for command in readme_commands():
        words = shlex.split(command)
        words = words[words.index(_program(command)):]
        name = words[0].split("/")[-1]
        if name == "make":
            continue
        tools.add(name)
        if not name.startswith("python"):
            continue
        if words[1] == "-m":
            modules.add((words[2], True))
        elif words[1] == "-c":
            tree = ast.parse(words[2])
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules.update((a.name, False) for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module:
                    modules.add((node.module, False))
        else:
            scripts.add(words[1])
    assert modules, "no python command found in the README"
    for script in scripts:
        assert (ROOT / script).is_file(), f"README runs {script}, which does not exist"
    if sys.prefix != sys.base_prefix:   # in the venv `make test` built: its bin/ is what the README names
        for tool in tools:
            assert (Path(sys.prefix) / "bin" / tool).exists(), f"README runs {tool}: not in the venv"
    probe = ("import importlib.util, json, sys\n"
             "bad = []\n"
             "for name, runnable in json.loads(sys.argv[1]):\n"
             "    try:\n"
             "        spec = importlib.util.find_spec(name)\n"
             "        if spec and runnable and spec.submodule_search_locations is not None:\n"
             "            spec = importlib.util.find_spec(name + '.__main__')\n"
             "    except Exception as e:\n"
             "        spec = None\n"
             "    if spec is None:\n"
             "        bad.append(name)\n"
             "print(json.dumps(bad))\n")
    import json
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", probe, json.dumps(sorted(modules))], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [], \
        f"README names modules that do not resolve: {p.stdout}"


# -- what a first run leaves behind ------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_cpu_smoke_rows_are_git_ignored_where_they_land():
    """The README's CPU smokes write rows that mean nothing off a CPU: the attention smoke's
    results/smoke/cpu.csv and the serving smoke's <out_dir>/<sweep_name>/cpu.csv (results/serving/e2e/),
    which a first run left untracked. Both are ignored, and so is any CPU row under results/."""
    from hydra import compose, initialize_config_dir
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        serving = compose("serving", overrides=["device=cpu"])
        attention = compose("attention")
    paths = [f"{serving.out_dir}/{serving.sweep_name}/cpu.csv",
             f"{attention.results_dir}/{attention.sweep.name}/cpu.csv", "results/h200/policy/cpu.policy_5050.csv"]
    p = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert p.stdout.split() == paths, p.stdout + p.stderr
    assert subprocess.run(["git", "check-ignore", "--no-index", "results/h200/policy/h200.csv"], cwd=ROOT,
                          capture_output=True).returncode == 1      # a GPU's rows are committed


# -- every README command, dry-run: its arguments parse and its config composes -----------------------
HYDRA_APPS = {"experiments.attention": "attention", "experiments.serving": "serving"}
# pod/ is the product and keeps its __main__ blocks to itself (compile reports): resolved only (above).
RESOLVED_ONLY = {"pod.kernels.prefill", "pod.kernels.decode"}


def _alternatives(words: list[str]) -> list[list[str]]:
    """`{a,b,c}` in a command is the README's "one of": one command per alternative."""
    for i, w in enumerate(words):
        m = re.fullmatch(r"\{([\w,]+)\}", w)
        if m:
            return [alt for choice in m.group(1).split(",")
                    for alt in _alternatives([*words[:i], choice, *words[i + 1:]])]
    return [words]


def _first_of_each_sweep(overrides: list[str]) -> list[str]:
    """A multirun's overrides as one run of it: `key=a,b` -> `key=a`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        out.append(f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override()
                   else o.input_line)
    return out


def _without_missing_launchers(overrides: list[str]) -> list[str]:
    """A command's overrides less a launcher whose plugin's extra is not installed here (CI installs
    `.[dev]`), and its settings: the rest of the command is still checked; tests/test_launchers.py checks
    the launcher where it is installed."""
    from experiments.attention import missing_launcher
    if missing_launcher(overrides) is None:
        return overrides
    return [o for o in overrides if not o.startswith(("hydra/launcher=", "hydra.launcher."))]


def _dry_run_hydra(app: str, args: list[str]) -> None:
    """Compose the app's config with the command's overrides and check what its entry point checks
    before the first point (attention) or before anything is built (serving), as on a GPU machine."""
    from hydra import compose, initialize_config_dir
    overrides = _first_of_each_sweep([a for a in args if a not in ("-m", "--multirun")])
    overrides = _without_missing_launchers(overrides)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(HYDRA_APPS[app], overrides=overrides, return_hydra_config=True)
    if app == "experiments.attention":
        from experiments.harness import sweep
        from experiments.harness.points import expand_points
        models = dict(cfg.models)
        models[cfg.model.name] = cfg.model
        assert expand_points(cfg.sweep, models)
        sweep._run_settings({**{k: v for k, v in cfg.items() if k != "hydra"}, "device": "cpu"})
        sweep.backends_by_name(list(cfg.backend.names))
    else:
        from unittest import mock

        from baselines.registry import get_backend
        from experiments.serving import experiment
        with mock.patch("torch.cuda.is_available", lambda: True):    # "GPU:" commands: checked as on a GPU
            experiment.check_config(cfg)
        experiment.model_config(cfg)
        experiment.scheduler_config(cfg)
        experiment.workload_config(cfg, 1000)
        for name in experiment.backend_names(cfg):
            get_backend(name)


def test_every_readme_command_parses_as_written():
    """Each README command's arguments go through the program's own parser: `-m` Hydra apps compose
    their config (a multirun's first job) and pass the checks their entry point makes before running;
    other `-m` modules' parse_args take the arguments; `make` commands dry-run (`make -n`); a pip extra
    exists in pyproject.toml. (`serving.paper --only fig12_yi_6b num_requests=128` was refused:
    invalid choice.)"""
    import importlib
    import shlex
    import tomllib
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    checked, failed = set(), []
    for command in readme_commands():
        words = shlex.split(command)
        words = words[words.index(_program(command)):]
        name = words[0].split("/")[-1]
        for alt in _alternatives(words):
            try:
                if name == "make":
                    env = {k: v for k, v in os.environ.items() if k != "MAKEFLAGS"}
                    p = subprocess.run(["make", "-n", "-o", ".venv/.installed", *alt[1:]], cwd=ROOT, env=env,
                                       capture_output=True, text=True, timeout=60)
                    assert p.returncode == 0, p.stderr
                elif name == "pip":
                    for extra in re.findall(r"\.\[([\w,-]+)\]", " ".join(alt)):
                        assert set(extra.split(",")) <= set(extras), f"no extra {extra}"
                elif name == "jupyter":
                    assert alt[1] in ("execute", "lab") and all((ROOT / a).is_file() for a in alt[2:]), alt
                    checked.add("jupyter")
                elif name.startswith("python") and alt[1] == "-m":
                    module, args = alt[2], alt[3:]
                    if module in HYDRA_APPS:
                        _dry_run_hydra(module, args)
                    elif module not in RESOLVED_ONLY:
                        importlib.import_module(module).parse_args(args)
                    checked.add(module)
            except (Exception, SystemExit) as e:   # noqa: BLE001 - every failure is reported
                failed.append(f"{' '.join(alt)}: {type(e).__name__}: {e}")
    assert not failed, "README commands that do not run as written:\n" + "\n".join(failed)
    assert {"experiments.attention", "experiments.serving", "experiments.serving.paper", "experiments.reproduce",
            "analysis.figures", "experiments.gpu_checks", "jupyter"} <= checked, checked


# -- Ctrl-C while a command starts (its imports take seconds) ----------------------------------------
INTERRUPT_AT_IMPORT = """
import runpy, sys
module, heavy = sys.argv[1], sys.argv[2]
class CtrlC:                                   # the user hits Ctrl-C while `heavy` is being imported
    def find_spec(self, name, path=None, target=None):
        if name == heavy:
            raise KeyboardInterrupt
sys.meta_path.insert(0, CtrlC())
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("module, heavy, args", [
    ("experiments.reproduce", "torch", ["--no-wandb"]),
    ("experiments.attention", "hydra", []),
    ("experiments.serving", "hydra", []),
    ("experiments.serving", "torch", []),
    ("experiments.serving.paper", "torch", ["--plan"]),
])
def test_ctrl_c_during_start_up_imports_ends_in_one_line(module, heavy, args):
    p = subprocess.run([sys.executable, "-c", INTERRUPT_AT_IMPORT, module, heavy, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    name = module.split(".")[-1] if module != "experiments.serving.paper" else "serving"
    assert p.returncode == 130, p.stdout + p.stderr
    assert p.stderr.strip().splitlines() == [f"[{name}] interrupted (Ctrl-C)"], p.stderr
