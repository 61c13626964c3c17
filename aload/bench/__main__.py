"""`python -m aload.bench`: see `aload.bench.cli`."""

from aload.bench.cli import main

main()
