"""A plan's int32 tables on the device in one host-to-device copy.

A planner builds its work lists on the host (numpy or lists) and the kernels read them from the device.
One small copy each costs a staged transfer apiece (~10-20 us on an H200 host), and a serving engine plans
every iteration; `device_tables` packs them into one int32 buffer, copies it once, and hands back a view
of it per table. Each view starts on a 16-byte boundary: Triton specialises pointer arguments on it, so a
misaligned table would be a recompile.
"""
from __future__ import annotations

import numpy as np
import torch


def device_tables(device, **tables) -> dict:
    """{name: int32 tensor on `device`} for each array-like of `tables` (its shape kept; None stays None),
    all views of one buffer filled by one copy."""
    present = {k: np.asarray(v) for k, v in tables.items() if v is not None}
    offsets, n = {}, 0
    for name, a in present.items():
        offsets[name] = n
        n += -(-a.size // 4) * 4
    host = np.zeros(max(n, 4), dtype=np.int32)
    for name, a in present.items():
        host[offsets[name]:offsets[name] + a.size] = a.reshape(-1)
    buf = torch.from_numpy(host).to(device)
    out = {name: None for name in tables}
    for name, a in present.items():
        out[name] = buf[offsets[name]:offsets[name] + a.size].reshape(a.shape)
    return out
