"""`python -m ovqprof` runs the same CLI as the `ovqprof` console script."""

from ovqprof.cli import main

main()
