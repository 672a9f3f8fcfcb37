"""`--devices`: the devices a sweep measures on concurrently, one worker slot each, checked before any work.

`--devices` lists devices; `--device` (and a spec's `defaults.device`) names one. One device in `--devices` is
exactly `--device`; several give worker slots for `ovqprof.pool`. CUDA devices must be distinct visible GPUs
of one model (a run header names one device, and `check` compares by that name); `cpu` may repeat, for tests:
its workers then share the cores, which every row and the run header say.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ovqprof.errors import UsageError
from ovqprof.rows import NOTE_SHARED_CORES

ALLOWED = ("a comma list of distinct visible GPUs of one model, cuda:N (e.g. cuda:0,cuda:1), or cpu repeated "
           "for testing (cpu,cpu); not both --device and --devices")
_NAME = re.compile(r"cpu|cuda(:[0-9]+)?")


@dataclass(frozen=True)
class WorkerSlot:
    """One concurrent worker. `device`: the torch device its cells run on (`cpu`, `cuda:1`). `label`: what its
    rows' device column says: the device, with repeated `cpu` numbered `cpu:0`, `cpu:1`, ... so each row names
    its worker. `note`: a note every row of the slot carries (shared CPU cores), or None."""

    device: str
    label: str
    note: str | None = None


def _error(text: str, problem: str) -> UsageError:
    return UsageError(f"--devices {text!r}: {problem}. Allowed: {ALLOWED}")


def parse_devices(text: str) -> list[WorkerSlot]:
    """The worker slots of a `--devices` value, or UsageError (exit 2) naming the flag and what is allowed."""
    import torch

    from ovqprof.machine import resolve_device

    names = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise _error(text, "an empty device name")
    bad = [n for n in names if not _NAME.fullmatch(n)]
    if bad:
        raise _error(text, f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not cpu or cuda:N")
    try:
        devices = [resolve_device(n) for n in names]
    except (ValueError, RuntimeError) as exc:
        raise _error(text, str(exc)) from None
    if len({d.type for d in devices}) > 1:
        raise _error(text, "cpu and cuda mixed (their timings are not comparable within one run)")
    if devices[0].type == "cpu":
        if len(devices) == 1:
            return [WorkerSlot("cpu", "cpu")]
        return [WorkerSlot("cpu", f"cpu:{i}", NOTE_SHARED_CORES) for i in range(len(devices))]
    labels = [str(d) for d in devices]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise _error(text, f"{', '.join(twice)} given twice (two workers on one GPU would time each other)")
    models = {label: torch.cuda.get_device_name(d) for label, d in zip(labels, devices, strict=True)}
    if len(set(models.values())) > 1:
        listed = ", ".join(f"{label} is {name}" for label, name in models.items())
        raise _error(text, f"GPUs of different models ({listed}); a run's rows describe one device model")
    return [WorkerSlot(label, label) for label in labels]


def devices_option(devices: str | None, device: str | None) -> tuple[str | None, list[WorkerSlot] | None]:
    """(the one device that overrides the spec's and describes the run, the slots when there are several)
    from `--devices` and `--device`. One device in `--devices` is `--device` with no slots."""
    if devices is None:
        return device, None
    if device is not None:
        raise UsageError(f"--device {device!r} and --devices {devices!r} both given. Allowed: --devices alone "
                         "(one device or several) or --device alone")
    slots = parse_devices(devices)
    return slots[0].device, (slots if len(slots) > 1 else None)
