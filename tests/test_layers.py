"""The package's layer order: imports go downward only and no module imports itself back through others.

cli → tools / report_lib → projects → train_lib → dataset_lib → common_lib (see docs/architecture.md).
The three seed entry points in common_lib (throughput.py, throughput_sweep.py, flops_profile.py) are the
one exception: thin scripts kept at their documented paths that start the tools above.
"""

import ast
import os

import pytest
from helpers import REPO_ROOT

PACKAGE = os.path.join(REPO_ROOT, "languini")
LAYERS = {"common_lib": 0, "dataset_lib": 1, "train_lib": 2, "projects": 3, "tools": 4, "report_lib": 4}
TOP = 5  # languini/cli.py, languini/quickstart.py; languini/__init__.py (the version only) is at the bottom
SEED_ENTRY_POINTS = {f"languini.common_lib.{name}" for name in ("throughput", "throughput_sweep", "flops_profile")}


def module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO_ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], TOP) if len(parts) > 1 else 0


def imports_of(path: str, module: str) -> set[str]:
    """Every languini module `path` imports, at any depth of the file (late imports count too)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {name for name in found if name.startswith("languini")}


def all_modules() -> dict[str, set[str]]:
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                modules[module_name(path)] = imports_of(path, module_name(path))
    return {name: {i for i in imports if i in modules and i != name} for name, imports in modules.items()}


MODULES = all_modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_downward_only(module):
    if module in SEED_ENTRY_POINTS:
        assert all(i.startswith("languini.tools.") for i in MODULES[module]), "a seed entry point only starts a tool"
        return
    upward = sorted(i for i in MODULES[module] if layer(i) > layer(module))
    assert not upward, f"{module} (layer {layer(module)}) imports a layer above it: {upward}"


def test_no_import_cycles():
    done, on_path = set(), []

    def visit(module):
        if module in on_path:
            raise AssertionError("import cycle: " + " -> ".join(on_path[on_path.index(module) :] + [module]))
        if module in done:
            return
        on_path.append(module)
        for imported in sorted(MODULES[module]):
            if imported != module.rpartition(".")[0]:  # a module importing its own package's __init__
                visit(imported)
        on_path.pop()
        done.add(module)

    for module in sorted(MODULES):
        visit(module)


def test_the_check_sees_imports():
    assert "languini.train_lib.train_command" in MODULES["languini.projects.commands"]
    assert "languini.projects.gpt.model" in MODULES["languini.projects.gpt.project"]  # relative imports resolved
