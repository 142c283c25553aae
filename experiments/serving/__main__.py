"""Hydra entry point of the end-to-end serving experiment (conf/serving.yaml); logic in experiments.serving.experiment.

    python -m experiments.serving backends=[pod,fi_serial,triton_serial] num_requests=64 num_layers=8
    python -m experiments.serving mode=online qps=2 backends=pod
    python -m experiments.serving serving/experiment=fig12_llama3_8b     # a paper preset

What cannot run (a bad value, an unknown backend, a GPU run without a GPU, a KV pool that does not fit)
is refused in one line, exit status 2; Ctrl-C, at start-up too, in one line, 130 (Hydra and torch are
imported inside `main`).
"""
from __future__ import annotations

import sys
from pathlib import Path

from experiments.cli import run

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
SHOWN = ("backend", "status", "reason", "requests_per_min", "steady_requests_per_min", "tokens_per_s",
         "ttft_p50_ms", "tbt_p50_ms", "tbt_p99_ms", "stall_frac_200ms", "attention_share", "attn_err",
         "time_scale", "scaled_requests_per_min")


def serve_config(cfg) -> None:
    """The Hydra task: one serving run (one job of a multirun)."""
    from hydra.utils import to_absolute_path

    from baselines.registry import UnknownBackend
    from experiments.serving.experiment import ServingRefused, serve
    if cfg.out_dir:
        cfg.out_dir = to_absolute_path(cfg.out_dir)
    try:
        rows = serve(cfg)
    except (UnknownBackend, ServingRefused) as e:
        print(f"[serving] refused: {e}", file=sys.stderr)
        sys.exit(2)
    for row in rows:
        print({k: row[k] for k in SHOWN})


def main() -> None:
    import hydra
    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="serving")(serve_config)()


if __name__ == "__main__":
    sys.exit(run("serving", main))
