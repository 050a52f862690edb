"""`languini new-project NAME [--from gpt]`: start new research as a renamed copy of a project folder.

A project is named by its folder, so a plain copy (`cp -r`) already trains and evaluates its own model;
this command also points the copy's docs and any absolute imports at the new name, writes its README from
a template with the sections a shared project needs (method, commands per compute class, results from
bundles, downloads, BibTeX), and checks the name is a valid package name. Train it at once with
`torchrun --standalone languini/projects/NAME/main.py mini`. See docs/architecture.md.
"""

import keyword
import os
import re
import shutil
import sys
import tempfile

from languini.common_lib.errors import OneLineArgumentParser, UserError, exit_on_user_error
from languini.projects import PROJECTS_DIR, list_projects, project_dir

SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "throughput_results.csv", "logs", ".ipynb_checkpoints")
TEXT_SUFFIXES = (".py", ".md", ".txt", ".json", ".sh", ".toml", ".yaml", ".yml", ".cfg")


def check_name(name: str, dest: str):
    """Refuse a name that cannot be the package `languini.projects.<name>` (or would shadow a module of `dest`),
    or whose folder exists, in one line saying which rule it breaks."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise UserError(
            f"invalid project name '{name}': use lowercase letters, digits and _ , starting with a letter "
            f"(it becomes the Python package languini.projects.{name})"
        )
    if keyword.iskeyword(name):
        raise UserError(f"invalid project name '{name}': it is a Python keyword, so `import "
                        f"languini.projects.{name}` cannot be written; pick another name")
    if os.path.exists(os.path.join(dest, f"{name}.py")):
        raise UserError(f"invalid project name '{name}': the package would shadow the module "
                        f"{os.path.join(dest, name)}.py; pick another name")
    if os.path.exists(os.path.join(dest, name)):
        raise UserError(
            f"{os.path.join(dest, name)} already exists; pick another name (nothing was overwritten)"
        )


def rename_text(text: str, old: str, new: str) -> str:
    """Point imports (languini.projects.old), paths (languini/projects/old) and run folders (runs/old/) at new."""
    text = re.sub(rf"languini([./])projects\1{old}(?![A-Za-z0-9_])", rf"languini\1projects\1{new}", text)
    return re.sub(rf"(?<![A-Za-z0-9_])runs/{old}/", f"runs/{new}/", text)


README_TEMPLATE = """# {new}

Started as a copy of the `{old}` project (`languini new-project {new} --from {old}`). Replace each
section below; the commands assume a Languini checkout with the data prepared (docs/data.md).

## Method

What the model changes compared with `{old}`, and why. Cite the papers it builds on.

## Presets

| preset | parameters | notes |
| --- | ---: | --- |
| mini | | |

(`python3 languini/common_lib/throughput.py {new} PRESET` prints the parameter count;
`python3 languini/common_lib/flops_profile.py {new} PRESET --train_batch_size 1` the FLOPs.)

## Reproduce each compute class

Throughput on the reference GPU, then steps per class (docs/compute_classes.md):

```bash
python3 languini/common_lib/throughput.py {new} PRESET --train_batch_size B --json PRESET.json
languini steps {new} PRESET --train_batch_size B --throughput_json PRESET.json
```

| class | command |
| --- | --- |
| 6 h | `torchrun --standalone languini/projects/{new}/main.py PRESET --train_batch_size B --max_train_steps S --decay_steps S` |

## Results

Fill this table from your bundles (`languini export --run_dir RUN --out BUNDLE`, then
`languini report BUNDLE...` writes it to reports/report.md):

| class | preset | steps | normalised ppl (test) | bundle |
| --- | --- | ---: | ---: | --- |

## Download

Bundles (weights as safetensors, logs, results, manifest): links here. Check one with
`languini verify-bundle BUNDLE` and score it with
`python3 languini/projects/{new}/eval.py --bundle BUNDLE --eval_data_split all` (docs/sharing.md).

## Citation

```bibtex
@misc{{{new},
  title  = {{...}},
  author = {{...}},
  year   = {{...}},
}}
```

Notes kept from the `{old}` project's README:

{body}"""


def readme_from_template(text: str, old: str, new: str) -> str:
    """The new project's README: the template with the sections a shared project needs, then the source
    README's body (its first heading dropped) as notes."""
    body = re.sub(r"\A\s*# [^\n]*\n?", "", text).strip()
    return README_TEMPLATE.format(new=new, old=old, body=body + "\n" if body else "")


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
                f.write(readme_from_template("", source, name))
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
        text = readme_from_template(text, old, new)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


@exit_on_user_error
def main(argv=None):
    parser = OneLineArgumentParser(
        prog="languini new-project", description="Copy a project folder under a new name, ready to train."
    )
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
