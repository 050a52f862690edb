"""The `languini` command: one entry point that dispatches to each tool's own `main(argv)`."""

import importlib
import sys

from languini.common_lib.errors import UserError, exit_on_user_error
from languini.common_lib.suggest import did_you_mean

# command -> (module, one-line description); modules are imported lazily so `languini --help` is instant.
COMMANDS = {
    "quickstart": ("languini.quickstart", "prepare the demo corpus, train `nano` on CPU, evaluate, plot"),
    "data": ("languini.dataset_lib.cli", "prepare / verify / inspect tokenised corpora"),
    "train": ("languini.train_lib.launch", "train a project: languini train PROJECT [PRESET] [--flags]"),
    "eval": ("languini.train_lib.launch_eval", "evaluate a run: languini eval PROJECT --run_dir DIR"),
    "throughput": ("languini.common_lib.throughput", "measure training throughput, FLOPs and MFU"),
    "sweep": ("languini.common_lib.throughput_sweep", "find the largest batch size and its throughput"),
    "flops": ("languini.common_lib.flops_profile", "count FLOPs of a config"),
    "steps": ("languini.common_lib.compute_classes", "turn a compute class (hours) into training steps"),
    "report": ("languini.report_lib.report", "compare runs: tables and scaling plots"),
    "new-project": ("languini.common_lib.new_project", "copy a project folder under a new name"),
}


def _usage() -> str:
    lines = ["usage: languini COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<12} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`languini COMMAND --help` describes a command's arguments."]
    return "\n".join(lines)


@exit_on_user_error
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from languini import __version__

        print(f"languini {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        raise UserError(f"unknown command '{name}'{did_you_mean(name, COMMANDS)}; valid: {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
