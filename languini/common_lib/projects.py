"""Discovery of project folders under `languini/projects/` (each is self-contained research)."""

import importlib
import os

from languini.common_lib.errors import UserError
from languini.common_lib.suggest import did_you_mean

PROJECTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects")


def list_projects() -> list[str]:
    """Names of the folders under languini/projects that hold a configs.py."""
    return sorted(
        name
        for name in os.listdir(PROJECTS_DIR)
        if os.path.isfile(os.path.join(PROJECTS_DIR, name, "configs.py"))
    )


def project_dir(project: str) -> str:
    check_project(project)
    return os.path.join(PROJECTS_DIR, project)


def check_project(project: str):
    projects = list_projects()
    if project not in projects:
        raise UserError(f"unknown project '{project}'{did_you_mean(project, projects)}; valid: {', '.join(projects)}")


def import_project_module(project: str, module: str):
    """Import `languini.projects.<project>.<module>` (e.g. "configs", "model") with a clear error."""
    check_project(project)
    return importlib.import_module(f"languini.projects.{project}.{module}")
