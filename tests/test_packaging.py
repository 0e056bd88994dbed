"""Packaging: pyproject.toml declares what mocolab imports, pinned as requirements.txt pins it."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "platform" / "mocolab"


def _name(requirement: str) -> str:
    return re.split(r"[\[=<>!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pins(lines) -> dict[str, str]:
    return {_name(line): line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}


def test_pyproject_and_requirements_pin_the_same_versions():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _pins(project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra])
    required = _pins((REPO / "requirements.txt").read_text().splitlines())
    assert all("==" in pin for pin in declared.values())
    missing = {name: pin for name, pin in declared.items() if required.get(name) != pin}
    assert not missing or set(missing) == {"jupyterlab"}, missing  # the notebooks extra is optional
    assert set(required) - set(declared) == set(), "requirements.txt pins something pyproject.toml does not declare"


def _imported_top_level_modules() -> set[str]:
    modules = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"mocolab", "__future__"}


def test_every_library_mocolab_imports_is_a_declared_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for module in _imported_top_level_modules():
        dists = {d.lower() for d in distributions.get(module, [module])}
        if not dists & declared:
            undeclared[module] = dists
    assert undeclared == {}, f"imported by mocolab but not in pyproject.toml's dependencies: {undeclared}"
