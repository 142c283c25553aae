"""First-GPU-call smoke test: JIT-compile every FlashInfer module our baselines use, and check every
baseline (fa2_*, fi_*) against the fp32 reference on a small hybrid batch.

FlashInfer compiles a kernel module with nvcc the first time a (dtype, head_dim, variant) is planned
and caches it under FLASHINFER_WORKSPACE_BASE (default ~/.cache/flashinfer); warming here keeps
compile time out of every later benchmark call. Run on the GPU machine:

    python -m baselines.gpu_smoke                 # head_dim 128 and 64, bf16, page 16, prints a table
    python -m baselines.gpu_smoke --head-dims 128 --prefill-backends auto   # the least to compile
    python -c "from baselines.gpu_smoke import warm_flashinfer; from pod.batch import ModelHeads; \
               print(warm_flashinfer(ModelHeads(32, 8, 128)))"
"""
from __future__ import annotations

import os
import time

import torch

from pod.batch import SUPPORTED_DTYPES, BatchSpec, ModelHeads, PrefillChunk, make_batch
from pod.reference import max_rel_error, reference
from pod.registry import BackendUnavailable, get_backend

FI_BACKENDS = ("fi_serial", "fi_batched", "fi_batch_attention", "fi_pod", "fi_batch_pod")
FI_KNOB_BACKENDS = ("fi_serial", "fi_batched")  # the ones POD_FI_PREFILL_BACKEND changes
FA_BACKENDS = ("fa2_serial", "fa2_streams", "fa2_batched")
# Loose enough for bf16 outputs of a 16-bit kernel, tight enough to catch a wrong mask or split.
MAX_REL_ERR = 2e-2


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        return dtype
    return {v: k for k, v in SUPPORTED_DTYPES.items()}[dtype]


def smoke_spec(heads: ModelHeads, page_size: int | None, dtype) -> BatchSpec:
    """One prefill chunk with context (fi_pod takes exactly one) and decodes of uneven lengths, none a
    multiple of the page or of the kernels' tiles."""
    return BatchSpec(heads=heads, prefill_chunks=(PrefillChunk(200, 77),),
                     decode_context_lens=(1, 33, 300, 1029, 517), dtype=_dtype_name(dtype),
                     page_size=page_size)


def check_backends(names, heads: ModelHeads, page_size: int | None = 16, dtype=torch.bfloat16,
                   device: str | None = None, spec: BatchSpec | None = None) -> list[dict]:
    """prepare + run each backend once on a small batch; compare with the reference. One dict a backend."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec = spec or smoke_spec(heads, page_size, dtype)
    batch = make_batch(spec, device=device, seed=0)
    ref_p, ref_d = reference(batch)
    rows = []
    for name in names:
        row = dict(backend=name, head_dim=heads.head_dim, batch=spec.describe(), status="ok", reason="",
                   seconds=float("nan"), prefill_err=float("nan"), decode_err=float("nan"))
        t0 = time.perf_counter()
        try:
            backend = get_backend(name)
            why = backend.unavailable_reason(batch)
            if why is not None:
                raise BackendUnavailable(why)
            out = backend.prepare(batch)()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            row["prefill_err"] = max_rel_error(out.prefill, ref_p)
            row["decode_err"] = max_rel_error(out.decode, ref_d)
            if max(row["prefill_err"], row["decode_err"]) > MAX_REL_ERR:
                row["status"] = "wrong"
        except BackendUnavailable as e:
            row.update(status="skipped", reason=str(e))
        except Exception as e:  # report, keep going: one broken backend must not hide the others
            row.update(status="error", reason=f"{type(e).__name__}: {e}"[:500])
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    return rows


def warm_flashinfer(heads: ModelHeads, page_size: int = 16, dtype=torch.bfloat16,
                    prefill_backends=("auto", "fa2")) -> list[dict]:
    """Trigger the JIT of every FlashInfer module our fi_* backends use for these heads and dtype, for
    each prefill `backend` knob value (auto = fa3 on Hopper, and fa2). Returns check_backends rows."""
    rows = []
    old = os.environ.get("POD_FI_PREFILL_BACKEND")
    try:
        for i, pb in enumerate(prefill_backends):
            os.environ["POD_FI_PREFILL_BACKEND"] = pb
            names = FI_BACKENDS if i == 0 else FI_KNOB_BACKENDS
            for r in check_backends(names, heads, page_size, dtype):
                r["prefill_backend"] = pb
                rows.append(r)
    finally:
        if old is None:
            os.environ.pop("POD_FI_PREFILL_BACKEND", None)
        else:
            os.environ["POD_FI_PREFILL_BACKEND"] = old
    return rows


def _versions() -> str:
    try:
        import flashinfer
        fi = f"flashinfer {flashinfer.__version__}"
    except Exception as e:  # report what is broken, the table below says which backends it hits
        fi = f"flashinfer import failed: {type(e).__name__}: {e}"
    cache = os.environ.get("FLASHINFER_WORKSPACE_BASE", "~") + "/.cache/flashinfer"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    return f"torch {torch.__version__} | {fi} | JIT cache {cache} | {gpu}"


def main(argv=None) -> int:
    import argparse

    import pandas as pd

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--prefill-backends", nargs="+", default=["auto", "fa2"],
                    help="values of POD_FI_PREFILL_BACKEND to warm (fa2's module is built anyway)")
    ap.add_argument("--skip-fa2", action="store_true", help="do not check the torch FA2 baselines")
    args = ap.parse_args(argv)
    print(_versions(), flush=True)
    heads_for = {128: ModelHeads(32, 8, 128), 64: ModelHeads(16, 2, 64)}
    rows = []
    for d in args.head_dims:
        rows += warm_flashinfer(heads_for[d], prefill_backends=tuple(args.prefill_backends))
        if not args.skip_fa2:
            rows += check_backends(FA_BACKENDS, heads_for[d], page_size=None)
    df = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_colwidth", 120, "display.max_rows", 200):
        print(df.drop(columns=["batch"]).to_string(index=False))
    return int(bool((df.status.isin(["error", "wrong"])).any()))


if __name__ == "__main__":
    raise SystemExit(main())
