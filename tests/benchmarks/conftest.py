"""pytest-benchmark setup for the GPU benchmarks: record the GPU in every saved run.

pytest-benchmark identifies a machine by OS, Python and CPU only, so two runs on different GPUs would compare
silently. Adding the GPU, driver and versions to `machine_info` makes `--benchmark-compare` warn when they
differ (keep one storage folder per GPU type, see the README).
"""

from __future__ import annotations


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    from ovqprof.machine import machine_info as ovqprof_machine_info

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = ovqprof_machine_info(device)
    machine_info["ovqprof"] = {k: info.get(k) for k in ("device", "driver", "cuda", "torch", "triton", "ovqprof",
                                                        "git_revision")}
