"""The layering of docs/architecture.md holds: imports only go down, stages live in one
place, and the package boundaries (ppo_baseline above, launcher apart) are kept."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from offline_rlhf.cli import STAGES

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "offline_rlhf"
DOC = REPO / "docs" / "architecture.md"
# Units whose modules may not import one another: each is a peer of the others in its layer.
NO_SIBLING_IMPORTS = {"stages"}


def documented_layers() -> dict[str, int]:
    """`| N | unit, unit |` rows of the layer table in docs/architecture.md -> {unit: N}."""
    layers = {}
    for number, units in re.findall(r"^\| (\d+) \| ([^|]+) \|", DOC.read_text(), flags=re.M):
        for unit in units.split(","):
            layers[unit.strip().strip("`")] = int(number)
    return layers


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count).
    Relative imports are resolved against the file's package, and `from PACKAGE import NAME`
    names the submodule PACKAGE.NAME when that is one of the repository's modules (so
    `from offline_rlhf import ledger` is `offline_rlhf.ledger`, not the package)."""
    package = module_name(path).split(".")[:-1]  # a module's package; an __init__'s own
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[:len(package) - node.level + 1], *([node.module] if node.module else [])]) \
                if node.level else node.module
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if is_repo_module(f"{base}.{alias.name}") else base)
    return names


def is_repo_module(name: str) -> bool:
    """Whether `name` (a.b.c) is a module or package of this repository."""
    where = REPO.joinpath(*name.split("."))
    return where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()


def unit_of(module: str) -> str:
    """offline_rlhf.data.records -> data; offline_rlhf.cli -> cli."""
    return module.split(".")[1] if module.count(".") else ""


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def package_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


def test_every_unit_of_the_package_has_a_documented_layer():
    layers = documented_layers()
    units = {unit_of(module_name(path)) for path in package_files(PACKAGE)} - {"__init__"}
    assert units <= set(layers), f"units missing from {DOC.name}'s layer table: {sorted(units - set(layers))}"


@pytest.mark.parametrize("path", package_files(PACKAGE), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_only_go_down(path):
    layers = documented_layers()
    here = module_name(path)
    unit = unit_of(here)
    if unit == "__init__":
        return
    for target in imported_modules(path):
        if target.startswith("ppo_baseline"):
            pytest.fail(f"{here} imports {target}: ppo_baseline sits above offline_rlhf")
        if not target.startswith("offline_rlhf.") or unit_of(target) == "__init__":
            continue
        other = unit_of(target)
        if other == unit:
            assert unit not in NO_SIBLING_IMPORTS or target == f"offline_rlhf.{unit}", \
                f"{here} imports its sibling {target}: {unit} modules are peers"
            continue
        assert layers[other] < layers[unit], (f"{here} (layer {layers[unit]}, {unit}) imports {target} "
                                              f"(layer {layers[other]}, {other}): imports only go down")


def test_the_launcher_imports_neither_the_package_nor_torch():
    for path in package_files(REPO / "launcher"):
        for target in imported_modules(path):
            assert target.split(".")[0] not in ("offline_rlhf", "ppo_baseline", "torch"), f"{path} imports {target}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_stage_entry_lives_in_the_stages_package(name):
    stage = STAGES[name]
    assert stage.module.startswith(("offline_rlhf.stages.", "ppo_baseline.")), \
        f"orlhf {name} points to {stage.module}, outside offline_rlhf/stages/ and ppo_baseline/"
    assert callable(importlib.import_module(stage.module).main)
    if stage.schema:
        assert stage.schema.startswith(("offline_rlhf.config.", "ppo_baseline.")), \
            f"{name}'s config {stage.schema} is not in config/ or ppo_baseline/"
