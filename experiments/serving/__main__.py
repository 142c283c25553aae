"""Hydra entry point of the end-to-end serving experiment (conf/serving.yaml); logic in experiments.serving.experiment.

    python -m experiments.serving backends=[pod,fi_serial,triton_serial] num_requests=64 num_layers=8
    python -m experiments.serving mode=online qps=2 backends=pod
    python -m experiments.serving serving/experiment=fig12_llama3_8b     # a paper preset
"""
from __future__ import annotations

import sys

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from baselines.registry import UnknownBackend
from experiments.serving.experiment import ServingRefused, serve


@hydra.main(version_base="1.3", config_path="../../conf", config_name="serving")
def main(cfg: DictConfig) -> None:
    if cfg.out_dir:
        cfg.out_dir = to_absolute_path(cfg.out_dir)
    try:
        rows = serve(cfg)
    except (UnknownBackend, ServingRefused) as e:
        print(f"[serving] refused: {e}", file=sys.stderr)
        sys.exit(2)
    for row in rows:
        print({k: row[k] for k in ("backend", "status", "reason", "requests_per_min", "steady_requests_per_min",
                                   "tokens_per_s", "ttft_p50_ms", "tbt_p50_ms", "tbt_p99_ms",
                                   "stall_frac_200ms", "attention_share", "attn_err", "time_scale",
                                   "scaled_requests_per_min")})


if __name__ == "__main__":
    main()
