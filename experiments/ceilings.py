"""Measure the card's two ceilings the roofline figure uses, and write them with provenance.

    python -m experiments.ceilings [--out results/h100/ceilings.csv]

gbps: a 4 GiB device-to-device copy, counting bytes read plus bytes written (the decode roofline).
tflops: an 8192^3 bf16 matmul on random data (the prefill roofline). Both are medians of
triton.testing.do_bench after its warm-up. GPU only.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
import triton

from experiments.harness.provenance import device_slug, provenance
from experiments.harness.schema import CEILING_SCHEMA


def measure() -> dict:
    n = 1 << 30                                   # 2**30 fp32 = 4 GiB
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    mm_ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return dict(sweep="ceilings", gbps=2 * 4 * n / (copy_ms * 1e-3) / 1e9,
                tflops=2 * m ** 3 / (mm_ms * 1e-3) / 1e12, copy_ms=copy_ms, matmul_ms=mm_ms,
                **provenance("cuda"))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("[ceilings] GPU only: needs a CUDA GPU; nothing measured")
        return 1
    row = measure()
    out = args.out or Path("results") / device_slug("cuda") / "ceilings.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([row], columns=list(CEILING_SCHEMA)).to_csv(out, index=False)
    print(f"[ceilings] {row['gpu']}: copy {row['gbps']:.0f} GB/s, bf16 matmul {row['tflops']:.0f} TFLOP/s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
