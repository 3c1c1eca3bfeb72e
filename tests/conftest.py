"""Shared fixtures: the tiny random pipeline (built once per session) and copies of the example photos."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_SUBJECT = REPO_ROOT / "examples" / "dog"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD1.5-shaped pipeline (epsilon prediction), saved once and loaded through from_pretrained."""
    from pdm_lightning.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_v_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny pipeline with a v_prediction scheduler."""
    from pdm_lightning.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd-v", prediction_type="v_prediction")


@pytest.fixture
def instance_dir(tmp_path: Path) -> Path:
    """A writable copy of the bundled example subject (5 photos, 256 px)."""
    return Path(shutil.copytree(EXAMPLE_SUBJECT, tmp_path / "instance"))


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, to show a folder was left untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
