"""Kept at this path so `python3 languini/common_lib/flops_profile.py ...` works as documented; the tool itself is
languini/tools/flops_profile.py (`languini --help` lists it as a subcommand)."""

import sys

from languini.tools.flops_profile import main

if __name__ == "__main__":
    sys.exit(main())
