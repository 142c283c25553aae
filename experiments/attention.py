"""Attention microbenchmark entry point: `python -m experiments.attention [overrides]`.

All logic lives in `pod.harness.run_sweep`; this file only hands it the composed config
(conf/attention.yaml documents the keys, presets and multirun sharding).
"""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(config_path=CONF_DIR, config_name="attention", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pod.harness import run_sweep  # after Hydra: kernels are imported with the interpreter set up
    run_sweep(cfg)


if __name__ == "__main__":
    main()
