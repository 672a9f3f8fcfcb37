"""ovqprof: profiler and memory-capacity analysis for attention-like layers."""

__version__ = "0.1.0"
