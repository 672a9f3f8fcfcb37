"""Test-session setup shared by every test module."""

import os

import torch

# Without a GPU, Triton kernels run on the CPU through Triton's interpreter. It must be chosen before any
# kernel module is imported (kernels are decorated at import time), hence here and not in a fixture.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
