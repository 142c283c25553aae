"""A serving engine's batches must not recompile our GPU kernels (no GPU needed).

Triton specialises an int argument on `== 1` and `% 16 == 0`; every new combination is a compile (seconds
for the Gluon kernels) inside whichever engine step first meets it. The H200 serving run at 58b7ddd spent
4.2 s in one such step. The kernels an engine runs on Hopper (the Hopper POD kernel, the Hopper prefill
tile, the decode kernel) must see the same specialisation for every batch of one model and page size:
prefill rows 1 / 16k / other, 0 / 1 / more prefill chunks ahead of the decodes, any block-table width.
"""
import pytest
import torch

from pod.batch import BatchSpec, make_batch
from pod.kernels.decode import _decode_kernel, plan_decode
from pod.kernels.pod_sm90 import PodSm90Config, launch_args as pod_sm90_args, plan_pod_sm90, pod_sm90_kernel
from pod.kernels.prefill_sm90 import launch_args as prefill_sm90_args, plan_prefill_sm90, prefill_sm90_kernel

# (prefill chunks as (chunk, context), decode context lengths): what successive engine steps look like.
STEPS = [([(1024, 0)], []), ([(1000, 1024)], [1, 17, 300]), ([(1, 2047), (31, 0)], [4096] * 3),
         ([(993, 4096)], [8191, 16] * 16), ([], [2, 4097]), ([(16, 33)], [5000])]


def _specialization(kernel, *args, **kwargs) -> list:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    if isinstance(kernel, InterpretedFunction):        # a @triton.jit kernel under TRITON_INTERPRET=1
        kernel = JITFunction(kernel.fn, **kernel.kwargs)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    _, spec, _ = binder(*args, **kwargs)
    return [s for s in spec if s[0] != "constexpr" or not isinstance(s[1], torch.Tensor)]


def _batches():
    for prefill, decode in STEPS:
        spec = BatchSpec.build(32, 8, 128, prefill=prefill, decode=decode, page_size=16)
        yield make_batch(spec, "cpu", seed=0)


def _outs(batch):
    return torch.empty_like(batch.q_prefill), torch.empty_like(batch.q_decode)


def test_the_hopper_pod_kernel_compiles_once_for_every_batch():
    keys = []
    for b in _batches():
        args, const = pod_sm90_args(b, plan_pod_sm90(b, PodSm90Config(), num_sms=132), *_outs(b))
        keys.append(_specialization(pod_sm90_kernel, *args, **const))
    assert all(k == keys[0] for k in keys)


def test_the_hopper_prefill_tile_compiles_once_for_every_batch():
    keys = []
    for b in _batches():
        if b.spec.num_prefill:
            args, const = prefill_sm90_args(b, plan_prefill_sm90(b, device="cpu"), _outs(b)[0], None)
            keys.append(_specialization(prefill_sm90_kernel, *args, **const))
    assert len(keys) >= 4 and all(k == keys[0] for k in keys)


def test_the_decode_kernel_compiles_once_for_every_batch():
    keys = []
    for b in _batches():
        if b.spec.num_decode:
            work = plan_decode(b, 132, block_n=64, device="cpu")
            keys.append(_specialization(_decode_kernel, *work.kernel_args(b, _outs(b)[1]), 1024,
                                        **work.tile_constexprs(64)))
    assert len(keys) >= 4 and all(k == keys[0] for k in keys)
