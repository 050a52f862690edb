"""Train an LSTM: `python main.py [PRESET] [--flags]`, or with torchrun for several processes.

    torchrun --standalone --nproc_per_node 2 languini/projects/lstm/main.py mini --train_batch_size 80

The quasi-LSTM is the default; `--coupled` trains the 3-projection quasi-LSTM, `--non_quasi` the classic
LSTM. The trainer keeps one recurrent state per (process, micro-batch), carried and detached every step.
"""

import os
import sys

from languini.common_lib.errors import exit_on_user_error
from languini.common_lib.projects import import_project_module
from languini.train_lib.run import run_training

PROJECT = os.path.basename(os.path.dirname(os.path.abspath(__file__)))


@exit_on_user_error
def main(argv=None):
    configs = import_project_module(PROJECT, "configs")
    model = import_project_module(PROJECT, "model")
    return run_training(configs, model.Model, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
