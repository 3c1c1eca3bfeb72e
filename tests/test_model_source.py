"""A wrong base model is reported before anything loads, with the fix (not an empty tokenizer later);
the model family (SD or SDXL) comes from model_index.json; a separate VAE replaces the pipeline's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextModelWithProjection

from pdm_lightning.training.datamodule import DreamBoothDataModule
from pdm_lightning.core.errors import InputDataError
from pdm_lightning.core.loading import check_model_source, load_pipeline, model_family
from pdm_lightning.core.loading import ModelSource
from pdm_lightning.tiny_sdxl import TINY_SDXL_VAE_CONFIG


def test_valid_local_folder_passes(tiny_model_dir: Path) -> None:
    check_model_source(str(tiny_model_dir))


def test_missing_local_path(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="does not exist"):
        check_model_source(str(tmp_path / "no" / "model"))


def test_folder_without_pipeline_layout_names_missing_parts(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    with pytest.raises(InputDataError, match=r"lacks tokenizer/, text_encoder/, vae/, scheduler/, model_index.json"):
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


def test_family_comes_from_model_index(tiny_model_dir: Path, tiny_sdxl_model_dir: Path) -> None:
    assert model_family(str(tiny_model_dir)) == ModelSource(str(tiny_model_dir)).family() == "sd"
    assert model_family(str(tiny_sdxl_model_dir)) == ModelSource(str(tiny_sdxl_model_dir)).family() == "sdxl"
    check_model_source(str(tiny_sdxl_model_dir))


@pytest.mark.parametrize("class_name", ["StableDiffusion3Pipeline", "FluxPipeline", "StableDiffusionXLImg2ImgPipeline"])
def test_other_pipelines_are_refused_naming_the_file(tmp_path: Path, class_name: str) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    with pytest.raises(InputDataError, match=rf"model_index.json describes a {class_name}:.*SD3, Flux"):
        check_model_source(str(tmp_path))
    with pytest.raises(InputDataError, match=str(tmp_path / "model_index.json")):
        ModelSource(str(tmp_path)).family()


def test_sdxl_folder_without_its_second_encoder_names_it(tmp_path: Path, tiny_sdxl_model_dir: Path) -> None:
    folder = Path(shutil.copytree(tiny_sdxl_model_dir, tmp_path / "sdxl", ignore=shutil.ignore_patterns("text_encoder_2")))
    with pytest.raises(InputDataError, match=r"lacks text_encoder_2/: point it at a diffusers StableDiffusionXLPipeline"):
        check_model_source(str(folder))


def test_sdxl_components_and_pipeline(tiny_sdxl_model_dir: Path) -> None:
    source = ModelSource(str(tiny_sdxl_model_dir))
    parts = source.components()
    assert parts.family == "sdxl" and isinstance(parts.text_encoder_2, CLIPTextModelWithProjection)
    assert parts.tokenizer_2.pad_token == "!" and parts.tokenizers == (parts.tokenizer, parts.tokenizer_2)
    assert parts.text_encoders == (parts.text_encoder, parts.text_encoder_2)
    assert type(parts.noise_scheduler).__name__ == "DDPMScheduler" and parts.noise_scheduler.config.clip_sample is False
    pipeline = source.pipeline()
    assert isinstance(pipeline, StableDiffusionXLPipeline) and pipeline.watermark is None
    assert [type(t).__name__ for t in source.text_encoders()] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert [t.pad_token for t in source.tokenizers()] == ["<|endoftext|>", "!"]
    assert source.unet_config()["addition_embed_type"] == "text_time"
    assert source.native_resolution() == 64  # SDXL base: 128 latents x 8 = 1024


def test_sd_components_have_no_second_encoder(tiny_model_dir: Path) -> None:
    source = ModelSource(str(tiny_model_dir))
    parts = source.components()
    assert parts.family == "sd" and parts.tokenizer_2 is None and parts.text_encoder_2 is None
    assert parts.text_encoders == (parts.text_encoder,) and len(source.tokenizers()) == 1
    assert type(source.pipeline()) is StableDiffusionPipeline
    assert source.native_resolution() == 64 and source.unet_config().get("addition_embed_type") is None


@pytest.fixture
def other_vae_dir(tmp_path: Path) -> Path:
    """A VAE folder like madebyollin/sdxl-vae-fp16-fix: config.json and weights at its root, other weights."""
    torch.manual_seed(7)
    folder = tmp_path / "vae-fp16-fix"
    AutoencoderKL(**{**TINY_SDXL_VAE_CONFIG, "force_upcast": False}).save_pretrained(folder)
    return folder


def assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


def test_vae_override_replaces_the_pipelines_vae(tiny_sdxl_model_dir: Path, other_vae_dir: Path) -> None:
    replacement = AutoencoderKL.from_pretrained(other_vae_dir)
    own = AutoencoderKL.from_pretrained(tiny_sdxl_model_dir, subfolder="vae")
    assert not torch.equal(own.encoder.conv_in.weight, replacement.encoder.conv_in.weight)
    source = ModelSource(str(tiny_sdxl_model_dir), vae_name_or_path=str(other_vae_dir))
    source.check()
    assert_same_weights(source.components().vae, replacement)
    assert_same_weights(source.vae(), replacement)
    pipeline = source.pipeline(torch.float16)
    assert_same_weights(pipeline.vae, replacement.half())
    assert pipeline.vae.dtype == torch.float16 and pipeline.vae.config.force_upcast is False
    # A pipeline folder's vae/ also serves (e.g. another SDXL model's VAE).
    assert_same_weights(load_pipeline(str(tiny_sdxl_model_dir), vae_name_or_path=str(tiny_sdxl_model_dir)).vae, own)


def test_missing_vae_folder_is_reported(tiny_sdxl_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="vae_name_or_path .*not a folder"):
        ModelSource(str(tiny_sdxl_model_dir), vae_name_or_path=str(tmp_path / "no-vae")).check()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="holds no VAE"):
        ModelSource(str(tiny_sdxl_model_dir), vae_name_or_path=str(tmp_path / "empty")).check()
