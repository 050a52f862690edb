"""Final evaluation of an LSTM run: the state is carried through each whole test split in chunks of
seq_len (see languini/train_lib/eval_run.py).

    python languini/projects/lstm/eval.py --run_dir runs/lstm/EXP [--eval_data_split all]
"""

import sys

from languini.common_lib.errors import exit_on_user_error
from languini.projects.lstm import configs
from languini.projects.lstm.model import Model
from languini.train_lib.eval_run import run_eval


@exit_on_user_error
def main(argv=None):
    return run_eval(configs, Model, sys.argv[1:] if argv is None else argv, protocol="stateful")


if __name__ == "__main__":
    sys.exit(main())
