"""Attention microbenchmark entry point: `python -m experiments.attention [overrides]`.

All logic lives in `experiments.harness.sweep`; this file only hands it the composed config
(conf/attention.yaml documents the keys, presets and multirun sharding). Hydra is imported inside
`main`, so a Ctrl-C during the start-up imports ends in one line too (experiments.cli.run).
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from experiments.cli import interpreter, run

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def sweep(cfg) -> None:
    """The Hydra task: one sweep (one shard of a multirun)."""
    from experiments.harness import sweep as harness  # after Hydra: kernels are imported with the interpreter set up
    status = harness.main(cfg, [interpreter(), "-m", "experiments.attention", *map(shlex.quote, sys.argv[1:])])
    if status:
        sys.exit(status)


def main() -> None:
    import hydra
    hydra.main(config_path=CONF_DIR, config_name="attention", version_base="1.3")(sweep)()


if __name__ == "__main__":
    sys.exit(run("attention", main))
