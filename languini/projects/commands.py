"""The bodies of every project's main.py and eval.py: find the project from the script's folder, then
train (`run_training`) or evaluate (`run_eval`) with its spec."""

import sys

from languini.common_lib.errors import exit_on_user_error
from languini.projects import project_from_file
from languini.train_lib.eval_command import run_eval
from languini.train_lib.train_command import run_training


@exit_on_user_error
def train_project(script: str, argv: list[str] | None = None) -> int:
    """`main.py [PRESET] [--flags]` of the project whose folder holds `script`."""
    return run_training(project_from_file(script), sys.argv[1:] if argv is None else argv)


@exit_on_user_error
def evaluate_project(script: str, argv: list[str] | None = None) -> int:
    """`eval.py --run_dir DIR [...]` of the project whose folder holds `script`."""
    return run_eval(project_from_file(script), sys.argv[1:] if argv is None else argv)
