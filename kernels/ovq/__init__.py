"""OVQ-attention (online vector-quantised attention) core: configuration, PyTorch reference, kernels.

`reference` defines the math (CPU path and ground truth); Triton kernels beside it must match it.
"""

from .config import OVQConfig, active_after, growth_target, spawn_count
from .reference import OVQState, empty_state, ovq_chunked, ovq_step

__all__ = ["OVQConfig", "OVQState", "active_after", "empty_state", "growth_target", "ovq_chunked", "ovq_step",
           "spawn_count"]
