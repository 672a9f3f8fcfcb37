"""YAML specs: load, validate and locate every error by file, line and field.

A spec names shared dimensions (`defaults`), the layers to profile (`layers`) and the sweep to run (`sweep`);
see `profiles/*.yaml` for examples. Loading composes the YAML node tree itself so that every value keeps its
line, duplicate keys are caught (PyYAML would silently keep the last one) and each layer is dry-built on
the meta device, so impossible dimensions fail at load time rather than mid-sweep.

The typed results are frozen pydantic models. To override fields (e.g. from CLI flags) use
`obj.replace(**changes)`, which re-validates the changed object:

    spec = spec.replace(sweep=spec.sweep.replace(seq=(512, 1024), modes=("fwd",)))
    spec = spec.replace(layers=tuple(layer.replace(dtype="bfloat16") for layer in spec.layers))

(`model_copy(update=...)` also works but skips validation.) Layer-level checks (registry, options, dry
build) run only in `load_spec`; `replace` checks field types and bounds.
"""

from __future__ import annotations

import importlib.resources
import inspect
import re
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError, field_validator
from typing_extensions import Self
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from ovqprof import registry
from ovqprof.capacity.settings import ProbeSettings
from ovqprof.distributed.settings import DistributedSettings
from ovqprof.errors import SpecError, UsageError
from ovqprof.layers.base import MODES, LayerConfigError
from ovqprof.ranges import SEQ_RANGE_FORMS, RangeError, parse_seq_value

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
DtypeName = Literal["float32", "float64", "float16", "bfloat16"]
ModeName = Literal["fwd", "bwd", "decode"]
TOP_KEYS = ("name", "description", "defaults", "layers", "sweep", "capacity", "distributed")
CAPACITY_KEYS = ("probe", "mqar")
# Keys of a layer entry that are not type-specific options.
LAYER_KEYS = ("name", "type", "d_model", "heads", "head_dim", "dtype")
DEFAULT_SEQ = "1k..8k"
_POSITIVE = "an integer >= 1"
_DTYPES_TEXT = ", ".join(DTYPES)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a spec dtype name (float32, float64, float16, bfloat16)."""
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}. Allowed: {_DTYPES_TEXT}.")
    return DTYPES[name]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes` applied and validated (pydantic ValidationError on bad values)."""
        return type(self).model_validate({**{k: getattr(self, k) for k in type(self).model_fields}, **changes})


# Field descriptions double as the "Allowed:" text of error messages.
class Defaults(_Frozen):
    """Dimensions and placement shared by all layers unless a layer overrides them."""

    batch: StrictInt = Field(1, ge=1, description=_POSITIVE)
    d_model: StrictInt = Field(ge=1, description=_POSITIVE)
    heads: StrictInt = Field(ge=1, description=_POSITIVE)
    head_dim: StrictInt = Field(ge=1, description=_POSITIVE)
    dtype: DtypeName = Field("float32", description=_DTYPES_TEXT)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$", description="auto, cpu, cuda, cuda:N")


class LayerSpec(_Frozen):
    """One layer to profile: resolved dimensions, its type-specific `options` and its line in the spec."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="a name of letters, digits, _ . -")
    type: str = Field(min_length=1, description=registry.allowed_types_text())
    d_model: StrictInt = Field(ge=1, description=_POSITIVE)
    heads: StrictInt = Field(ge=1, description=_POSITIVE)
    head_dim: StrictInt = Field(ge=1, description=_POSITIVE)
    dtype: DtypeName = Field(description=_DTYPES_TEXT)
    options: dict[str, Any] = Field(default_factory=dict)
    line: StrictInt = Field(0, ge=0, description="the 1-based line of the entry (0: unknown)")


class SweepSpec(_Frozen):
    """What to measure: sequence lengths x batch sizes x modes, with timing budgets in milliseconds."""

    seq: tuple[StrictInt, ...] = Field(min_length=1, description=SEQ_RANGE_FORMS)
    modes: tuple[ModeName, ...] = Field(
        MODES, min_length=1, description="a non-empty list of distinct modes from fwd, bwd, decode")
    batch: tuple[StrictInt, ...] = Field(min_length=1, description="an integer >= 1 or a list of them")
    warmup_ms: StrictFloat = Field(25.0, gt=0, allow_inf_nan=False, description="a number > 0")
    rep_ms: StrictFloat = Field(100.0, gt=0, allow_inf_nan=False, description="a number > 0")
    check_seq: StrictInt = Field(64, ge=2, description="an integer >= 2")

    @field_validator("modes")
    @classmethod
    def _distinct_modes(cls, modes: tuple[str, ...]) -> tuple[str, ...]:
        duplicate = next((mode for i, mode in enumerate(modes) if mode in modes[:i]), None)
        if duplicate is not None:
            raise ValueError(f"duplicate mode {duplicate!r}")
        return modes

    @field_validator("seq", "batch")
    @classmethod
    def _positive_sorted(cls, values: tuple[int, ...]) -> tuple[int, ...]:
        if any(v < 1 for v in values):
            raise ValueError("values must be >= 1")
        return tuple(sorted(set(values)))


class CapacitySpec(_Frozen):
    """The optional `capacity:` section: probe settings (validated here) and the MQAR mapping as written
    (validated by `ovqprof.capacity.mqar.MQARSettings` when `capacity --method mqar` runs; `mqar_lines`
    holds the line of each of its keys, and of the section itself under "", for messages)."""

    probe: ProbeSettings = Field(default_factory=ProbeSettings)
    mqar: dict[str, Any] | None = None
    mqar_lines: dict[str, int] = Field(default_factory=dict)


class Spec(_Frozen):
    """A validated spec; `file` is where it came from (for messages)."""

    file: str
    name: str
    description: str = ""
    defaults: Defaults
    layers: tuple[LayerSpec, ...] = Field(min_length=1)
    sweep: SweepSpec
    capacity: CapacitySpec = Field(default_factory=CapacitySpec)
    distributed: DistributedSettings | None = None  # None: no `distributed:` section (its defaults apply)


# --- YAML with line numbers --------------------------------------------------------------------------------
_MAP_TAG, _SEQ_TAG, _MERGE_TAG = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:merge"


def _field(path: tuple) -> str | None:
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    return text or None


class _Doc:
    """The Python value of a YAML text and the 1-based line of each key path, e.g. ("layers", 1, "kv_heads")."""

    def __init__(self, text: str, file: str):
        self.file = file
        self.lines: dict[tuple, int] = {}
        self._constructor = yaml.constructor.SafeConstructor()
        self._memo: dict[int, Any] = {}
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
            self.lines[()] = root.start_mark.line + 1 if root is not None else 1
            self.data = None if root is None else self._value(root, (), set())
        except yaml.YAMLError as exc:
            raise self._yaml_error(exc, text) from None
        except RecursionError:
            raise SpecError("YAML is nested too deeply (or has a recursive merge)", file=file) from None

    def _yaml_error(self, exc: yaml.YAMLError, text: str) -> SpecError:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        if isinstance(exc, yaml.reader.ReaderError):
            line = text[: exc.position].count("\n") + 1
            char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
            problem = f"unacceptable character {char}: {exc.reason}"
        else:
            context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
            if context and context_mark is not None and context_mark.line + 1 != line:
                context += f" started on line {context_mark.line + 1}"  # e.g. where an unclosed [ opened
            parts = [context, getattr(exc, "problem", None)]
            problem = ", ".join(p for p in parts if p) or str(exc).splitlines()[0]
        return SpecError(f"invalid YAML: {problem}", file=self.file, line=line)

    def line_of(self, path: tuple) -> int:
        """The line of `path`, or of its longest prefix that has one (values reached through an alias
        have no lines of their own)."""
        return next(self.lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in self.lines)

    def error(self, problem: str, path: tuple, value: Any = None, allowed: str | None = None,
              show_value: bool = True, line: int | None = None) -> SpecError:
        """A SpecError at `path`, on `line` or else the line of `path`."""
        return SpecError(problem, file=self.file, line=line or self.line_of(path), field=_field(path),
                         value=value, allowed=allowed, show_value=show_value)

    def _value(self, node: Any, path: tuple, active: set[int]) -> Any:
        if isinstance(node, ScalarNode):
            try:
                return self._constructor.construct_object(node)
            except (ValueError, TypeError, OverflowError) as exc:  # e.g. a 5000-digit int, a bad !!timestamp
                raise self.error(f"invalid YAML value: {exc}", path, node.value) from None
        if id(node) in self._memo:  # an alias: share the value like PyYAML does (no billion-laughs blow-up)
            return self._memo[id(node)]
        if id(node) in active:
            raise self.error("recursive YAML alias", path)
        if node.tag not in (_MAP_TAG, _SEQ_TAG):
            raise self.error(f"unsupported YAML tag {node.tag!r}", path, allowed="plain mappings and lists")
        active.add(id(node))
        if isinstance(node, SequenceNode):
            value: Any = []
            for i, item in enumerate(node.value):
                self.lines.setdefault(path + (i,), item.start_mark.line + 1)
                value.append(self._value(item, path + (i,), active))
        else:
            value = self._mapping(node, path, active)
        active.discard(id(node))
        self._memo[id(node)] = value
        return value

    def _key(self, key_node: Any, path: tuple) -> str:
        key = self._constructor.construct_object(key_node) if isinstance(key_node, ScalarNode) else None
        if not isinstance(key, str):
            raise self.error("mapping keys must be strings", path, getattr(key_node, "value", None),
                             show_value=isinstance(key_node, ScalarNode), line=key_node.start_mark.line + 1)
        return key

    def _mapping(self, node: MappingNode, path: tuple, active: set[int]) -> dict[str, Any]:
        first_line: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key, line = self._key(key_node, path), key_node.start_mark.line + 1
            if key in first_line:
                self.lines[path + (key,)] = line
                raise self.error(f"duplicate key {key!r} (first at line {first_line[key]})", path + (key,))
            first_line[key] = line
        # Merge keys (<<: *anchor) are expanded first; own keys follow them and so win, as in PyYAML.
        self._constructor.flatten_mapping(node)
        value: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = self._key(key_node, path)
            self.lines[path + (key,)] = key_node.start_mark.line + 1
            value[key] = self._value(value_node, path + (key,), active)
        return value


# --- validation ----------------------------------------------------------------------------------------------
def _raise_pydantic(doc: _Doc, exc: ValidationError, base: tuple, raw: Any, model: type[BaseModel],
                    use_description: bool, extra_allowed: str) -> None:
    """Turn the first pydantic error into a SpecError at the offending key's line."""
    err = exc.errors()[0]
    path, node = base, raw
    for part in err["loc"]:  # follow loc only as far as the raw data goes (drops union-member tags)
        if isinstance(node, dict) and isinstance(part, str):
            path, node = path + (part,), node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            path, node = path + (part,), node[part]
        else:
            break
    kind, ctx = err["type"], err.get("ctx") or {}
    field = model.model_fields.get(str(err["loc"][0])) if err["loc"] else None
    if kind == "extra_forbidden":
        noun = "key" if use_description else "option"  # only layer options skip the descriptions
        raise doc.error(f"unknown {noun} {path[-1]!r}", path, allowed=extra_allowed) from None
    if kind == "missing":
        raise doc.error("required key is missing", path, allowed=field.description if field else None) from None
    if use_description and field is not None and field.description:
        allowed = field.description
    elif kind == "literal_error":
        allowed = f"one of {ctx['expected']}"
    else:
        annotation = field.annotation if field is not None else None
        allowed = getattr(annotation, "__name__", None) if isinstance(annotation, type) else (
            str(annotation).replace("typing.", "") if annotation is not None else None)
        bounds = [f"{op} {ctx[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if k in ctx]
        if bounds:
            allowed = f"{allowed or 'a value'} {' and '.join(bounds)}"
    message = err["msg"].removeprefix("Value error, ")
    if kind == "string_pattern_mismatch":  # the regex itself means little to a user; the allowed text says it
        message = f"invalid {path[-1]}"
    raise doc.error(message[:1].lower() + message[1:], path, err.get("input"), allowed) from None


def _mapping_at(doc: _Doc, raw: Any, path: tuple, allowed_keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise doc.error("must be a mapping", path, raw, allowed="keys " + ", ".join(allowed_keys))
    for key in raw:
        if key not in allowed_keys:
            raise doc.error(f"unknown key {key!r}", path + (key,), allowed=", ".join(allowed_keys))
    return raw


def _validate(doc: _Doc, model: type[BaseModel], data: dict, base: tuple, raw: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        _raise_pydantic(doc, exc, base, raw, model, True, ", ".join(model.model_fields))


def _sweep(doc: _Doc, raw: Any, defaults: Defaults) -> SweepSpec:
    raw = _mapping_at(doc, {} if raw is None else raw, ("sweep",), tuple(SweepSpec.model_fields))
    data = dict(raw)
    try:
        data["seq"] = parse_seq_value(raw.get("seq", DEFAULT_SEQ))
    except RangeError as exc:
        raise doc.error(f"invalid sequence range: {exc.reason}", ("sweep", "seq"), raw.get("seq"),
                        SEQ_RANGE_FORMS) from None
    if isinstance(data.get("modes"), str):
        data["modes"] = [m.strip() for m in data["modes"].split(",")]
    data.setdefault("batch", defaults.batch)
    if isinstance(data["batch"], int) and not isinstance(data["batch"], bool):
        data["batch"] = [data["batch"]]
    return _validate(doc, SweepSpec, data, ("sweep",), raw)


def _capacity(doc: _Doc, raw: Any) -> CapacitySpec:
    """The `capacity:` section: `probe:` validated as ProbeSettings, `mqar:` kept as a raw mapping."""
    if raw is None:
        return CapacitySpec()
    raw = _mapping_at(doc, raw, ("capacity",), CAPACITY_KEYS)
    probe_raw = {} if raw.get("probe") is None else raw["probe"]
    probe_raw = _mapping_at(doc, probe_raw, ("capacity", "probe"), tuple(ProbeSettings.model_fields))
    probe = _validate(doc, ProbeSettings, probe_raw, ("capacity", "probe"), probe_raw)
    mqar = raw.get("mqar")
    if mqar is not None and not isinstance(mqar, dict):
        raise doc.error("must be a mapping", ("capacity", "mqar"), mqar, allowed="the MQAR settings (see README)")
    lines = {} if mqar is None else {"": doc.line_of(("capacity", "mqar")),
                                     **{key: doc.line_of(("capacity", "mqar", key)) for key in mqar}}
    return CapacitySpec(probe=probe, mqar=mqar, mqar_lines=lines)


def _distributed(doc: _Doc, raw: Any, layers: list[LayerSpec]) -> DistributedSettings | None:
    """The `distributed:` section, its `layer` and `ovq` names checked against the spec's layers."""
    if raw is None:
        return None
    raw = _mapping_at(doc, raw, ("distributed",), tuple(DistributedSettings.model_fields))
    settings = _validate(doc, DistributedSettings, raw, ("distributed",), raw)
    for key, wanted in (("layer", "softmax_attention"), ("ovq", "ovq")):
        name = getattr(settings, key)
        if name is None:
            continue
        match = next((layer for layer in layers if layer.name == name), None)
        if match is None or match.type != wanted or (key == "layer" and match.options.get("window")):
            names = [layer.name for layer in layers if layer.type == wanted and not
                     (key == "layer" and layer.options.get("window"))]
            raise doc.error(f"{name!r} is not a {wanted} layer of this spec" + (" without a window" if key ==
                            "layer" else ""), ("distributed", key), allowed=", ".join(names) or
                            f"none: add a {wanted} layer to `layers`", show_value=False)
    return settings


def _init_params(cls: type) -> str:
    try:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # [1:]: drop self
    except (TypeError, ValueError):
        return "unknown"
    return ", ".join(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) or "none"


def _import_dirs(file: str) -> tuple[str, ...]:
    """Where a spec's `module:Class` types are looked for besides sys.path: the spec file's folder (as a
    user expects of a file beside the spec), then the working directory."""
    folders = [str(Path(file).resolve().parent)] if file and not file.startswith("<") else []
    return tuple(dict.fromkeys([*folders, str(Path.cwd())]))


def _layer(doc: _Doc, i: int, raw: Any, defaults: Defaults) -> LayerSpec:
    path = ("layers", i)
    if not isinstance(raw, dict):
        raise doc.error("a layer must be a mapping with at least name and type", path, raw,
                        allowed="name, type, d_model, heads, head_dim, dtype and the type's options")
    options = {k: v for k, v in raw.items() if k not in LAYER_KEYS}
    data = {k: raw.get(k, getattr(defaults, k, None)) for k in LAYER_KEYS}
    data = {k: v for k, v in data.items() if v is not None or k in raw}
    spec = _validate(doc, LayerSpec, {**data, "options": options, "line": doc.line_of(path)}, path, raw)
    try:
        layer_type = registry.get_layer_type(spec.type, _import_dirs(doc.file))
    except registry.RegistryError as exc:
        raise doc.error(exc.problem, path + ("type",), spec.type, exc.allowed, show_value=False) from None
    except Exception as exc:  # whatever resolving user code raises is the spec's problem, not a crash
        raise doc.error(f"cannot resolve layer type: {type(exc).__name__}: {exc}", path + ("type",)) from None
    option_names = list(layer_type.cls.Options.model_fields) if layer_type.is_sequence_layer else []
    extra_allowed = f"options of {spec.type}: " + (", ".join(option_names) or "none")
    try:
        registry.validate_options(layer_type, options)
        with torch.device("meta"):  # builds no real weights, yet runs every dimension check
            registry.build_layer(layer_type, spec.d_model, spec.heads, spec.head_dim, options)
    except ValidationError as exc:
        _raise_pydantic(doc, exc, path, options, layer_type.cls.Options if layer_type.is_sequence_layer
                        else BaseModel, False, extra_allowed)
    except LayerConfigError as exc:
        key, problem, value, allowed = exc.field, exc.problem, exc.value, exc.allowed
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", exc.problem)
        if key == "options" and unexpected:  # constructor TypeError of a plain nn.Module: point at the key
            key, problem, value = unexpected.group(1), "unknown option", options.get(unexpected.group(1))
            allowed = f"keyword arguments of {layer_type.cls.__name__}: " + _init_params(layer_type.cls)
        # A dimension taken from `defaults` has no line in this entry: point at the entry itself.
        line = None if key in raw else doc.line_of(path)
        raise doc.error(problem, path + (key,), value, allowed, line=line) from None
    except Exception as exc:  # a user constructor may raise anything: report it, don't crash
        raise doc.error(f"layer {spec.name!r} of type {spec.type} failed to build: {type(exc).__name__}: {exc}",
                        path) from None
    return spec


def load_spec_text(text: str, file: str = "<string>") -> Spec:
    """Parse and validate spec text; every problem raises SpecError naming file, line and field."""
    doc = _Doc(text, file)
    raw = doc.data
    if raw is None:
        raise SpecError("the spec is empty", file=file, allowed="a mapping with keys " + ", ".join(TOP_KEYS))
    raw = _mapping_at(doc, raw, (), TOP_KEYS)
    for key in ("defaults", "layers"):
        if key not in raw:
            raise doc.error(f"required key {key!r} is missing", (), allowed="keys " + ", ".join(TOP_KEYS))
    name = raw.get("name", Path(file).stem)
    description = "" if raw.get("description") is None else raw["description"]
    if not isinstance(name, str) or not name.strip():
        raise doc.error("must be a non-empty string", ("name",), name)
    if not isinstance(description, str):
        raise doc.error("must be a string", ("description",), description)
    raw_defaults = _mapping_at(doc, raw["defaults"], ("defaults",), tuple(Defaults.model_fields))
    defaults = _validate(doc, Defaults, raw_defaults, ("defaults",), raw_defaults)
    sweep = _sweep(doc, raw.get("sweep"), defaults)
    raw_layers = raw["layers"]
    if not isinstance(raw_layers, list) or not raw_layers:
        raise doc.error("must be a non-empty list of layers", ("layers",), raw_layers,
                        allowed="a list of mappings with name and type")
    layers: list[LayerSpec] = []
    for i, entry in enumerate(raw_layers):
        layer = _layer(doc, i, entry, defaults)
        for j, other in enumerate(layers):
            if other.name == layer.name:
                raise doc.error(f"duplicate layer name {layer.name!r} (first at line {doc.line_of(('layers', j))})",
                                ("layers", i, "name"), allowed="names unique within the spec", show_value=False)
        layers.append(layer)
    capacity = _capacity(doc, raw.get("capacity"))
    distributed = _distributed(doc, raw.get("distributed"), layers)
    return Spec(file=file, name=name, description=description, defaults=defaults, layers=tuple(layers),
                sweep=sweep, capacity=capacity, distributed=distributed)


def load_spec(path: str | Path) -> Spec:
    """Read and validate the spec at `path` (SpecError if unreadable or invalid)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from Windows editors
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SpecError(f"cannot read spec file: {reason}", file=str(path)) from None
    return load_spec_text(text, file=str(path))


# --- profiles --------------------------------------------------------------------------------------------------
def _packaged_profiles() -> Any:
    try:
        return importlib.resources.files("ovqprof.profiles")
    except (ModuleNotFoundError, TypeError):  # not installed with profiles (e.g. a bare source checkout)
        return None


def available_profiles() -> list[str]:
    """Names of the profiles in ./profiles and in the installed package."""
    names = {p.stem for p in Path("profiles").glob("*.yaml")}
    packaged = _packaged_profiles()
    if packaged is not None:
        names.update(p.name[: -len(".yaml")] for p in packaged.iterdir() if p.name.endswith(".yaml"))
    return sorted(names)


def resolve_profile(name_or_path: str) -> Path:
    """An existing path as is; a bare name `quick` as ./profiles/quick.yaml, else the installed copy.

    Raises UsageError listing the available profile names when neither exists.
    """
    path = Path(name_or_path)
    if path.exists():
        return path
    name = name_or_path.removesuffix(".yaml")
    if re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        local = Path("profiles") / f"{name}.yaml"
        if local.is_file():
            return local
        packaged = _packaged_profiles()
        if packaged is not None and (packaged / f"{name}.yaml").is_file():
            return Path(str(packaged / f"{name}.yaml"))
    available = ", ".join(available_profiles()) or "none installed"
    raise UsageError(f"no spec file or profile named {name_or_path!r}. "
                     f"Allowed: a path to a YAML spec or a profile name ({available}).")


def profile_label(path: str | Path) -> str:
    """How a result header names its spec: `profiles/NAME.yaml` for a packaged profile, a path relative to the
    working directory when the file is under it, else the path as given (no machine paths for the common
    cases, so result files can be shared and committed)."""
    path = Path(path)
    packaged = _packaged_profiles()
    try:
        if packaged is not None and path.resolve().parent == Path(str(packaged)).resolve():
            return f"profiles/{path.name}"
        if path.is_absolute():
            return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (OSError, ValueError):  # not under the working directory
        pass
    return str(path)
