"""Triton kernels: shared helpers (common), chunked prefill (prefill), decode and merge (decode, merge),
and the fused POD kernel (pod_fused); every named configuration in configs. Kernel files hold no
Hydra, no registry and no timing loop (the adapters are baselines/ours.py, the timing the harness's).

Importing this package under the Triton interpreter (TRITON_INTERPRET=1) installs two small fixes of
the Triton 3.6 interpreter (they change nothing on the GPU, where the interpreter is not used):
  * scalars are 1-element numpy arrays converted with ``int(array)``, which numpy >= 2.4 rejects, so a
    loop like ``for start in range(lo, hi, BLOCK_N)`` with tensor bounds fails: convert via ``.item()``;
  * ``tl.dot`` on bfloat16 operands multiplies their raw uint16 bit patterns: widen bf16 to fp32 first.
"""
from pod.env import interpreting


def _fix_interpreter() -> None:
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return
    if getattr(interpreter, "_pod_fixed", False):
        return
    original_patch = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor

    builder = interpreter.InterpreterBuilder
    original_dot = builder.create_dot

    def widen_bf16(h):
        if h.dtype.scalar == tl.bfloat16:
            # bf16 is stored as uint16: its bits are the top half of the fp32 with the same value.
            data = (h.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen_bf16(a), widen_bf16(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    interpreter._pod_fixed = True


if interpreting():
    _fix_interpreter()
