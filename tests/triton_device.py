"""Shared test helper: where the OVQ Triton kernel tests run, or a skip of the whole module when they cannot."""

from __future__ import annotations

import os

import pytest
import torch


def kernel_device() -> str:
    """'cuda' with a GPU, else 'cpu' (Triton's interpreter, which tests/conftest.py selects before any kernel
    module is imported). Call at module level, before importing kernel modules: it skips the calling module
    when triton is missing, or when there is no GPU and TRITON_INTERPRET is not 1."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1: Triton kernels cannot run", allow_module_level=True)
    return device
