"""`languini train PROJECT ...` and `languini eval PROJECT ...`: a project's training or evaluation in
this process, as its main.py / eval.py would run it.

One process trains on one device. For several GPUs, start the project's scripts with torchrun, which
launches one process per GPU (the trainer then runs DDP):

    torchrun --standalone --nproc_per_node 8 languini/projects/gpt/main.py small
"""

import sys

from languini.common_lib.errors import UserError, exit_on_user_error
from languini.projects import list_projects, load_project
from languini.train_lib.eval_command import run_eval
from languini.train_lib.train_command import run_training

TRAIN_USAGE = """usage: languini train PROJECT [PRESET] [--flags]

Trains PROJECT (one of: {projects}) in this process. `languini train PROJECT --help` lists the presets
and every flag. For several processes (GPUs) use torchrun on the project's main.py:
  torchrun --standalone --nproc_per_node N languini/projects/PROJECT/main.py [PRESET] [--flags]"""
EVAL_USAGE = """usage: languini eval PROJECT --run_dir DIR [--eval_data_split S|all] [--last_n N] [--flags]

Evaluates a run of PROJECT (one of: {projects}) in this process; `languini eval PROJECT --help` lists
the evaluation flags. For several processes (GPUs) use torchrun on the project's eval.py:
  torchrun --standalone --nproc_per_node N languini/projects/PROJECT/eval.py --run_dir DIR"""
LAUNCHER_FLAGS = ("--nproc_per_node", "--nproc-per-node", "--nnodes", "--gpus", "--num_gpus", "--world_size")


def _project_and_rest(argv, usage: str):
    """(project spec, remaining argv), or None after printing the usage."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage.format(projects=", ".join(list_projects())))
        return None
    launcher = [a for a in argv[1:] if a.split("=")[0] in LAUNCHER_FLAGS]
    if launcher:
        script = "main.py" if usage is TRAIN_USAGE else "eval.py"
        raise UserError(
            f"{launcher[0].split('=')[0]} is a launcher option: run several processes with "
            f"`torchrun --standalone --nproc_per_node N languini/projects/{argv[0]}/{script} ...`"
        )
    return load_project(argv[0]), argv[1:]


@exit_on_user_error
def train_main(argv=None):
    parsed = _project_and_rest(argv, TRAIN_USAGE)
    return 0 if parsed is None else run_training(*parsed, prog=f"languini train {parsed[0].name}")


@exit_on_user_error
def eval_main(argv=None):
    parsed = _project_and_rest(argv, EVAL_USAGE)
    return 0 if parsed is None else run_eval(*parsed)
