"""Attention microbenchmark entry point: `python -m experiments.attention [overrides]`.

All logic lives in `experiments.harness.sweep`; this file only hands it the composed config
(conf/attention.yaml documents the keys, presets and multirun sharding).
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(config_path=CONF_DIR, config_name="attention", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from experiments.harness import sweep  # after Hydra: kernels are imported with the interpreter set up
    status = sweep.main(cfg, ["python", "-m", "experiments.attention", *map(shlex.quote, sys.argv[1:])])
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
