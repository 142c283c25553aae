"""The backend registry (pod/registry.py): listing, lookup errors, availability reasons."""
import random

import pytest
import torch

from baselines import registry
from pod.batch import BatchSpec, make_batch
from pod.reference import reference
from baselines.registry import AttentionOutput, get_backend, list_backends, register_backend


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in a test are dropped afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry._REGISTRY


def test_lists_reference_and_every_entry_is_consistent():
    backends = list_backends()
    assert "reference" in backends
    assert list(backends) == sorted(backends)
    for name, b in backends.items():
        assert b.name == name
        assert b.computes and b.computes <= {"prefill", "decode"}, name
        assert b.layouts and b.layouts <= {"contiguous", "paged"}, name
        why = b.availability()
        assert why is None or (isinstance(why, str) and why), name
        assert b.is_available() == (why is None)
    assert backends["reference"].is_available()


def test_unknown_backend_raises_keyerror_naming_the_registered_ones():
    with pytest.raises(KeyError) as e:
        get_backend("no_such_backend")
    msg = str(e.value)
    assert "no_such_backend" in msg and "reference" in msg


def test_availability_reasons(scratch_registry):
    @register_backend("t_gpu_only", availability=lambda: "needs a CUDA GPU")
    def gpu_only(batch):
        raise AssertionError("never prepared")

    @register_backend("t_decode_paged", computes=("decode",), layouts=("paged",))
    def decode_paged(batch):
        raise AssertionError("never prepared")

    paged_hybrid = make_batch(BatchSpec.build(4, 2, 64, [(3, 1)], [4], page_size=16))
    contig_prefill = make_batch(BatchSpec.build(4, 2, 64, [(3, 1)]))
    gpu = get_backend("t_gpu_only")
    assert not gpu.is_available()
    assert gpu.unavailable_reason() == gpu.unavailable_reason(paged_hybrid) == "needs a CUDA GPU"
    dec = get_backend("t_decode_paged")
    assert dec.unavailable_reason() is None and dec.unavailable_reason(paged_hybrid) is None
    why = dec.unavailable_reason(contig_prefill)
    assert "contiguous" in why and "paged" in why
    only_prefill = make_batch(BatchSpec.build(4, 2, 64, [(3, 1)], page_size=16))
    why = dec.unavailable_reason(only_prefill)
    assert "decode" in why and "prefill" in why
    if not torch.cuda.is_available():
        assert "CUDA" in registry.cuda_available()


def test_double_registration_is_an_error(scratch_registry):
    def prep(batch):
        return lambda: None
    register_backend("t_twice")(prep)
    register_backend("t_twice")(prep)   # the same function again (a module re-import) is fine
    with pytest.raises(ValueError, match="t_twice"):
        register_backend("t_twice")(lambda batch: None)


def test_reference_backend_returns_the_reference():
    seed = random.randrange(2**31)
    batch = make_batch(BatchSpec.build(4, 1, 64, [(5, 3)], [6, 2], page_size=4), "cpu", seed)
    out = get_backend("reference").prepare(batch)()
    assert isinstance(out, AttentionOutput)
    assert out.prefill.dtype == batch.q_prefill.dtype and out.decode.shape == batch.q_decode.shape
    ref_p, ref_d = reference(batch)
    torch.testing.assert_close(out.prefill.float(), ref_p, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.decode.float(), ref_d, atol=2e-2, rtol=2e-2)
