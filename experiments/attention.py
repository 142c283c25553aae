"""Attention microbenchmark entry point: `python -m experiments.attention [overrides]`.

All logic lives in `experiments.harness.sweep`; this file only hands it the composed config
(conf/attention.yaml documents the keys, presets and multirun sharding). Hydra is imported inside
`main`, so a Ctrl-C during the start-up imports ends in one line too (experiments.cli.run).
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from experiments.cli import command, interpreter, run

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def sweep(cfg) -> None:
    """The Hydra task: one sweep (one shard of a multirun)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from experiments.harness import sweep as harness  # after Hydra: kernels are imported with the interpreter set up
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    # How to resume: the command as typed; a multirun's job (a launcher's worker, whose argv is the
    # launcher's) is resumed alone by its own overrides (`... num_shards=4 shard=1`).
    args = list(HydraConfig.get().overrides.task) if multirun else sys.argv[1:]
    status = harness.main(cfg, [interpreter(), "-m", "experiments.attention", *map(shlex.quote, args)])
    if status and multirun:   # the other shards go on; the multirun ends with this line, status 1
        raise harness.ShardFailed(f"[attention] shard {cfg.get('shard')} of num_shards={cfg.get('num_shards')} "
                                  f"ended with exit status {status} (its line above says why); rerunning "
                                  f"the multirun resumes every shard")
    if status:
        sys.exit(status)


def register_resolvers() -> None:
    """`${shard_count:<num_shards>}` (conf/attention.yaml: a multirun's shards): the count `num_shards`
    stands for, `gpus` being one a CUDA GPU of this machine."""
    from omegaconf import OmegaConf

    def shard_count(value):
        from experiments.harness.paths import shard_count as count
        return count(value)
    OmegaConf.register_new_resolver("shard_count", shard_count, replace=True)


# Launchers (conf/hydra/launcher/ and Hydra's own) whose plugin comes with the `launchers` extra.
LAUNCHER_PLUGINS = {name: "hydra_plugins.hydra_submitit_launcher"
                    for name in ("slurm", "submitit_slurm", "submitit_local")}


def missing_launcher(args) -> str | None:
    """Why a `hydra/launcher=<name>` among `args` cannot load here (its plugin is not installed), with
    the command that installs it; None when it can (or no such launcher is asked for)."""
    import importlib.util
    for arg in args:
        plugin = LAUNCHER_PLUGINS.get(arg.split("=", 1)[1]) if arg.startswith("hydra/launcher=") else None
        if plugin and importlib.util.find_spec(plugin) is None:
            install = command("pip install -e '.[launchers]'")
            return f"{arg} needs Hydra's {plugin.split('.')[-1].replace('_', '-')} plugin; install it with: {install}"
    return None


def main() -> int | None:
    missing = missing_launcher(sys.argv[1:])
    if missing:
        print(f"[attention] refused: {missing}", file=sys.stderr)
        return 2
    import hydra
    register_resolvers()
    hydra.main(config_path=CONF_DIR, config_name="attention", version_base="1.3")(sweep)()


if __name__ == "__main__":
    sys.exit(run("attention", main))
