"""`languini new-project NAME [--from gpt]`: start new research as a renamed copy of a project folder.

A project is named by its folder, so a plain copy (`cp -r`) already trains and evaluates its own model; this
command also points the copy's docs and any absolute imports at the new name, retitles its README, and
checks the name is a valid package name. Train it at once with
`torchrun --standalone languini/projects/NAME/main.py mini`. See docs/architecture.md.
"""

import argparse
import keyword
import os
import re
import shutil
import sys
import tempfile

from languini.common_lib.errors import UserError, exit_on_user_error
from languini.projects import PROJECTS_DIR, list_projects, project_dir

SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "throughput_results.csv", "logs", ".ipynb_checkpoints")
TEXT_SUFFIXES = (".py", ".md", ".txt", ".json", ".sh", ".toml", ".yaml", ".yml", ".cfg")


def check_name(name: str, dest: str):
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise UserError(
            f"invalid project name '{name}': use lowercase letters, digits and _ , starting with a letter "
            f"(it becomes the Python package languini.projects.{name})"
        )
    if os.path.exists(os.path.join(dest, name)):
        raise UserError(
            f"{os.path.join(dest, name)} already exists; pick another name (nothing was overwritten)"
        )


def rename_text(text: str, old: str, new: str) -> str:
    """Point imports (languini.projects.old), paths (languini/projects/old) and run folders (runs/old/) at new."""
    text = re.sub(rf"languini([./])projects\1{old}(?![A-Za-z0-9_])", rf"languini\1projects\1{new}", text)
    return re.sub(rf"(?<![A-Za-z0-9_])runs/{old}/", f"runs/{new}/", text)


def retitle_readme(text: str, old: str, new: str) -> str:
    """Replace the README's first heading by the new name and say where the project came from."""
    body = re.sub(r"\A\s*# [^\n]*\n?", "", text)
    return f"# {new}\n\nStarted as a copy of the `{old}` project (`languini new-project {new} --from {old}`).\n\n{body}"


def create_project(name: str, source: str, dest: str = PROJECTS_DIR) -> str:
    """Copy project `source` to `dest/name` with every name updated; returns the new folder.

    The copy is assembled in a temporary sibling folder and renamed into place, so a failure leaves nothing.
    """
    src = project_dir(source)
    check_name(name, dest)
    os.makedirs(dest, exist_ok=True)
    tmp_root = tempfile.mkdtemp(prefix=f".{name}.", dir=dest)
    try:
        work = os.path.join(tmp_root, name)
        shutil.copytree(src, work, ignore=SKIP)
        for folder, _, files in os.walk(work):
            for file in files:
                if file.endswith(TEXT_SUFFIXES):
                    _rewrite(
                        os.path.join(folder, file),
                        os.path.relpath(os.path.join(folder, file), work),
                        source,
                        name,
                    )
        readme = os.path.join(work, "README.md")
        if not os.path.exists(readme):
            with open(readme, "w") as f:
                f.write(retitle_readme("", source, name))
        final = os.path.join(dest, name)
        os.rename(work, final)
        return final
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def _rewrite(path: str, rel: str, old: str, new: str):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = rename_text(text, old, new)
    if rel == "README.md":
        text = retitle_readme(text, old, new)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _usage_error(message: str):
    """argparse's mistakes as one `error: ...` line (exit code 2), like every other languini command."""
    raise UserError(f"{message} (see languini new-project --help)")


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="languini new-project",
        description="Copy a project folder under a new name, ready to train.",
        allow_abbrev=False,
    )
    parser.error = _usage_error
    parser.add_argument("name", help="the new project's name (lowercase Python identifier)")
    parser.add_argument(
        "--from", dest="source", default="gpt", help=f"project to copy: {', '.join(list_projects())}"
    )
    parser.add_argument(
        "--dest", default=PROJECTS_DIR, help="folder to create the project in (default: languini/projects)"
    )
    args = parser.parse_args(argv)
    folder = create_project(args.name, args.source, args.dest)
    print(f"created {folder} from {args.source}")
    if os.path.abspath(args.dest) == os.path.abspath(PROJECTS_DIR):
        print(f"train it:  torchrun --standalone languini/projects/{args.name}/main.py mini")
        print(f"on a CPU:  torchrun --standalone languini/projects/{args.name}/main.py nano")
    return 0


if __name__ == "__main__":
    sys.exit(main())
