"""Test-session setup shared by every test module."""

import os

import pytest
import torch

# Without a GPU, Triton kernels run on the CPU through Triton's interpreter. It must be chosen before any
# kernel module is imported (kernels are decorated at import time), hence here and not in a fixture.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny tensors (restored after): with two, a busy neighbour process can
    stall torch's thread barrier and make a tiny CPU kernel 100x slower. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`, or as an argument of one test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
