"""The container installs what pyproject.toml asks for (minus torch, which the image has)."""

import re

import tomllib

from tests.fixtures import REPO_ROOT


def test_dockerfile_installs_every_non_torch_dependency_and_the_hub_extra():
    """The `hub` extra too: the shipped configs read hub datasets, and a job of an image
    without `datasets` would fail only once Slurm had started it."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    dependencies = project["dependencies"] + project["optional-dependencies"]["hub"]
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    installed = set(re.findall(r'"([A-Za-z0-9_.\-]+[<>=!~][^"]*)"', dockerfile))
    expected = {dep.split(";")[0].strip() for dep in dependencies if not dep.startswith("torch")}
    assert expected == installed
