"""nn.Module layers behind one interface (`SequenceLayer`), installed as `ovqprof.layers`."""

from .base import MODES, Cost, LayerConfigError, LayerOptions, SequenceLayer, tensor_bytes

__all__ = ["MODES", "Cost", "LayerConfigError", "LayerOptions", "SequenceLayer", "tensor_bytes"]
