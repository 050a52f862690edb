"""Kept at this path so `python3 languini/common_lib/throughput_sweep.py ...` works as documented; the tool itself is
languini/tools/throughput_sweep.py (`languini --help` lists it as a subcommand)."""

import sys

from languini.tools.throughput_sweep import main

if __name__ == "__main__":
    sys.exit(main())
