"""Recall capacity: the training-free associative-memory probe and the trained MQAR benchmark.

settings.py  ProbeSettings, the `capacity.probe` section of a spec (pydantic only)
probe.py     the probe: keys, values and gap fillers from a seed, `layer.probe_memory`, metrics, capacity@tau
mqar.py      MQAR training and evaluation (`mqar_data.py`: the data, as Zoology generates it)
rows.py      the result columns shared by both methods, and their short table
command.py   `ovqprof capacity`: settings from the spec and flags, the method, rows to a writer
"""
