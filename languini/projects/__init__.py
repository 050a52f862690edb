"""Project folders: each folder here with a `project.py` is a project, named by its folder.

`load_project(name)` imports `languini.projects.<name>.project` and returns its `SPEC` named after the
folder; `project_from_file(__file__)` does the same for the folder a script lives in, which is how every
project's main.py and eval.py find their own project (so a folder copied by hand needs no renaming).
"""

import importlib
import os

from languini.common_lib.errors import UserError
from languini.common_lib.suggest import did_you_mean
from languini.train_lib.project_spec import ProjectSpec

PROJECTS_DIR = os.path.dirname(os.path.abspath(__file__))
SPEC_MODULE = "project"  # each project declares `SPEC = ProjectSpec(...)` in its project.py


def list_projects() -> list[str]:
    """Names of the folders under languini/projects that hold a project.py."""
    return sorted(
        name
        for name in os.listdir(PROJECTS_DIR)
        if name.isidentifier() and os.path.isfile(os.path.join(PROJECTS_DIR, name, f"{SPEC_MODULE}.py"))
    )


def check_project(project: str):
    projects = list_projects()
    if project not in projects:
        raise UserError(f"unknown project '{project}'{did_you_mean(project, projects)}; valid: {', '.join(projects)}")


def project_dir(project: str) -> str:
    check_project(project)
    return os.path.join(PROJECTS_DIR, project)


def load_project(project: str) -> ProjectSpec:
    """The spec of project `project`, named after its folder."""
    check_project(project)
    module = importlib.import_module(f"{__name__}.{project}.{SPEC_MODULE}")
    spec = getattr(module, "SPEC", None)
    if not isinstance(spec, ProjectSpec):
        raise UserError(f"languini/projects/{project}/{SPEC_MODULE}.py must define SPEC = ProjectSpec(...)")
    return spec.named(project)


def project_from_file(path: str) -> ProjectSpec:
    """The spec of the project folder that holds `path` (a project's main.py or eval.py)."""
    folder = os.path.dirname(os.path.realpath(path))
    if os.path.dirname(folder) != os.path.realpath(PROJECTS_DIR):
        raise UserError(
            f"{path} is not inside {PROJECTS_DIR}: the installed languini package is another checkout; "
            "install this one with `pip install -e .` (or set PYTHONPATH to it)"
        )
    return load_project(os.path.basename(folder))
