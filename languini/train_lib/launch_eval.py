"""`languini eval PROJECT --run_dir DIR [...]`: run the project's own eval.py (its `main(argv)`).

For several processes call the script through torchrun instead:
`torchrun --standalone --nproc_per_node N languini/projects/PROJECT/eval.py --run_dir DIR`.
"""

import sys

from languini.common_lib.errors import UserError, exit_on_user_error
from languini.common_lib.projects import import_project_module, list_projects

USAGE = """usage: languini eval PROJECT --run_dir DIR [--eval_data_split S|all] [--last_n N] [--flags]

Evaluates a run of PROJECT (one of: {projects}) in this process; `languini eval PROJECT --help` lists
the evaluation flags. For several processes (GPUs) use torchrun on the project's eval.py:
  torchrun --standalone --nproc_per_node N languini/projects/PROJECT/eval.py --run_dir DIR"""


@exit_on_user_error
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.format(projects=", ".join(list_projects())))
        return 0
    project, rest = argv[0], argv[1:]
    try:
        module = import_project_module(project, "eval")
    except ModuleNotFoundError as e:
        raise UserError(f"project '{project}' cannot be evaluated: {e}") from None
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
