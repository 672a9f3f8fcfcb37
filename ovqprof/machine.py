"""What machine and software a measurement ran on: device, driver, versions, git revision, NVML state.

This is the header of every JSON result and the content of `ovqprof env`.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import torch

import ovqprof


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when a GPU is visible, else cpu. Raises ValueError for a GPU that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("no CUDA GPU is visible to torch (torch.cuda.is_available() is False)")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"cuda:{index} does not exist ({torch.cuda.device_count()} GPU(s) visible)")
        return torch.device("cuda", index)
    return device


@lru_cache(maxsize=1)
def _nvml_init() -> str | None:
    """Initialise NVML once; returns None on success or the reason it is unavailable."""
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError subclasses, missing libnvidia-ml.so, ...
        return f"NVML could not initialise ({exc})"
    return None


def nvml_handle_for(device: torch.device):
    """(handle, None) for the NVML device that is this CUDA device, matched by UUID because CUDA and NVML
    can number GPUs differently; (None, reason) when NVML cannot see it."""
    reason = _nvml_init()
    if reason:
        return None, reason
    import pynvml

    index = device.index or 0
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
    try:
        count = pynvml.nvmlDeviceGetCount()
        for i in range(count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            nv_uuid = pynvml.nvmlDeviceGetUUID(handle)
            nv_uuid = nv_uuid.decode() if isinstance(nv_uuid, bytes) else nv_uuid
            if uuid and nv_uuid.removeprefix("GPU-") == uuid.removeprefix("GPU-"):
                return handle, None
        if not uuid and count == 1:
            return pynvml.nvmlDeviceGetHandleByIndex(0), None
    except pynvml.NVMLError as exc:
        return None, f"NVML query failed ({exc})"
    return None, "no NVML device matches the CUDA device's UUID (MIG instance?)"


def gpu_other_processes(device: torch.device) -> list[dict]:
    """Other processes holding memory on this GPU (their memory distorts device-wide NVML figures)."""
    handle, _ = nvml_handle_for(device)
    if handle is None:
        return []
    import pynvml

    try:
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except pynvml.NVMLError:
        return []
    return [{"pid": p.pid, "used_bytes": p.usedGpuMemory} for p in procs if p.pid != os.getpid()]


@lru_cache(maxsize=1)
def git_revision() -> str | None:
    """The git revision of the ovqprof source tree (with `+dirty` when it has changes), when known."""
    root = Path(ovqprof.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """Device and software description; unknown values are None, with `nvml_note` saying why NVML is off."""
    info: dict = {
        "device_type": device.type,
        "device": None,
        "driver": None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "ovqprof": ovqprof.__version__,
        "git_revision": git_revision(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "nvml": False,
        "nvml_note": None,
        "gpu_other_processes": [],
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "argv": " ".join(["ovqprof", *sys.argv[1:]]),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device.index or 0)
        info["device"] = props.name
        info["gpu_memory_bytes"] = int(props.total_memory)
        info["sm_count"] = props.multi_processor_count
        handle, reason = nvml_handle_for(device)
        info["nvml"] = handle is not None
        info["nvml_note"] = reason
        if handle is not None:
            import pynvml

            drv = pynvml.nvmlSystemGetDriverVersion()
            info["driver"] = drv.decode() if isinstance(drv, bytes) else drv
            info["gpu_other_processes"] = gpu_other_processes(device)
    else:
        info["device"] = f"CPU: {info['cpu']}"
        info["nvml_note"] = "no GPU in use" if _nvml_init() is None else _nvml_init()
    return info
