"""Triton kernels, installed as `ovqprof.kernels`.

One operation per file, each with its autograd Function and, beside it, the PyTorch reference that
defines the math and is what CPU runs use. The OVQ-attention kernels land here (see the issues).
"""
