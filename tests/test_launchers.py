"""Sweeps over several GPUs and a cluster: a multirun's shards through Hydra's launchers (conf/hydra/launcher/),
each shard in its own process appending to its own results file, merged by analysis.load, resumed per shard.

On a CPU: the joblib launcher (`gpus`, a dev dependency) runs the shards as processes; the SLURM config
(`slurm`, the `launchers` extra) is checked up to the sbatch script submitit would submit, then run through
submitit's local executor. Tests that need hydra-submitit-launcher skip without it.
"""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from analysis.load import load_results
from experiments.attention import register_resolvers
from experiments.harness import paths
from experiments.harness.points import expand_points, shard

try:
    import hydra_plugins.hydra_submitit_launcher as submitit_launcher
except ImportError:          # the `launchers` extra is not installed (CI installs `.[dev]`)
    submitit_launcher = None
needs_submitit = pytest.mark.skipif(submitit_launcher is None, reason="needs hydra-submitit-launcher "
                                    "(pip install -e '.[launchers]')")

REPO = Path(__file__).resolve().parents[1]
CONF = str(REPO / "conf")
PLUGINS = str(REPO / "tests" / "plugins")     # hydra_plugins.pod_slurm_on_this_machine: `slurm` run locally
SMOKE = ["sweep=smoke", "backend=reference", "wandb.enabled=false", "progress=false"]


def _compose(overrides):
    register_resolvers()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("attention", overrides=overrides, return_hydra_config=True)


def _shards_of(cfg) -> list[str]:
    """The shard values the multirun's sweeper expands `hydra.sweeper.params.shard` into."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    [override] = OverridesParser.create().parse_overrides([f"shard={cfg.hydra.sweeper.params.shard}"])
    return list(override.sweep_string_iterator())


def _multirun(tmp_path, *overrides, extra_path=(), timeout=300):
    cmd = [sys.executable, "-m", "experiments.attention", "-m", *overrides, *SMOKE,
           f"results_dir={tmp_path / 'r'}", f"hydra.sweep.dir={tmp_path / 'h'}"]
    env = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"},   # as a user runs it
           "PYTHONPATH": os.pathsep.join([str(REPO), *extra_path])}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def _check_every_pair_once(tmp_path, num_shards):
    """Every (point, backend) of the smoke sweep in exactly one shard file, the shard's own points, and
    once in the loader's merge of the sweep's files."""
    cfg = _compose(SMOKE)
    points = expand_points(cfg.sweep, {**cfg.models, cfg.model.name: cfg.model})
    files = sorted((tmp_path / "r" / "smoke").glob(f"cpu.shard*of{num_shards}.csv"))
    assert [f.name for f in files] == [f"cpu.shard{i}of{num_shards}.csv" for i in range(num_shards)]
    for i, f in enumerate(files):
        rows = pd.read_csv(f)
        assert sorted(rows.point_id) == sorted(p.point_id for p in shard(points, i, num_shards)), f.name
    merged = load_results(tmp_path / "r" / "smoke").attention      # a sweep's folder: all its files
    assert sorted(merged.point_id) == sorted(p.point_id for p in points)
    assert not merged.duplicated(["point_id", "backend"]).any() and (merged.status == "ok").all()
    return files


# -- the shard count -------------------------------------------------------------------------------
def test_num_shards_gpus_is_one_shard_a_gpu_and_each_shard_takes_its_own(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert paths.shard_count("gpus") == 3 and paths.shard_count(5) == 5
    assert [paths.resolve_device("cuda", i) for i in range(4)] == [torch.device("cuda", i % 3) for i in range(4)]
    assert paths.resolve_device("auto", 2) == torch.device("cuda", 2)
    cfg = _compose(["hydra/launcher=gpus", "num_shards=gpus"])
    assert cfg.hydra.launcher.n_jobs == 3 and _shards_of(cfg) == ["0", "1", "2"]
    assert _compose(["hydra/launcher=gpus", "num_shards=5"]).hydra.launcher.n_jobs == 5
    for bad in (0, -1, "two", True):
        with pytest.raises(ValueError, match=f"num_shards={bad!r} is invalid"):
            paths.shard_count(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert paths.shard_count("gpus") == 1                 # no GPU: one shard, on this CPU


def test_a_multirun_covers_every_shard_unless_told_one():
    assert _shards_of(_compose(["num_shards=4"])) == ["0", "1", "2", "3"]
    assert _shards_of(_compose([])) == ["0"]               # other multiruns: one shard, as before


# -- one machine: the joblib launcher, one process a shard ------------------------------------------
def test_gpus_launcher_runs_every_shard_in_its_own_file_and_resumes_each(tmp_path):
    """`-m hydra/launcher=gpus num_shards=2`: two processes, two files, every pair once in the merge. A
    shard cut short (its last rows gone, as after a kill) is resumed by the same command: only its
    missing rows run; nothing is doubled."""
    p = _multirun(tmp_path, "hydra/launcher=gpus", "num_shards=2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.count("[harness] sweep=smoke") == 2 and "Joblib.Parallel(n_jobs=2" in p.stdout
    assert sorted(d.name for d in (tmp_path / "h").iterdir() if d.is_dir()) == [
        "0_smoke_shard0of2", "1_smoke_shard1of2"]
    files = _check_every_pair_once(tmp_path, 2)
    lines = files[1].read_text().splitlines(keepends=True)
    files[1].write_text("".join(lines[:-2]))                # shard 1 lost its last 2 rows
    p = _multirun(tmp_path, "hydra/launcher=gpus", "num_shards=2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "(3 done earlier, 0 to run" in p.stderr and "(1 done earlier, 2 to run" in p.stderr, p.stderr
    _check_every_pair_once(tmp_path, 2)


def test_a_failing_job_lets_the_others_finish_and_fails_the_multirun_in_one_line(tmp_path):
    """Jobs refused before their first point (cpu_max_kv_tokens=0) fail; the others still write every row
    of their shard, and the multirun ends with one line naming the shard, status 1, no traceback."""
    p = _multirun(tmp_path, "hydra/launcher=gpus", "num_shards=2", "cpu_max_kv_tokens=0,100000")
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and p.stderr.count("[harness] refused: ") == 2, p.stderr[-3000:]
    assert "[attention] shard 0 of num_shards=2 ended with exit status 2" in p.stderr, p.stderr[-3000:]
    _check_every_pair_once(tmp_path, 2)


# -- a cluster: the submitit SLURM launcher -----------------------------------------------------------
@needs_submitit
def test_slurm_config_submits_one_job_array_one_gpu_a_shard(tmp_path, monkeypatch):
    """`-m hydra/launcher=slurm num_shards=4`: the sbatch script submitit would submit (its SLURM launcher,
    our config, a stand-in `srun` on PATH, the submission caught before `sbatch` runs) is one array of 4
    jobs, one task and one GPU each, on the partition asked, requeued at the time limit, and job i is
    shard i of 4."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.utils import instantiate
    from submitit.slurm import slurm

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    submitted = {}

    def caught(executor, submissions):
        submitted["sbatch"] = slurm._make_sbatch_string(command="<job>", folder=executor.folder,
                                                        map_count=len(submissions), **executor.parameters)
        submitted["jobs"] = [d.args[0] for d in submissions]
        submitted["max_num_timeout"] = executor.max_num_timeout
        return []
    monkeypatch.setattr(slurm.SlurmExecutor, "_internal_process_submissions", caught)

    cfg = _compose(["hydra/launcher=slurm", "num_shards=4", "hydra.launcher.partition=gpu", "sweep=paper",
                    "backend=all", f"hydra.sweep.dir={tmp_path / 'h'}", "hydra.job.name=attention"])
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    args = [f"shard={cfg.hydra.sweeper.params.shard}", "num_shards=4", "sweep=paper", "backend=all"]
    [jobs] = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)
    launcher.launch(jobs, initial_job_idx=0)
    sbatch = submitted["sbatch"].splitlines()
    for line in ("#SBATCH --array=0-3%4", "#SBATCH --gpus-per-node=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --partition=gpu", "#SBATCH --time=240", "#SBATCH --cpus-per-task=8"):
        assert line in sbatch, submitted["sbatch"]
    assert submitted["max_num_timeout"] == 20
    assert [j[0] for j in submitted["jobs"]] == [f"shard={i}" for i in range(4)]
    assert all("num_shards=4" in j for j in submitted["jobs"])


@needs_submitit
def test_slurm_config_runs_through_submitits_local_executor(tmp_path):
    """The same config through submitit's local executor (each job a process it starts, as srun would):
    every shard's file, every pair once in the merge. (Resuming a shard is the harness's, whatever the
    launcher: the joblib test above.)"""
    run = ("hydra/launcher=slurm", "num_shards=2", "hydra.launcher.partition=gpu",
           "hydra.launcher._target_=hydra_plugins.pod_slurm_on_this_machine.SlurmConfigOnThisMachine")
    p = _multirun(tmp_path, *run, extra_path=[PLUGINS])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in p.stdout + p.stderr
    _check_every_pair_once(tmp_path, 2)
    logs = "".join(f.read_text() for f in (tmp_path / "h" / ".submitit").rglob("*_log.err"))
    assert logs.count("[harness] sweep=smoke") == 2 and logs.count("(0 done earlier, 3 to run") == 2, logs


def test_a_launcher_whose_plugin_is_missing_is_refused_in_one_line_naming_the_extra(monkeypatch, capsys):
    import importlib.util

    from experiments import attention
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if "submitit" in name else real(name, *a))
    monkeypatch.setattr(sys, "argv", ["attention", "-m", "hydra/launcher=slurm", "num_shards=8"])
    assert attention.main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[attention] refused: hydra/launcher=slurm needs Hydra's "
                                               "hydra-submitit-launcher plugin"), err
    assert err[0].endswith("-m pip install -e '.[launchers]'")
    assert attention.missing_launcher(["hydra/launcher=gpus", "num_shards=gpus"]) is None
