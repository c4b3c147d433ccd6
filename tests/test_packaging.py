"""pyproject.toml bounds every dependency above and below, and what the tests run with lies inside."""

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
REQUIREMENTS = [Requirement(r) for r in
                PROJECT["dependencies"] + [r for extra in PROJECT["optional-dependencies"].values() for r in extra]]


@pytest.mark.parametrize("requirement", REQUIREMENTS, ids=str)
def test_dependency_is_bounded_and_installed_version_fits(requirement):
    operators = {spec.operator for spec in requirement.specifier}
    assert operators & {"<", "<=", "==", "~="}, f"{requirement} has no upper bound; a fresh install may get an untested release"
    assert operators & {">", ">=", "==", "~="}, f"{requirement} has no lower bound"
    try:
        installed = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{requirement.name} is not installed here")
    assert requirement.specifier.contains(installed, prereleases=True), f"installed {installed} is outside {requirement}"
