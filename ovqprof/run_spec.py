"""The spec a command runs: a profile (or this machine's default one) with the command line's overrides
(--seq, --modes, --batch, --layers, --device) applied, and the device it runs on. Each override is checked
here, once, with an error naming the flag and what is allowed."""

from __future__ import annotations

import re
from collections.abc import Callable

from ovqprof.errors import OvqprofError, SpecError, UsageError
from ovqprof.rows import MODES


def split_list(text: str | None) -> list[str] | None:
    """'a, b,,c' -> ['a', 'b', 'c']; None stays None (the flag was not given)."""
    if text is None:
        return None
    return [item.strip() for item in text.split(",") if item.strip()]


def apply_overrides(spec, seq, modes, batch, layers, device):
    """`spec` with the given flags (None: not given) replacing its sweep's seq, modes and batch, its layers
    narrowed to --layers, and its defaults.device set to --device; UsageError naming the flag otherwise."""
    from ovqprof.ranges import parse_seq_range

    sweep = spec.sweep
    if seq is not None:
        try:
            sweep = sweep.replace(seq=tuple(parse_seq_range(seq)))
        except UsageError as exc:
            raise UsageError(f"--seq: {exc}") from None
    if modes is not None:
        wanted = split_list(modes)
        bad = [m for m in wanted if m not in MODES]
        if bad or not wanted:
            raise UsageError(f"--modes {modes!r} is not valid. Allowed: a comma list of {', '.join(MODES)}")
        sweep = sweep.replace(modes=tuple(dict.fromkeys(wanted)))
    if batch is not None:
        try:
            values = tuple(int(b) for b in split_list(batch))
        except ValueError:
            values = ()
        if not values or min(values) < 1:
            raise UsageError(f"--batch {batch!r} is not valid. Allowed: a comma list of integers >= 1")
        sweep = sweep.replace(batch=values)
    chosen = spec.layers
    if layers is not None:
        names = split_list(layers)
        known = [layer.name for layer in spec.layers]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise UsageError(f"--layers {layers!r}: unknown layer name(s) {unknown} in {spec.file}. "
                             f"Allowed: {', '.join(known)}")
        chosen = tuple(layer for layer in spec.layers if layer.name in names)
    spec = spec.replace(sweep=sweep, layers=chosen)
    if device is not None:
        spec = spec.replace(defaults=spec.defaults.replace(device=device))
    return spec


def resolve_run_device(spec, device_override: str | None,
                       unavailable: Callable[[str, Exception], OvqprofError] | None = None):
    """The torch device of --device (or the spec's defaults.device). A name that is not a device is a
    SpecError naming the flag or field; a well-formed one this machine lacks is `unavailable(name, exc)`
    when given (check: exit 4, the baseline's device is missing here), else that SpecError too."""
    from ovqprof.machine import resolve_device

    name = device_override or spec.defaults.device
    try:
        return resolve_device(name)
    except (ValueError, RuntimeError) as exc:
        if unavailable is not None and re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", name):
            raise unavailable(name, exc) from exc
        field = "--device" if device_override else "defaults.device"
        raise SpecError(f"device {name!r} cannot be used: {exc}", file=None if device_override else spec.file,
                        field=field, allowed="auto, cpu, cuda, cuda:N for a visible GPU (or pass --device cpu)",
                        show_value=False) from exc


def default_profile() -> tuple[str, str]:
    """(profile name, why): `default` where a GPU is visible, else the CPU-sized `quick`."""
    import torch

    if torch.cuda.is_available():
        return "default", "a GPU is visible"
    return "quick", "no GPU is visible"


def load_run_spec(profile, seq, modes, batch, layers, device, log: Callable[[str], None]):
    """The spec (profile, or the default one for this machine, with command-line overrides) and its device;
    `log` says which profile was chosen when none was given."""
    from ovqprof.spec import load_spec, resolve_profile

    if profile is None:
        profile, why = default_profile()
        log(f"no --profile given: using {profile}.yaml ({why})")
    spec = apply_overrides(load_spec(resolve_profile(profile)), seq, modes, batch, layers, device)
    return spec, resolve_run_device(spec, device)
