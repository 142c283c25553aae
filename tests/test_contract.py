"""One contract for every kernel plan (pod/kernels/contract.py): num_tiles, describe() and runner(), so the
API, the adapters and the checks drive any kernel the same way. The Hopper plans are planned on the CPU
(shape-only); the portable ones also run, through the interpreter, behind the same three members."""
import ast
import json
import typing
from pathlib import Path

import pytest
import torch

from pod.api import Plan, plan
from pod.batch import BatchSpec, make_batch
from pod.dispatch import PodConfig
from pod.kernels.contract import KernelWork
from pod.kernels.decode import DecodeWork, plan_decode
from pod.kernels.pod_sm90 import PodSm90Work, plan_pod_sm90
from pod.kernels.prefill import PrefillWork, plan_prefill
from pod.kernels.prefill_sm90 import Sm90PrefillWork, plan_prefill_sm90
from pod.reference import max_rel_error, reference

REPO = Path(__file__).resolve().parents[1]
SPEC = BatchSpec.build(4, 2, 64, prefill=[(40, 30)], decode=[100, 9], page_size=16)
HOPPER_SPEC = BatchSpec.build(32, 8, 128, prefill=[(300, 700)], decode=[1000, 513], page_size=16)
SMALL = PodConfig(block_m=16, block_n=16, block_n_decode=16, num_sms=3)


def every_plan() -> dict:
    return {
        "PrefillWork": plan_prefill(SPEC, device="cpu"),
        "Sm90PrefillWork": plan_prefill_sm90(HOPPER_SPEC, device="cpu"),
        "DecodeWork": plan_decode(SPEC, device="cpu"),
        "PodSm90Work": plan_pod_sm90(HOPPER_SPEC, device="cpu"),
        "Plan/fused": plan(SPEC, SMALL, device="cpu"),
        "Plan/serial": plan(SPEC, PodConfig(variant="serial"), device="cpu"),
    }


def test_every_plan_type_follows_the_contract():
    plans = every_plan()
    assert {type(w) for w in plans.values()} == {PrefillWork, Sm90PrefillWork, DecodeWork, PodSm90Work, Plan}
    for name, work in plans.items():
        assert isinstance(work, KernelWork), name
        assert isinstance(work.num_tiles, int) and work.num_tiles > 0, name
        described = work.describe()
        assert isinstance(described, dict) and described, name
        json.dumps(described)                                  # a result row's backend_config
        assert callable(work.runner) and callable(work.describe), name


def test_plan_prefill_is_typed_by_the_contract():
    assert typing.get_type_hints(Plan)["prefill"] is KernelWork
    assert isinstance(plan(SPEC, PodConfig(variant="serial"), device="cpu").prefill, KernelWork)


def test_decode_describe_is_a_method_reporting_the_split_plan():
    work = plan_decode(SPEC, kv_splits=3, device="cpu", split_policy="fit")
    d = work.describe()
    assert d == dict(kv_chunk_len=work.kv_chunk_len, max_splits=3, num_items=work.num_items,
                     num_tiles=work.num_tiles, partial_rows=int(work.part_indptr[-1]),
                     target_ctas=work.target_ctas, split_policy="fit", fuse_merge=False, config=work.config)
    assert d["config"] is not work.config                 # a copy: the row cannot change the plan
    auto = plan_decode(SPEC, block_n=None, device="cpu")
    auto.config = None                                     # as on the GPU: BLOCK_N left to the autotuner
    assert auto.describe()["autotuned"] is True


def _launch(work, batch, *outs):
    """What the API and every adapter do, whatever the kernel: no isinstance, one runner."""
    return work.runner(batch, *outs)()


@pytest.mark.parametrize("variant", ["serial", "fused"])
def test_runners_launch_through_the_one_contract(variant):
    batch = make_batch(SPEC, "cpu", seed=11)
    ref_p, ref_d = reference(batch)
    p = plan(batch, PodConfig(variant=variant, block_m=16, block_n=16, block_n_decode=16, num_sms=3))
    o_p, o_d = _launch(p, batch, torch.full_like(batch.q_prefill, float("nan")),
                       torch.full_like(batch.q_decode, float("nan")))
    assert max_rel_error(o_p, ref_p) <= 1e-2 and max_rel_error(o_d, ref_d) <= 1e-2
    if variant == "serial":                                # each role's plan on its own
        out = _launch(p.prefill, batch, torch.full_like(batch.q_prefill, float("nan")))
        assert max_rel_error(out, ref_p) <= 1e-2
        out = _launch(p.decode, batch, torch.full_like(batch.q_decode, float("nan")))
        assert max_rel_error(out, ref_d) <= 1e-2


def test_no_runner_is_chosen_by_the_plan_type():
    """The API and the adapters never ask which plan type they hold (isinstance on a *Work or *Plan)."""
    offenders = []
    for rel in ("pod/api.py", "pod/prefill.py", "baselines/ours.py", "experiments/gpu_checks.py"):
        for node in ast.walk(ast.parse((REPO / rel).read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                if any(n.endswith(("Work", "Plan")) for n in names):
                    offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, offenders
