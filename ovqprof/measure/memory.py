"""Memory trackers with start/stop, each naming its source; a figure that cannot be measured is None with
a note, never 0.

- TorchAllocatorTracker: torch.cuda max_memory_allocated / max_memory_reserved (bytes) during the region.
- NvmlTracker: device-wide used memory and this process's used memory, sampled by a background thread
  about every 10 ms, minus the idle baseline taken at start (bytes).
- RssTracker: peak resident set size of this process on Linux (VmHWM after resetting it through
  /proc/self/clear_refs), in bytes.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import torch


@dataclass
class MemoryReport:
    """Column name -> bytes (or None), and notes explaining every None."""

    figures: dict[str, int | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def merge(self, other: MemoryReport) -> None:
        self.figures.update(other.figures)
        self.notes.extend(other.notes)


class TorchAllocatorTracker:
    columns = ("mem_torch_alloc_bytes", "mem_torch_reserved_bytes")

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> MemoryReport:
        if self.device.type != "cuda":
            return MemoryReport(dict.fromkeys(self.columns))
        torch.cuda.synchronize(self.device)
        return MemoryReport({
            "mem_torch_alloc_bytes": int(torch.cuda.max_memory_allocated(self.device)),
            "mem_torch_reserved_bytes": int(torch.cuda.max_memory_reserved(self.device)),
        })


class NvmlTracker:
    """Samples NVML used memory every `interval_s` on a daemon thread between start() and stop()."""

    columns = ("mem_nvml_device_bytes", "mem_nvml_process_bytes")

    def __init__(self, device: torch.device, interval_s: float = 0.01):
        self.device = device
        self.interval_s = interval_s
        self.handle = None
        self.unavailable: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak_device = 0
        self._peak_process: int | None = None
        self._base_device = 0
        self._base_process: int | None = None
        if device.type != "cuda":
            self.unavailable = "NVML figures are GPU-only"
            return
        from ovqprof.machine import nvml_handle_for

        self.handle, self.unavailable = nvml_handle_for(device)

    def _read(self) -> tuple[int, int | None]:
        import pynvml

        used = int(pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        mine = None
        try:
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                    mine = int(proc.usedGpuMemory)
        except pynvml.NVMLError:
            mine = None
        return used, mine

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def _sample(self) -> None:
        used, mine = self._read()
        self._peak_device = max(self._peak_device, used)
        if mine is not None:
            self._peak_process = max(self._peak_process or 0, mine)

    def start(self) -> None:
        if self.handle is None:
            return
        torch.cuda.synchronize(self.device)
        self._base_device, self._base_process = self._read()
        self._peak_device, self._peak_process = self._base_device, self._base_process
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="ovqprof-nvml", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """End the sampling thread without reporting (the measured region failed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def stop(self) -> MemoryReport:
        if self.handle is None:
            return MemoryReport(dict.fromkeys(self.columns), [f"nvml: {self.unavailable}"])
        torch.cuda.synchronize(self.device)
        self._sample()  # one last sample so a short region is never missed entirely
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        report = MemoryReport({"mem_nvml_device_bytes": self._peak_device - self._base_device})
        if self._peak_process is None or self._base_process is None:
            report.figures["mem_nvml_process_bytes"] = None
            report.notes.append("nvml: this process is not in NVML's process list (PID namespace?)")
        else:
            report.figures["mem_nvml_process_bytes"] = self._peak_process - self._base_process
        return report


class RssTracker:
    """Peak resident memory of this process during the region (absolute, includes the interpreter)."""

    columns = ("mem_rss_peak_bytes",)

    def __init__(self) -> None:
        self.reset_ok = False

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5 resets VmHWM to the current RSS (Linux >= 4.0)
            self.reset_ok = True
        except OSError:
            self.reset_ok = False

    def stop(self) -> MemoryReport:
        if not self.reset_ok:
            return MemoryReport({"mem_rss_peak_bytes": None},
                                ["rss: cannot reset the peak (/proc/self/clear_refs unavailable)"])
        peak = proc_status_kib("VmHWM")
        if peak is None:
            return MemoryReport({"mem_rss_peak_bytes": None}, ["rss: VmHWM missing from /proc/self/status"])
        return MemoryReport({"mem_rss_peak_bytes": peak * 1024})


def proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryTrackers:
    """All trackers that apply to `device`, started and stopped together."""

    def __init__(self, device: torch.device):
        self.trackers: list = [TorchAllocatorTracker(device), NvmlTracker(device), RssTracker()]

    def start(self) -> None:
        for t in self.trackers:
            t.start()

    def stop(self) -> MemoryReport:
        report = MemoryReport()
        for t in reversed(self.trackers):
            report.merge(t.stop())
        return report

    def close(self) -> None:
        """Release background samplers; safe to call after stop() or when start() never ran."""
        for t in self.trackers:
            if hasattr(t, "close"):
                t.close()
