"""Imports flow one way: each package imports only from the layers below it (and from itself).

core (errors, seeding, dtypes, atomic files, photos, model loading) < losses < generation < data <
pdm < evaluation < prepare < training (the LightningModule and DataModule) < export < callbacks <
entry points (train.py's CLI, the runner, predict, the features and prepare commands). A lower
layer never imports a higher one, not even lazily inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "pdm_lightning"

# Module prefix -> layer; the longest matching prefix wins.
LAYERS = {
    "pdm_lightning.core": 0,
    "pdm_lightning.identifier": 0,
    "pdm_lightning.tiny": 0,
    "pdm_lightning.tiny_sdxl": 0,
    "pdm_lightning.clip_vocab": 0,
    "pdm_lightning.losses": 1,
    "pdm_lightning.generation": 2,
    "pdm_lightning.data": 3,
    "pdm_lightning.pdm": 4,
    "pdm_lightning.evaluation": 5,
    "pdm_lightning.prepare": 6,
    "pdm_lightning.training": 7,
    "pdm_lightning.export": 8,
    "pdm_lightning.callbacks": 9,
    "pdm_lightning.cli": 10,
    "pdm_lightning.cli_parser": 10,
    "pdm_lightning.runner": 10,
    "pdm_lightning.predict_sources": 10,
    "pdm_lightning.features": 10,
    "pdm_lightning.docs_options": 10,
    "pdm_lightning.prepare.__main__": 10,
}


def layer_of(module: str) -> int:
    if module == "pdm_lightning":  # the package's empty __init__
        return 0
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{module} has no layer: add its package to LAYERS in tests/test_layering.py")
    return LAYERS[max(matches, key=len)]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every pdm_lightning module ``path`` imports (top level or inside functions), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pdm_lightning"):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("pdm_lightning")]
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_from_a_higher_layer(path: Path) -> None:
    own = module_name(path)
    own_layer = layer_of(own)
    upward = [
        f"line {line}: {target} (layer {layer_of(target)})"
        for line, target in imported_modules(path)
        if layer_of(target) > own_layer
    ]
    assert not upward, f"{own} (layer {own_layer}) imports from higher layers: " + "; ".join(upward)


def test_every_package_has_a_layer() -> None:
    for path in SOURCES:
        layer_of(module_name(path))


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text("def f():\n    from pdm_lightning.callbacks.samples import SampleImages\n")
    assert imported_modules(source) == [(2, "pdm_lightning.callbacks.samples")]
    assert layer_of("pdm_lightning.callbacks.samples") > layer_of("pdm_lightning.data.dataset")
