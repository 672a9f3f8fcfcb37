"""OVQConfig (the core's options, kernels/ovq/config.py) and OVQOptions (the layer's, what specs validate)
declare each core option once: these fail if the two drift apart in names, types, defaults or ranges."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pydantic
import pytest

from ovqprof.kernels.ovq import OVQConfig
from ovqprof.kernels.ovq.config import option_specs
from ovqprof.layers.ovq import OVQOptions

# Options of the layer around the core, not of the algorithm (beta is a tensor, possibly learned).
LAYER_ONLY = {"beta", "learn_beta", "impl", "triton_variant", "dict_precision"}


def test_every_config_option_is_a_layer_option_with_the_same_default_type_and_description():
    config_fields = {f.name: f for f in dataclasses.fields(OVQConfig)}
    assert set(OVQOptions.model_fields) - LAYER_ONLY == set(config_fields)
    for spec in option_specs():
        field = OVQOptions.model_fields[spec.name]
        assert field.get_default() == config_fields[spec.name].default == getattr(OVQConfig(), spec.name)
        assert field.annotation == spec.annotation, spec.name
        assert field.description == spec.description and spec.description, spec.name


def test_default_options_select_the_default_config():
    assert OVQOptions().core_config() == OVQConfig()
    chosen = OVQOptions(dict_size=8, chunk_size=4, growth="dp", alpha=2.0, lr="constant", eta=0.5)
    assert chosen.core_config() == OVQConfig(dict_size=8, chunk_size=4, growth="dp", alpha=2.0, lr="constant",
                                             eta=0.5)


def _edges(bounds: dict[str, float]) -> tuple[list[float], list[float]]:
    """(values just inside, values just outside) the bounds of an option (ge, gt and le)."""
    inside = {"ge": lambda b: b, "gt": lambda b: b + 1e-3, "le": lambda b: b}
    outside = {"ge": lambda b: b - 1, "gt": lambda b: b, "le": lambda b: b + 0.5}
    return ([inside[kind](b) for kind, b in bounds.items()], [outside[kind](b) for kind, b in bounds.items()])


@pytest.mark.parametrize("spec", [s for s in option_specs() if s.bounds], ids=lambda s: s.name)
def test_both_accept_and_refuse_the_same_values_at_each_bound(spec):
    inside, outside = _edges(spec.bounds)
    for value in inside:
        value = spec.annotation(value)
        assert getattr(OVQOptions(**{spec.name: value}).core_config(), spec.name) == value
        assert getattr(OVQConfig(**{spec.name: value}), spec.name) == value
    for value in outside:
        value = spec.annotation(value)
        with pytest.raises(pydantic.ValidationError):
            OVQOptions(**{spec.name: value})
        with pytest.raises(ValueError, match=spec.name):
            OVQConfig(**{spec.name: value})


def test_the_layer_module_loads_without_triton():
    # Specs, `ovqprof layers` and CPU runs import the layer; Triton loads only when a kernel runs.
    code = "import sys, ovqprof.layers.ovq; print('triton' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"
