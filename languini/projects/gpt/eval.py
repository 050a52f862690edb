"""Final evaluation of a GPT run: sliding windows over each test split (see languini/train_lib/eval_run.py).

python languini/projects/gpt/eval.py --run_dir runs/gpt/EXP [--eval_data_split all] [--last_n 128]
torchrun --standalone --nproc_per_node 8 languini/projects/gpt/eval.py --run_dir runs/gpt/EXP
"""

import sys

from languini.common_lib.errors import exit_on_user_error
from languini.projects.gpt import configs
from languini.projects.gpt.model import Model
from languini.train_lib.eval_run import run_eval


@exit_on_user_error
def main(argv=None):
    return run_eval(configs, Model, sys.argv[1:] if argv is None else argv, protocol="sliding_window")


if __name__ == "__main__":
    sys.exit(main())
