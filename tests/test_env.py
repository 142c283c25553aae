"""pod/env.py is the one home of the facts about where the kernels run: the interpreter switch, the
default device of a plan made from a spec, the (simulated) SM count, Hopper or not. Every plan_* function
and every adapter asks it, so they cannot disagree."""
import ast
from pathlib import Path

import torch

from pod import env
from pod.batch import BatchSpec, make_batch

REPO = Path(__file__).resolve().parents[1]
SPEC = BatchSpec.build(32, 8, 128, prefill=[(300, 700)], decode=[1000, 513], page_size=16)


def test_only_pod_env_reads_the_environment():
    """No second copy of interpreting() / device_num_sms() / on_hopper() in pod/ or baselines/, and no
    other reader of TRITON_INTERPRET or of the device's SM count and compute capability in pod/."""
    helpers = {"interpreting", "_interpreting", "device_num_sms", "on_hopper", "_on_hopper",
               "unpack_batch_or_spec", "default_device"}
    offenders = []
    for pkg in ("pod", "baselines"):
        for path in (REPO / pkg).rglob("*.py"):
            if path == REPO / "pod" / "env.py":
                continue
            rel = path.relative_to(REPO)
            text = path.read_text()
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef) and node.name in helpers:
                    offenders.append(f"{rel}: defines {node.name}()")
                if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and "NUM_SMS" in t.id
                                                        for t in node.targets):
                    offenders.append(f"{rel}: its own simulated SM count (line {node.lineno})")
            if ".get(\"TRITON_INTERPRET\"" in text:
                offenders.append(f"{rel}: reads TRITON_INTERPRET")
            if pkg == "pod" and ("multi_processor_count" in text or "get_device_capability" in text):
                offenders.append(f"{rel}: queries the device")
    assert not offenders, "\n".join(offenders)


def test_every_plan_agrees_on_the_simulated_sm_count():
    from pod.api import plan
    from pod.kernels.decode import plan_decode
    from pod.kernels.pod_sm90 import plan_pod_sm90
    assert env.device_num_sms("cpu") == env.SIMULATED_NUM_SMS
    assert plan(SPEC, device="cpu").num_sms == env.SIMULATED_NUM_SMS
    assert plan_decode(SPEC, device="cpu").num_sms == env.SIMULATED_NUM_SMS
    # the Hopper POD kernel's persistent grid: one CTA a (simulated) SM
    assert plan_pod_sm90(SPEC, device="cpu").grid == env.SIMULATED_NUM_SMS


def test_every_plan_of_a_spec_defaults_to_the_same_device(monkeypatch):
    """A spec without a device plans on env.default_device() in every plan_* function (it was the CPU in
    three of them and the GPU in two); a batch plans on its own device."""
    from pod.api import plan
    from pod.kernels.decode import plan_decode
    from pod.kernels.pod_sm90 import plan_pod_sm90
    from pod.kernels.prefill import plan_prefill
    from pod.kernels.prefill_sm90 import plan_prefill_sm90
    from pod.prefill import plan_chunked_prefill
    meta = torch.device("meta")                       # stands in for "where the kernels run"
    monkeypatch.setattr(env, "default_device", lambda: meta)
    tensors = {"plan": plan(SPEC).counters, "plan_decode": plan_decode(SPEC).work,
               "plan_prefill": plan_prefill(SPEC).work_units,
               "plan_chunked_prefill": plan_chunked_prefill(SPEC).work_units,
               "plan_prefill_sm90": plan_prefill_sm90(SPEC).work_units,
               "plan_pod_sm90": plan_pod_sm90(SPEC).work_units}
    assert {k: t.device for k, t in tensors.items()} == {k: meta for k in tensors}
    batch = make_batch(SPEC, "cpu", seed=0)
    assert plan(batch).counters.device.type == "cpu" and plan_prefill_sm90(batch).work_units.device.type == "cpu"
    assert env.unpack_batch_or_spec(batch, "meta") == (SPEC, meta)


def test_interpreting_reads_the_switch(monkeypatch):
    for value, expected in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert env.interpreting() is expected
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not env.interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert env.default_device().type == "cpu" and env.device_num_sms("cuda") == env.SIMULATED_NUM_SMS
