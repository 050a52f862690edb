"""The `languini` command: one entry point that dispatches to each tool's own `main(argv)`."""

import importlib
import sys

from languini.common_lib.errors import UserError, exit_on_user_error
from languini.common_lib.suggest import did_you_mean

# command -> ("module:function", one-line description); modules are imported lazily so `languini --help`
# is instant.
COMMANDS = {
    "quickstart": ("languini.quickstart:main", "prepare the demo corpus, train `nano` on CPU, evaluate, plot"),
    "data": ("languini.dataset_lib.cli:main", "prepare / verify / inspect tokenised corpora"),
    "train": ("languini.tools.launch:train_main", "train a project: languini train PROJECT [PRESET] [--flags]"),
    "eval": ("languini.tools.launch:eval_main", "evaluate a run: languini eval PROJECT --run_dir DIR"),
    "throughput": ("languini.tools.throughput:main", "measure training throughput, FLOPs and MFU"),
    "sweep": ("languini.tools.throughput_sweep:main", "find the largest batch size and its throughput"),
    "flops": ("languini.tools.flops_profile:main", "count FLOPs of a config"),
    "steps": ("languini.tools.steps:main", "turn a compute class (hours or FLOPs) into training steps"),
    "sample": ("languini.tools.sample:main", "continue a prompt with a trained run, streaming the text"),
    "report": ("languini.report_lib.report:main", "compare runs: tables and scaling plots"),
    "new-project": ("languini.tools.new_project:main", "copy a project folder under a new name"),
    "export": ("languini.tools.export:export_main", "pack a trained run into a verifiable bundle for sharing"),
    "verify-bundle": ("languini.tools.export:verify_main", "check a bundle's hashes, contents and weights"),
}


def _usage() -> str:
    lines = ["usage: languini COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<14} {desc}" for name, (_, desc) in COMMANDS.items()]
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
    module, _, function = COMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(module), function)(rest)


if __name__ == "__main__":
    sys.exit(main())
