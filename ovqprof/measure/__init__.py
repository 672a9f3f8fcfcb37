"""Measurement: timers, memory trackers and device peaks. Small pieces with start/stop, composed by the
sweep runner."""
