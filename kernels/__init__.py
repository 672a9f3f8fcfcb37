"""Triton kernels, installed as `ovqprof.kernels`.

One package per operation; today `ovq/`, OVQ-attention's core: its Triton kernels, their autograd Function
and, beside them, the PyTorch reference that defines the math and is what CPU runs use. Importing this
package (or `ovq/`'s config and reference) loads no Triton: only the kernel modules do.
"""
