"""The tiny random SDXL-shaped pipeline, saved once per test module that imports the fixture."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny_sdxl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL-shaped pipeline (epsilon prediction), saved and loaded through from_pretrained."""
    from pdm_lightning.tiny_sdxl import build_tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-sdxl"
    build_tiny_sdxl_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder
