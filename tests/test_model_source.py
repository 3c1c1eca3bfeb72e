"""A wrong base model is reported before anything loads, with the fix (not an empty tokenizer later)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdm_lightning.training.datamodule import DreamBoothDataModule
from pdm_lightning.core.errors import InputDataError
from pdm_lightning.core.loading import check_model_source
from pdm_lightning.core.loading import ModelSource


def test_valid_local_folder_passes(tiny_model_dir: Path) -> None:
    check_model_source(str(tiny_model_dir))


def test_missing_local_path(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="does not exist"):
        check_model_source(str(tmp_path / "no" / "model"))


def test_folder_without_pipeline_layout_names_missing_parts(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    with pytest.raises(InputDataError, match=r"lacks tokenizer, text_encoder, vae, scheduler/"):
        check_model_source(str(tmp_path))


def test_single_file_checkpoint_explains_conversion(tmp_path: Path) -> None:
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"x")
    with pytest.raises(InputDataError, match="from_single_file"):
        check_model_source(str(single))


def test_unknown_hub_id_offline_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(InputDataError, match="could not be fetched from the hub"):
        check_model_source("no-such-owner/no-such-model")


def test_prepare_data_checks_the_model_before_generating(instance_dir: Path, tmp_path: Path) -> None:
    datamodule = DreamBoothDataModule(
        instance_data_dir=str(instance_dir), instance_prompt="a photo of sks dog",
        base_model=ModelSource(str(tmp_path / "missing-model")), resolution=64,
        with_prior_preservation=True, class_data_dir=str(tmp_path / "class"), class_prompt="a photo of dog",
    )
    with pytest.raises(InputDataError, match="missing-model"):
        datamodule.prepare_data()
    assert not (tmp_path / "class").exists()
