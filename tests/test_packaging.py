"""The wheel maps kernels/ and layers/ to ovqprof.kernels and ovqprof.layers, never to top-level packages,
and ships the profiles; both subpackages import from an installed (non-editable) wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (whl,) = out.glob("ovqprof-*.whl")
    return whl


def test_wheel_maps_kernels_and_layers_under_ovqprof(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "ovqprof/layers/base.py" in names
    assert "ovqprof/kernels/__init__.py" in names
    # every subpackage ships (a missing one only shows up outside an editable install)
    for module in ("ovqprof/measure/timing.py", "ovqprof/kernels/ovq/reference.py", "ovqprof/layers/ovq.py"):
        assert module in names, module
    assert "ovqprof/profiles/quick.yaml" in names and "ovqprof/profiles/default.yaml" in names
    top_level = {n.split("/")[0] for n in names}
    assert "kernels" not in top_level and "layers" not in top_level and "tests" not in top_level


def test_installed_wheel_imports_both_subpackages(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    code = (
        "import importlib.util, ovqprof.layers, ovqprof.kernels, ovqprof.registry, ovqprof.cli, ovqprof.layers.ovq\n"
        "print(ovqprof.layers.__file__); print(ovqprof.kernels.__file__)\n"
        # not shipped by this wheel (another distribution, e.g. Hugging Face's `kernels`, may own the name)
        f"print(all(s is None or not str(s.origin).startswith({str(target)!r}) for s in "
        "(importlib.util.find_spec('layers'), importlib.util.find_spec('kernels'))))\n"
        "print(sorted(t.name for t in ovqprof.registry.all_layer_types()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    layers_file, kernels_file, no_top_level, types = proc.stdout.splitlines()
    assert layers_file.startswith(str(target)) and kernels_file.startswith(str(target))
    assert no_top_level == "True"
    assert "softmax_attention" in types and "linear_attention" in types


def test_fla_extra_is_fla_core_with_an_upper_bound(wheel):
    # Only fla.ops is used: the full flash-linear-attention package would pull transformers 5 for its models.
    metadata = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA"))
    lines = zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
    fla = [line for line in lines if line.startswith("Requires-Dist:") and 'extra == "fla"' in line]
    assert len(fla) == 1 and fla[0].split()[1].startswith("fla-core"), fla
    assert "<" in fla[0].split(";")[0], fla  # a tested minor version, not whatever comes next
