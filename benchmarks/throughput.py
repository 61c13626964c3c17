"""aload against torch's DataLoader, torchdata nodes and SPDL: the suite of `python -m aload.bench`.

python benchmarks/throughput.py --help     # the same options as `python -m aload.bench`
"""

from aload.bench.cli import main

if __name__ == "__main__":
    main()
