"""Evaluate a run of this project on the test splits with the project's own model and protocol.

    python languini/projects/<project>/eval.py --run_dir runs/<project>/EXP [--eval_data_split all]
    torchrun --standalone --nproc_per_node 8 languini/projects/<project>/eval.py --run_dir runs/<project>/EXP

The project is the folder this file lives in (its project.py); `--help` lists the flags. See
docs/evaluation.md for the protocols.
"""

import sys

from languini.projects.commands import evaluate_project


def main(argv=None):
    return evaluate_project(__file__, argv)


if __name__ == "__main__":
    sys.exit(main())
