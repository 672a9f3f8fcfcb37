"""Ready-to-run YAML specs, shipped as package data of `ovqprof.profiles` (`--profile quick` finds them)."""
