"""Layer types by name: built-ins and user classes given as an import path `package.module:Class`.

Built-ins are listed here as import paths so that `ovqprof layers` and spec validation never import
more than they need, and layers never depend on the tool.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from ovqprof.layers.base import Cost, LayerConfigError, LayerOptions, SequenceLayer

BUILTIN_LAYERS: dict[str, str] = {
    "softmax_attention": "ovqprof.layers.softmax_attention:SoftmaxAttention",
    "linear_attention": "ovqprof.layers.linear_attention:LinearAttention",
    "ovq": "ovqprof.layers.ovq:OVQAttention",
    "transformer_vq": "ovqprof.layers.transformer_vq:TransformerVQ",
    "mka": "ovqprof.layers.mka:MKA",
    "fast_mka": "ovqprof.layers.mka:FastMKA",
    "gla": "ovqprof.layers.gla:GLA",
    "mamba2": "ovqprof.layers.mamba2:Mamba2",
    "delta_net": "ovqprof.layers.delta_net:DeltaNet",
    "gated_delta_net": "ovqprof.layers.delta_net:GatedDeltaNet",
    "retnet": "ovqprof.layers.retnet:RetNet",
    "mla": "ovqprof.layers.mla:MultiHeadLatentAttention",
    "bank_of_values": "ovqprof.layers.bank_of_values:BankOfValues",
    "cca": "ovqprof.layers.cca:CompressedConvAttention",
    "ccgqa": "ovqprof.layers.cca:CompressedConvGQA",
}


class RegistryError(Exception):
    """A layer type that cannot be resolved; `allowed` says what would be accepted."""

    def __init__(self, problem: str, allowed: str):
        self.problem = problem
        self.allowed = allowed
        super().__init__(f"{problem}. Allowed: {allowed}")


@dataclass(frozen=True)
class LayerType:
    """A resolvable layer type: its registered name (or import path) and class."""

    name: str
    cls: type

    @property
    def is_sequence_layer(self) -> bool:
        return isinstance(self.cls, type) and issubclass(self.cls, SequenceLayer)

    @property
    def kind(self) -> str:
        return self.cls.kind if self.is_sequence_layer else "custom"

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.cls) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def option_table(self) -> list[tuple[str, str, str, str]]:
        """(option, type, default, description) for each option of a SequenceLayer type."""
        if not self.is_sequence_layer:
            return []
        rows = []
        for fname, field in self.cls.Options.model_fields.items():
            plain = typing.get_origin(field.annotation) is None and hasattr(field.annotation, "__name__")
            annotation = field.annotation.__name__ if plain else str(field.annotation).replace("typing.", "")
            default = "required" if field.is_required() else repr(field.get_default())
            rows.append((fname, annotation, default, field.description or ""))
        return rows


def allowed_types_text() -> str:
    return ", ".join(sorted(BUILTIN_LAYERS)) + ", or an import path package.module:Class"


def _import_module(module_name: str, search_dirs: tuple[str, ...]):
    """Import `module_name` from sys.path, else from the first of `search_dirs` (the spec's folder, the
    working directory) that holds its top-level package or module; that folder then stays on sys.path so
    isolated workers (which inherit it) import it too."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.split(".")[0]
        if exc.name != top:
            raise
        for folder in search_dirs:
            base = Path(folder)
            if (base / top).is_dir() or (base / f"{top}.py").is_file():
                if folder not in sys.path:
                    sys.path.insert(0, folder)
                return importlib.import_module(module_name)
        raise


def _import_class(path: str, search_dirs: tuple[str, ...] = ()) -> type:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise RegistryError(f"import path {path!r} is not of the form package.module:Class", allowed_types_text())
    try:
        module = _import_module(module_name, search_dirs)
    except Exception as exc:  # any failure while importing user code is a spec error, not a crash
        places = ", ".join(["sys.path (PYTHONPATH)", *search_dirs])
        raise RegistryError(
            f"cannot import module {module_name!r} ({type(exc).__name__}: {exc}); looked in {places}",
            "an importable module beside the spec file, in the working directory or on PYTHONPATH",
        ) from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RegistryError(f"module {module_name!r} has no attribute {part!r}", "an existing class name")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise RegistryError(f"{path!r} is not a torch.nn.Module subclass", "a class deriving from torch.nn.Module")
    return obj


def get_layer_type(name: str, search_dirs: tuple[str, ...] = ()) -> LayerType:
    """Resolve a type name or import path (`package.module:Class`, looked up on sys.path, then in
    `search_dirs`); raises RegistryError naming what is allowed."""
    if name in BUILTIN_LAYERS:
        return LayerType(name, _import_class(BUILTIN_LAYERS[name]))
    if ":" in name:
        return LayerType(name, _import_class(name, search_dirs))
    raise RegistryError(f"unknown layer type {name!r}", allowed_types_text())


def all_layer_types() -> list[LayerType]:
    return [get_layer_type(name) for name in sorted(BUILTIN_LAYERS)]


class ModuleAdapter(SequenceLayer):
    """Wraps a user nn.Module with only `forward(x[B, T, D])`: fwd and bwd modes run, decode is skipped,
    and work counts are unknown (null) unless the module defines `cost`/`state_bytes` itself."""

    kind = "custom"
    supports_decode = False
    supports_cuda_graph = False

    def __init__(self, module: nn.Module, d_model: int, heads: int, head_dim: int):
        super().__init__(d_model, heads, head_dim)
        self.module = module
        self.supports_decode = callable(getattr(module, "prefill", None)) and callable(getattr(module, "step", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def prefill(self, x: torch.Tensor, capacity: int | None = None):
        return self.module.prefill(x, capacity) if _accepts(self.module.prefill, "capacity") else self.module.prefill(x)

    def step(self, x_t: torch.Tensor, state: Any):
        return self.module.step(x_t, state)

    def state_bytes(self, batch: int, seq: int) -> int | None:
        fn = getattr(self.module, "state_bytes", None)
        return fn(batch, seq) if callable(fn) else None

    def cost(self, mode: str, batch: int, seq: int) -> Cost | None:
        fn = getattr(self.module, "cost", None)
        return fn(mode, batch, seq) if callable(fn) else None

    def implementation(self) -> str:
        return f"custom:{type(self.module).__qualname__}"


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def build_layer(layer_type: LayerType, d_model: int, heads: int, head_dim: int, options: dict[str, Any]) -> SequenceLayer:
    """Construct a layer on the current default device.

    SequenceLayer types get (d_model, heads, head_dim, Options(**options)); other modules get their options as
    keyword arguments, plus d_model / heads / head_dim where their constructor takes them.
    Raises pydantic.ValidationError for bad options and LayerConfigError for impossible dimensions.
    """
    cls = layer_type.cls
    if layer_type.is_sequence_layer:
        opts: LayerOptions = cls.Options(**options)
        return cls(d_model, heads, head_dim, opts)
    kwargs = dict(options)
    for key, value in (("d_model", d_model), ("heads", heads), ("head_dim", head_dim)):
        if _accepts(cls.__init__, key) and key not in kwargs:
            kwargs[key] = value
    try:
        module = cls(**kwargs)
    except TypeError as exc:
        raise LayerConfigError("options", f"constructor of {layer_type.name} rejected the options: {exc}",
                               options, "the keyword arguments its __init__ accepts") from exc
    return ModuleAdapter(module, d_model, heads, head_dim)


def validate_options(layer_type: LayerType, options: dict[str, Any]) -> BaseModel | None:
    """Validate options without building weights (pydantic only); None for non-SequenceLayer types."""
    if layer_type.is_sequence_layer:
        return layer_type.cls.Options(**options)
    return None
