"""Packaging: pyproject.toml declares what mocolab imports as compatible ranges that hold requirements.txt's pins."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "platform" / "mocolab"


def _name(requirement: str) -> str:
    return re.split(r"[\[=<>!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pins(lines) -> dict[str, str]:
    return {_name(line): line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}


def test_pyproject_ranges_hold_the_requirements_pins():
    """Every dependency is a range from the locked version to below its next major (next minor below 1.0), with
    the same extras; requirements.txt pins exactly what pyproject.toml declares (jupyterlab's extra is optional)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _pins(
        project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    )
    required = _pins((REPO / "requirements.txt").read_text().splitlines())
    assert set(required) - set(declared) == set(), "requirements.txt pins something pyproject.toml does not declare"
    assert set(declared) - set(required) <= {"jupyterlab"}
    for name, pin in required.items():
        lock, wanted = Requirement(pin), Requirement(declared[name])
        (exact,) = lock.specifier
        version = Version(exact.version)
        upper = f"{version.major + 1}" if version.major else f"0.{version.minor + 1}"
        assert exact.operator == "==" and lock.extras == wanted.extras, pin
        assert {str(s) for s in wanted.specifier} == {f">={version}", f"<{upper}"}, declared[name]


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
