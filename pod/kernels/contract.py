"""The one contract every kernel plan of pod/kernels (and pod.api's Plan) follows, so the dispatcher, the
adapters of baselines/ and the checks never ask which kernel they hold:

    work = plan_some(batch_or_spec, config, device=...)   # shape-only: work lists, workspace, constants
    work.num_tiles                                        # work tiles of one launch
    work.describe()                                       # its knobs, flat and JSON-able (the row's backend_config)
    launch = work.runner(batch, *outs)                    # arguments bound once, untimed
    launch()                                              # launches only: returns the outputs

A new kernel is a new file with its plan_* function and a plan type that has these three members.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class KernelWork(Protocol):
    """What every kernel plan of pod/kernels offers (built by a plan_* function: shape-only)."""
    @property
    def num_tiles(self) -> int: ...          # CTAs / work tiles of one launch
    def describe(self) -> dict: ...          # the knobs, flat/JSON-able, for the result row
    def runner(self, batch, *outs, **kw): ...  # binds the launch once; returns launch() -> outs
