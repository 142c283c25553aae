"""Tests run on the CPU: Triton kernels through the interpreter, the SM id simulated."""
import os

# Must be set before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny CPU matmuls (the serving model): thread start-up dominates, and a loaded 2-core CI box makes
    them many times slower with several threads. Modules opt in with pytestmark."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
