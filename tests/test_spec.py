"""Spec loading: every malformed spec under tests/specs/ fails with a located, one-line SpecError."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ovqprof import spec as spec_module
from ovqprof.errors import SpecError, UsageError
from ovqprof.spec import (
    Defaults,
    LayerSpec,
    Spec,
    SweepSpec,
    load_spec,
    load_spec_text,
    resolve_profile,
    torch_dtype,
)

TESTS = Path(__file__).parent
SPECS = TESTS / "specs"


@pytest.fixture(autouse=True)
def _custom_layers_importable(monkeypatch):
    # tests/ is not a package: make `custom_layers:...` import paths resolvable.
    monkeypatch.syspath_prepend(str(TESTS))


# (file, line, field, fragments that must appear in the message)
MALFORMED = [
    ("yaml_syntax_error.yaml", 5, None, ["invalid YAML", "flow sequence started on line 4"]),
    ("d_model_not_int.yaml", 2, "defaults.d_model", ["valid integer", "'256'", "Allowed: an integer >= 1"]),
    ("negative_heads.yaml", 3, "defaults.heads", ["greater than or equal to 1", "-4", "an integer >= 1"]),
    ("unknown_top_key.yaml", 9, "sweeps", ["unknown key 'sweeps'", "name, description, defaults, layers, sweep"]),
    ("unknown_defaults_key.yaml", 5, "defaults.batch_size",
     ["unknown key 'batch_size'", "batch, d_model, heads, head_dim, dtype, device"]),
    ("missing_defaults_key.yaml", 1, "defaults.head_dim", ["required key is missing"]),
    ("unknown_layer_type.yaml", 9, "layers[1].type",
     ["unknown layer type 'flash_attention'", "linear_attention, mamba2", "ovq, retnet, softmax_attention",
      "package.module:Class"]),
    ("unknown_option.yaml", 8, "layers[0].kv_head", ["unknown option 'kv_head'", "options of softmax_attention: kv_heads, window"]),
    ("wrong_option_type.yaml", 9, "layers[0].chunk_size", ["valid integer", "'big'", "Allowed: int"]),
    ("bad_option_value.yaml", 8, "layers[0].eps", ["greater than 0", "> 0"]),
    ("kv_heads_not_dividing.yaml", 10, "layers[1].kv_heads", ["must divide heads=4", "(got 3)", "1, 2, 4"]),
    ("unknown_dtype.yaml", 5, "defaults.dtype", ["'fp8'", "float32, float64, float16, bfloat16"]),
    ("layer_dtype_override_bad.yaml", 8, "layers[0].dtype", ["'int8'", "bfloat16"]),
    ("bad_device.yaml", 5, "defaults.device", ["invalid device", "'gpu'", "auto, cpu, cuda, cuda:N"]),
    ("empty_layers.yaml", 5, "layers", ["non-empty list"]),
    ("duplicate_layer_names.yaml", 8, "layers[1].name", ["duplicate layer name 'attn'", "first at line 6"]),
    ("duplicate_yaml_key.yaml", 9, "layers[0].window", ["duplicate key 'window'", "first at line 8"]),
    ("bad_seq_range.yaml", 10, "sweep.seq", ["start 8192 is greater than end 1024", "'8k..1k'", "1k..64k"]),
    ("unknown_mode.yaml", 12, "sweep.modes[1]", ["'backward'", "fwd, bwd, decode"]),
    ("duplicate_mode.yaml", 9, "sweep.modes", ["duplicate mode 'fwd'"]),
    ("bad_warmup.yaml", 9, "sweep.warmup_ms", ["greater than 0", "-5"]),
    ("import_fails.yaml", 7, "layers[0].type", ["cannot import module 'no_such_package_xyz.layers'"]),
    ("import_not_module.yaml", 7, "layers[0].type", ["not a torch.nn.Module subclass"]),
    ("custom_constructor_fails.yaml", 6, "layers[0]",
     ["layer 'broken'", "failed to build", "RuntimeError: broken on purpose"]),
    ("custom_unknown_kwarg.yaml", 9, "layers[0].dropout", ["unknown option", "0.1", "d_model, bias"]),
    ("custom_groups_not_dividing.yaml", 9, "layers[0].groups", ["must divide heads (6)", "a divisor of 6"]),
    ("top_level_list.yaml", 1, None, ["must be a mapping", "defaults, layers"]),
    ("empty.yaml", None, None, ["the spec is empty"]),
    ("layer_missing_type.yaml", 6, "layers[0].type", ["required key is missing"]),
    ("bad_layer_name.yaml", 6, "layers[0].name", ["invalid name", "'my layer'", "letters, digits"]),
]


def test_every_spec_file_is_covered():
    assert sorted(p.name for p in SPECS.glob("*.yaml")) == sorted(case[0] for case in MALFORMED)


@pytest.mark.parametrize(("file", "line", "field", "fragments"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_spec(file, line, field, fragments):
    path = SPECS / file
    with pytest.raises(SpecError) as info:
        load_spec(path)
    err, message = info.value, str(info.value)
    assert (err.file, err.line, err.field) == (str(path), line, field), message
    where = f"{path}" + (f", line {line}" if line else "") + (f", field {field}" if field else "")
    assert message.startswith(where + ": "), message
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message


VALID = """\
name: demo
description: two layers
defaults:
  batch: 2
  d_model: 128
  heads: 4
  head_dim: 32
  dtype: bfloat16
  device: cpu
layers:
  - name: gqa
    type: softmax_attention
    kv_heads: 2
  - name: lin.big
    type: linear_attention
    heads: 8
    head_dim: 16
    dtype: float32
    feature_map: identity
    normalize: false
sweep:
  seq: 256..1k, 3k
  modes: [decode, fwd]
  batch: [4, 1, 4]
  warmup_ms: 10
  rep_ms: 50.5
  check_seq: 16
"""


def test_valid_spec_loads_typed_values():
    spec = load_spec_text(VALID, file="demo.yaml")
    assert isinstance(spec, Spec)
    assert (spec.file, spec.name, spec.description) == ("demo.yaml", "demo", "two layers")
    assert spec.defaults == Defaults(batch=2, d_model=128, heads=4, head_dim=32, dtype="bfloat16", device="cpu")
    gqa, lin = spec.layers
    assert gqa == LayerSpec(name="gqa", type="softmax_attention", d_model=128, heads=4, head_dim=32,
                            dtype="bfloat16", options={"kv_heads": 2}, line=11)
    assert lin == LayerSpec(name="lin.big", type="linear_attention", d_model=128, heads=8, head_dim=16,
                            dtype="float32", options={"feature_map": "identity", "normalize": False}, line=14)
    assert spec.sweep == SweepSpec(seq=(256, 512, 1024, 3072), modes=("decode", "fwd"), batch=(1, 4),
                                   warmup_ms=10.0, rep_ms=50.5, check_seq=16)


def test_minimal_spec_defaults():
    spec = load_spec_text("defaults: {d_model: 64, heads: 2, head_dim: 32}\n"
                          "layers: [{name: a, type: softmax_attention}]\n", file="some/dir/minimal.yaml")
    assert spec.name == "minimal" and spec.description == ""
    assert (spec.defaults.batch, spec.defaults.dtype, spec.defaults.device) == (1, "float32", "auto")
    assert spec.layers[0].options == {} and spec.layers[0].line == 2
    assert spec.sweep == SweepSpec(seq=(1024, 2048, 4096, 8192), modes=("fwd", "bwd", "decode"), batch=(1,),
                                   warmup_ms=25.0, rep_ms=100.0, check_seq=64)


def test_sweep_batch_defaults_to_defaults_batch_and_modes_accept_a_string():
    spec = load_spec_text("defaults: {d_model: 64, heads: 2, head_dim: 32, batch: 3}\n"
                          "layers: [{name: a, type: softmax_attention}]\nsweep: {modes: 'fwd, bwd', seq: 64}\n")
    assert (spec.sweep.batch, spec.sweep.modes, spec.sweep.seq) == ((3,), ("fwd", "bwd"), (64,))


def test_per_layer_overrides_apply_only_to_that_layer():
    spec = load_spec_text("""\
defaults: {d_model: 256, heads: 4, head_dim: 64, dtype: float16}
layers:
  - {name: base, type: softmax_attention}
  - {name: wide, type: softmax_attention, d_model: 512, heads: 8, head_dim: 32, dtype: float64, kv_heads: 8}
""")
    base, wide = spec.layers
    assert (base.d_model, base.heads, base.head_dim, base.dtype) == (256, 4, 64, "float16")
    assert (wide.d_model, wide.heads, wide.head_dim, wide.dtype) == (512, 8, 32, "float64")
    assert wide.options == {"kv_heads": 8}


def test_override_changes_dry_build_dimensions():
    # kv_heads=8 divides the layer's own heads (8) but not the default (4): overrides reach the dry build.
    text = "defaults: {d_model: 256, heads: 4, head_dim: 64}\nlayers:\n  - {name: a, type: softmax_attention, kv_heads: 8}\n"
    with pytest.raises(SpecError, match="must divide heads=4") as info:
        load_spec_text(text)
    assert (info.value.line, info.value.field) == (3, "layers[0].kv_heads")
    load_spec_text(text.replace("kv_heads: 8", "heads: 8, kv_heads: 8"))


def test_import_path_layers_load():
    spec = load_spec_text("""\
defaults: {d_model: 64, heads: 4, head_dim: 16}
layers:
  - name: tiny
    type: custom_layers:TinyMixer
    groups: 2
    scale: 0.5
  - name: plain
    type: custom_layers:PlainMixer
    bias: false
""")
    tiny, plain = spec.layers
    assert (tiny.type, tiny.options) == ("custom_layers:TinyMixer", {"groups": 2, "scale": 0.5})
    assert (plain.type, plain.options) == ("custom_layers:PlainMixer", {"bias": False})


def test_dimension_from_defaults_points_at_the_layer_entry():
    with pytest.raises(SpecError) as info:
        load_spec_text("defaults: {d_model: 64, heads: 6, head_dim: 16}\nlayers:\n"
                       "  - name: tiny\n    type: custom_layers:TinyMixer\n    groups: 4\n")
    assert (info.value.line, info.value.field) == (5, "layers[0].groups")


def test_merge_keys_and_aliases():
    spec = load_spec_text("""\
defaults: &dims {d_model: 64, heads: 4, head_dim: 16}
layers:
  - &gqa {name: a, type: softmax_attention, kv_heads: 2}
  - {<<: *gqa, name: b}
""")
    assert [(layer.name, layer.options) for layer in spec.layers] == [("a", {"kv_heads": 2}), ("b", {"kv_heads": 2})]


@pytest.mark.parametrize(("text", "line", "fragment"), [
    ("defaults: {d_model: 1}\n---\nlayers: []\n", 2, "single document"),
    ("a: &x [*x]\n", 1, "recursive YAML alias"),
    ("defaults: !!set {a, b}\n", 1, "unsupported YAML tag"),
    ("? [1, 2]\n: 3\n", 1, "keys must be strings"),
    ("defaults:\n  1: 2\n", 2, "keys must be strings"),
    ("defaults: {d_model: !!int abc}\n", 1, "invalid YAML value"),
    ("a: \x07\n", 1, "unacceptable character"),
    ("name: [x]\ndefaults: {}\nlayers: []\n", 1, "non-empty string"),
])
def test_yaml_edge_cases(text, line, fragment):
    with pytest.raises(SpecError, match=fragment) as info:
        load_spec_text(text, file="edge.yaml")
    assert info.value.line == line and str(info.value).startswith("edge.yaml")


def test_unreadable_files(tmp_path):
    for path in (tmp_path / "missing.yaml", tmp_path):
        with pytest.raises(SpecError, match="cannot read spec file") as info:
            load_spec(path)
        assert info.value.file == str(path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(SpecError, match="cannot read spec file"):
        load_spec(bad)


def test_replace_validates_and_model_copy_does_not():
    spec = load_spec_text(VALID)
    changed = spec.replace(sweep=spec.sweep.replace(seq=(2048, 512, 512), modes=("fwd",)))
    assert changed.sweep.seq == (512, 2048) and changed.sweep.modes == ("fwd",)
    assert spec.sweep.modes == ("decode", "fwd")  # the original is untouched
    retyped = spec.replace(layers=tuple(layer.replace(dtype="float16") for layer in spec.layers))
    assert {layer.dtype for layer in retyped.layers} == {"float16"}
    with pytest.raises(ValidationError):
        spec.sweep.replace(modes=("sideways",))
    with pytest.raises(ValidationError):
        spec.defaults.replace(heads=0)
    with pytest.raises(ValidationError):  # frozen
        spec.defaults.heads = 3  # type: ignore[misc]


def test_torch_dtype():
    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype("float64") is torch.float64
    with pytest.raises(UsageError, match="float32, float64, float16, bfloat16"):
        torch_dtype("fp8")


def test_resolve_profile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "quick.yaml").write_text("x: 1\n")
    packaged = tmp_path / "pkg"
    packaged.mkdir()
    (packaged / "full.yaml").write_text("x: 2\n")
    monkeypatch.setattr(spec_module, "_packaged_profiles", lambda: packaged)
    assert resolve_profile("quick") == Path("profiles/quick.yaml")
    assert resolve_profile("quick.yaml") == Path("profiles/quick.yaml")
    assert resolve_profile("full") == packaged / "full.yaml"
    (tmp_path / "mine.yml").write_text("x: 3\n")
    assert resolve_profile("mine.yml") == Path("mine.yml")
    with pytest.raises(UsageError) as info:
        resolve_profile("nosuch")
    assert "'nosuch'" in str(info.value) and "full, quick" in str(info.value)


def test_resolve_profile_without_packaged_profiles(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(spec_module, "_packaged_profiles", lambda: None)
    with pytest.raises(UsageError, match="none installed"):
        resolve_profile("quick")


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_text_loads_or_raises_spec_error(text):
    try:
        load_spec_text(text)
    except SpecError as err:
        assert "\n" not in str(err)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=12), st.lists(st.integers(-2, 5000), max_size=3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([("name",), ("defaults", "d_model"), ("defaults", "heads"), ("defaults", "dtype"),
                        ("defaults", "device"), ("layers", 0, "kv_heads"), ("layers", 0, "type"),
                        ("layers", 1, "chunk_size"), ("layers", 1, "heads"), ("layers", 1, "eps"),
                        ("layers", 1, "name"), ("sweep", "seq"), ("sweep", "modes"), ("sweep", "batch"),
                        ("sweep", "rep_ms"), ("sweep", "check_seq"), ("layers", 0), ("sweep",)]), _scalars)
def test_mutated_valid_spec_loads_or_raises_spec_error(path, value):
    raw = yaml.safe_load(VALID)
    target = raw
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    try:
        load_spec_text(yaml.safe_dump(raw))
    except SpecError as err:
        assert err.line is not None and err.field is not None


@pytest.mark.parametrize("profile", sorted(p.stem for p in (TESTS.parent / "profiles").glob("*.yaml")))
def test_shipped_profiles_resolve_by_name_and_load(profile, monkeypatch):
    monkeypatch.chdir(TESTS.parent)
    path = resolve_profile(profile)
    assert path == Path("profiles") / f"{profile}.yaml"
    assert load_spec(path).name


def test_profile_label_names_packaged_and_local_profiles_without_machine_paths(tmp_path, monkeypatch):
    from ovqprof.spec import profile_label, resolve_profile

    monkeypatch.chdir(tmp_path)  # no ./profiles here: `quick` resolves to the installed copy
    assert profile_label(resolve_profile("quick")) == "profiles/quick.yaml"
    (tmp_path / "sub").mkdir()
    mine = tmp_path / "sub" / "mine.yaml"
    mine.write_text("x")
    assert profile_label(mine) == "sub/mine.yaml"
    assert profile_label("sub/mine.yaml") == "sub/mine.yaml"
    elsewhere = tmp_path.parent / "elsewhere.yaml"
    assert profile_label(elsewhere) == str(elsewhere)
