"""Arguments of the compute tools: `PROJECT [PRESET] [--config flags] [--tool flags]`.

The tool's own flags ({name: (type, default, help)}) are taken out first; the rest is the project's preset
and config flags, parsed by the project's spec.
"""

from languini.common_lib.config import split_tool_flags
from languini.projects import load_project
from languini.train_lib.train_config import check_config


def _tool_usage(usage: str, tool_flags: dict) -> str:
    lines = [f"usage: {usage}", "", "tool flags:"]
    for name, (typ, default, help_text) in tool_flags.items():
        flag = f"--{name}" + ("" if typ is bool else f" {typ.__name__.upper()}")
        shown = "" if "(default" in help_text else f" (default: {default!r})"  # a help that says it in words
        lines.append(f"  {flag:<38} {help_text}{shown}")
    lines.append("\nPROJECT is a folder of languini/projects; PRESET and --flags are the project's config.")
    return "\n".join(lines)


class ToolOptions(dict):
    """The tool flags, readable as attributes (`opts.steps`)."""

    __getattr__ = dict.__getitem__


def parse_tool_args(argv: list[str], usage: str, tool_flags: dict):
    """`PROJECT [PRESET] [--config flags] [--tool flags]` -> (project, config, tool options)."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_tool_usage(usage, tool_flags))
        raise SystemExit(0)
    project, rest = argv[0], argv[1:]
    spec = load_project(project)
    if any(a in ("-h", "--help") for a in rest):
        print(_tool_usage(usage, tool_flags) + "\n")
    values, rest = split_tool_flags(rest, tool_flags)
    cfg = spec.parse_config(rest, f"{usage.split(' PROJECT')[0]} {project}", tuple(tool_flags))
    check_config(cfg)  # the tools size tensors from it: a zero batch or a negative length is one line here
    return project, cfg, ToolOptions(values)
