"""`languini train PROJECT [PRESET] [--flags]`: run a project's main.py in this process.

One process trains on one device. For several GPUs, start the project's main.py with torchrun, which
launches one process per GPU (the trainer then runs DDP):

    torchrun --standalone --nproc_per_node 8 languini/projects/gpt/main.py small
"""

import importlib
import sys

from languini.common_lib.errors import UserError, exit_on_user_error
from languini.common_lib.projects import check_project, list_projects

USAGE = """usage: languini train PROJECT [PRESET] [--flags]

Trains PROJECT (one of: {projects}) in this process. `languini train PROJECT --help` lists the presets
and every flag. For several processes (GPUs) use torchrun on the project's main.py:
  torchrun --standalone --nproc_per_node N languini/projects/PROJECT/main.py [PRESET] [--flags]"""
LAUNCHER_FLAGS = ("--nproc_per_node", "--nproc-per-node", "--nnodes", "--gpus", "--num_gpus", "--world_size")


@exit_on_user_error
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(projects=", ".join(list_projects())))
        return 0
    project, rest = argv[0], argv[1:]
    check_project(project)
    launcher = [a for a in rest if a.split("=")[0] in LAUNCHER_FLAGS]
    if launcher:
        raise UserError(
            f"{launcher[0].split('=')[0]} is a launcher option: run several processes with "
            f"`torchrun --standalone --nproc_per_node N languini/projects/{project}/main.py ...`"
        )
    project_main = importlib.import_module(f"languini.projects.{project}.main")
    return project_main.main(rest)


if __name__ == "__main__":
    sys.exit(main())
