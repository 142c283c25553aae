"""The tree's architecture, checked: `pod/` is the product and imports nothing outside itself, the
modules of the repository import each other without a cycle, the registry finds backend modules
without a list of names, and the README's layout and backend table match the tree."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pod", "baselines", "experiments", "analysis")   # this repository's importable packages
OTHER_TOP_LEVEL = {"baselines", "experiments", "analysis", "conf", "notebooks", "results", "scripts", "tests",
                   "docs"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Absolute module names imported anywhere in the file (function-level imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)   # `from pkg import module`
    return found


def repo_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            mods[module_name(path)] = path
    return mods


def test_pod_imports_nothing_outside_pod():
    offenders = []
    for path in (REPO / "pod").rglob("*.py"):
        for name in imports_of(path):
            if name.split(".")[0] in OTHER_TOP_LEVEL:
                offenders.append(f"{path.relative_to(REPO)}: {name}")
    assert not offenders, "pod/ must import nothing outside pod/:\n" + "\n".join(offenders)


def test_pod_imports_alone(tmp_path):
    """`import pod` (and its API and kernels) with only pod/ on the path: a copy of the package in an
    empty folder, the repository not importable."""
    import shutil
    shutil.copytree(REPO / "pod", tmp_path / "pod", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys, pod, pod.api, pod.kernels.configs, pod.dispatch, pod.reference\n"
            "assert not any(m.split('.')[0] in {'baselines', 'experiments', 'analysis'} for m in sys.modules)\n"
            "print(pod.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path[:0] = [sys.argv[1]]; exec(sys.argv[2])",
                          str(tmp_path), code], cwd=tmp_path, env={**env, "PYTHONSAFEPATH": "1"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(tmp_path / "pod" / "__init__.py")


def test_no_import_cycles_among_the_repositorys_modules():
    mods = repo_modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for imp in imports_of(path):
            # the module itself, or the deepest repo module a dotted name falls in; parents (packages)
            # of the importing module are not edges (importing pod.api imports pod first by design)
            while imp and imp not in mods:
                imp = imp.rpartition(".")[0]
            if imp and imp != name and not name.startswith(imp + "."):
                deps.add(imp)
        graph[name] = deps
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_registry_finds_every_backend_module_without_a_list_of_names():
    import baselines.registry as registry
    text = (REPO / "baselines" / "registry.py").read_text()
    assert "baselines.ours" not in text and "baselines.flashinfer" not in text
    registry.list_backends()
    for path in (REPO / "baselines").glob("*.py"):
        if path.stem not in ("__init__", "registry"):
            assert f"baselines.{path.stem}" in sys.modules, path


def test_our_kernels_on_a_cpu_say_how_to_run_them(monkeypatch):
    import torch

    from baselines.registry import get_backend
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("triton_prefill", "triton_decode", "triton_serial", "pod", "pod_paper"):
        why = get_backend(name).availability()
        assert why is not None and "TRITON_INTERPRET=1" in why and "needs a CUDA GPU" not in why, (name, why)
    assert "GPU only" in get_backend("fa2_serial").availability()


def test_readme_layout_and_backend_table_match_the_tree():
    from baselines.registry import list_backends
    readme = (REPO / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    named = set(re.findall(r"^([a-z_]+)/", layout, flags=re.M))
    on_disk = {p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")
               and p.name not in ("outputs", "multirun", "wandb") and not p.name.endswith(".egg-info")}
    assert named == on_disk, (named, on_disk)
    for path in re.findall(r"\b((?:pod|baselines|experiments|analysis|scripts|conf)/[\w/.]+\.(?:py|yaml|sh))",
                           readme):
        assert (REPO / path).exists(), f"README names {path}, which is not in the tree"
    table = readme.split("## Backends", 1)[1].split("\n\n", 2)[2]
    in_table = set(re.findall(r"`([a-z0-9_]+)`", table.split("\n\n")[0]))
    assert in_table == set(list_backends()), (in_table ^ set(list_backends()))


def test_every_import_of_the_repository_resolves():
    """Every `from <our package> import name` resolves, those inside functions too: a lazy import of a
    name that moved (experiments.harness.sweep's timing, split into timing.py) fails only where that
    function runs, often on a GPU, never on the CPU tests' paths."""
    import importlib
    broken = []
    for path in repo_modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                    and node.module.split(".")[0] in PACKAGES):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        broken.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.module}.{alias.name}")
    assert not broken, "imports that do not resolve:\n" + "\n".join(broken)


def test_every_module_level_name_is_used_somewhere():
    """No parked code: every function, class and constant defined at a module's top level in the
    repository's packages is named somewhere besides its definition (code, tests, docs, configs, the
    Makefile). Functions a @register_* decorator registers (backends) are used by the registry."""
    from collections import Counter
    words = Counter()
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO).parts
        if (path.is_file() and not any(p.startswith(".") or p in ("results", "outputs", "multirun", "wandb")
                                       for p in rel)
                and (path.suffix in (".py", ".md", ".ipynb", ".yaml", ".toml", ".sh") or path.name == "Makefile")):
            words.update(re.findall(r"\w+", path.read_text(errors="replace")))
    unused = []
    for path in repo_modules().values():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                registered = any(isinstance(d, ast.Call) and ast.unparse(d.func).startswith("register")
                                 for d in node.decorator_list)
                names = [] if registered else [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            else:
                names = []
            unused += [f"{path.relative_to(REPO)}: {n}" for n in names
                       if not n.startswith("__") and words[n] <= 1]
    assert not unused, "defined and never used (remove, or use):\n" + "\n".join(unused)


def test_the_harness_is_in_parts_that_each_say_what_they_are():
    """experiments/harness/: no module is a catch-all. Each opens with a docstring saying what it is,
    the package's docstring lists every module, and none runs past 300 lines (sweep.py was 577: points,
    timing, running, paths, W&B and summary in one file)."""
    harness = REPO / "experiments" / "harness"
    listed = ast.get_docstring(ast.parse((harness / "__init__.py").read_text()))
    for path in sorted(harness.glob("*.py")):
        if path.name == "__init__.py":
            continue
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text))
        assert doc and len(doc.splitlines()[0]) > 20, f"{path.name}: no docstring saying what it is"
        assert f"{path.name} " in listed, f"experiments/harness/__init__.py does not list {path.name}"
        assert len(text.splitlines()) <= 300, f"{path.name}: {len(text.splitlines())} lines"
    for part in ("points", "timing", "running", "paths", "wandb_log", "summary"):
        assert (harness / f"{part}.py").is_file(), part


def test_a_model_name_means_one_shape_across_conf():
    """conf/model/ (attention sweeps) and conf/serving/model/ (the serving engine) may both hold a model,
    but one name means one set of heads: two different models were both called `tiny`."""
    import yaml
    shapes = {}
    for path in [*sorted((REPO / "conf" / "model").glob("*.yaml")),
                 *sorted((REPO / "conf" / "serving" / "model").glob("*.yaml"))]:
        cfg = yaml.safe_load(path.read_text())
        heads = (cfg["num_q_heads"], cfg["num_kv_heads"], cfg["head_dim"])
        first = shapes.setdefault(cfg["name"], (heads, path))
        assert first[0] == heads, (f"{path.relative_to(REPO)} and {first[1].relative_to(REPO)} are both "
                                   f"called {cfg['name']!r}: heads {heads} vs {first[0]}")


def test_hints_name_the_interpreter_that_has_the_packages():
    """A message of experiments/ that tells the user what to run names the running interpreter
    (experiments.cli.command: `.venv/bin/python -m ...` after `make`), not a bare `python -m` / `pip
    install` from PATH that may lack the project's packages. Docstrings and comments may say `python -m`."""
    offenders = []
    for path in (REPO / "experiments").rglob("*.py"):
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        docs |= {id(a) for n in ast.walk(tree) if isinstance(n, ast.Call)   # command("pip install x")
                 and getattr(n.func, "id", getattr(n.func, "attr", None)) == "command" for a in n.args}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
                    and re.search(r"(?<![/\w])(python3?|pip) (-m |install)", node.value)):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value[:80]!r}")
    assert not offenders, "\n".join(offenders)


def test_code_and_configs_speak_of_the_code():
    """No tracker references ("issue <number> item <n>") in Python files or sweep configs (a reader has the
    code, not the tracker), and
    no words of how the work was scheduled ("lent", "second reader", "next session") in the README,
    docs/ or scripts/."""
    offenders = []
    code = [p for pkg in (*PACKAGES, "tests") for p in (REPO / pkg).rglob("*.py")]
    for path in code + sorted((REPO / "conf" / "sweep").glob("*.yaml")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bissue \d+", line, re.I):
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    prose = [REPO / "README.md", REPO / "Makefile", *(REPO / "docs").glob("*.md"), *(REPO / "scripts").iterdir()]
    for path in prose:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\blent\b|second reader|next session", line, re.I):
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
