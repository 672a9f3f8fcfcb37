"""CPU timer and memory trackers: warm-up is never timed, quantiles are ordered, figures name a source."""

from __future__ import annotations

import time

import torch

from ovqprof.measure.memory import MemoryTrackers, RssTracker
from ovqprof.measure.timing import _quantile, time_cpu


def test_time_cpu_warms_up_and_reports_ordered_quantiles():
    calls = []

    def fn():
        calls.append(time.perf_counter())
        time.sleep(0.002 if len(calls) > 1 else 0.05)  # a slow first call must not be timed

    timing = time_cpu(fn, warmup_ms=0, rep_ms=0, min_reps=5)
    assert len(calls) == 6  # one warm-up, then five timed
    assert timing.timer == "wall"
    assert timing.p20_ms <= timing.median_ms <= timing.p80_ms
    assert 1.5 < timing.median_ms < 40  # the 50 ms warm-up call is excluded


def test_time_cpu_clears_grads_outside_the_timed_call():
    x = torch.randn(4, requires_grad=True)
    seen = []

    def fn():
        seen.append(x.grad is None)
        (x * 2).sum().backward()

    time_cpu(fn, warmup_ms=0, rep_ms=0, min_reps=3, grad_to_none=[x])
    assert seen[1:] == [True] * (len(seen) - 1)


def test_quantile_interpolates_like_torch():
    samples = [5.0, 1.0, 3.0, 2.0, 4.0, 10.0]
    for q in (0.2, 0.5, 0.8):
        expected = torch.quantile(torch.tensor(samples, dtype=torch.float64), q).item()
        assert abs(_quantile(samples, q) - expected) < 1e-12


def test_rss_tracker_sees_a_large_allocation():
    tracker = RssTracker()
    tracker.start()
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    report = tracker.stop()
    del big
    peak = report.figures["mem_rss_peak_bytes"]
    if peak is None:  # kernels without clear_refs: the tracker must say so
        assert report.notes
    else:
        assert peak >= 64 * 2**20


def test_cpu_trackers_report_gpu_figures_as_unknown_with_a_reason():
    trackers = MemoryTrackers(torch.device("cpu"))
    trackers.start()
    report = trackers.stop()
    for col in ("mem_torch_alloc_bytes", "mem_torch_reserved_bytes", "mem_nvml_device_bytes",
                "mem_nvml_process_bytes"):
        assert report.figures[col] is None
    assert any("nvml" in note for note in report.notes)
