"""PDM on SDXL: the layer rule, the teacher bank conditioned on the crop it inverts, on-the-fly targets, cache keys."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import EXAMPLE_SUBJECT
from pdm_lightning.core.images import list_image_files
from pdm_lightning.core.loading import ModelSource, load_components
from pdm_lightning.features import main as features_main
from pdm_lightning.pdm import DEFAULT_PDM_LAYER, BankSettings, QueryCapture, build_bank, open_bank
from pdm_lightning.data.crops import centre_crop_time_ids
from pdm_lightning.core.loading import vae_dtype
from pdm_lightning.pdm.bank import fingerprinted_metadata
from pdm_lightning.pdm.fingerprint import model_files
from pdm_lightning.pdm.settings import PDMSettings
from pdm_lightning.pdm.teacher import PDMTeacher

SDXL_PDM_LAYER = "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q"
CLASS_PROMPT = "a photo of dog"
RESOLUTION = 64


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A 96 x 64 landscape photo (its centre crop at 64 px starts 16 px from the left) and a 256 px square one."""
    folder = tmp_path_factory.mktemp("sdxl-photos")
    first, second = list_image_files(EXAMPLE_SUBJECT, "instance")[:2]
    with Image.open(first) as image:
        image.convert("RGB").resize((96, 64)).save(folder / "wide.png")
    shutil.copy(second, folder / second.name)
    return list_image_files(folder, "instance")


def bank_settings(model_dir: Path, **overrides: object) -> BankSettings:
    pdm = PDMSettings(inversion_steps=2, dtype="float32")
    settings = pdm.bank_settings(ModelSource(str(model_dir)), CLASS_PROMPT, RESOLUTION)
    return dataclasses.replace(settings, **{"mode": "both", **overrides})


@pytest.fixture(scope="module")
def sdxl_bank(tiny_sdxl_model_dir: Path, photos: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sdxl-bank")
    build_bank(bank_settings(tiny_sdxl_model_dir), photos, folder, batch_size=2, device="cpu", progress=False)
    return folder


def test_the_pdm_layer_defaults_to_the_rule_and_sd15_keys_stay_what_they_were(
    tiny_model_dir: Path, tiny_sdxl_model_dir: Path
) -> None:
    settings = PDMSettings()
    assert settings.layer is None
    assert settings.resolved_layer(ModelSource(str(tiny_model_dir))) == DEFAULT_PDM_LAYER
    assert settings.resolved_layer(ModelSource(str(tiny_sdxl_model_dir))) == SDXL_PDM_LAYER
    assert PDMSettings(layer="up_blocks.0.x").resolved_layer(ModelSource(str(tiny_sdxl_model_dir))) == "up_blocks.0.x"
    # Bank cache keys of SD1.5 runs are those computed before SDXL existed (values from that code).
    sd15 = BankSettings("stable-diffusion-v1-5/stable-diffusion-v1-5", CLASS_PROMPT, 512)
    assert sd15.key("hub:stable-diffusion-v1-5/stable-diffusion-v1-5@451f4fe16113bff5a5d2269ed5ad43b0592e9a14") == "bf9f611cf598445b3a16"
    reduced = BankSettings("x", CLASS_PROMPT, 512, inversion_steps=50, mode="latents", dtype="float32")
    assert reduced.key("local:0123") == "accbcb0b1e8fde3b1714" and "vae" not in reduced.metadata("local:0123")
    # The SDXL folder's fingerprint covers its second text encoder and tokenizer.
    names = {path.parent.name for path in model_files(tiny_sdxl_model_dir)}
    assert {"text_encoder_2", "tokenizer_2"} <= names


def test_a_replacement_vae_joins_the_bank_key(tiny_sdxl_model_dir: Path, tmp_path: Path) -> None:
    vae_folder = tmp_path / "vae-fix"
    shutil.copytree(tiny_sdxl_model_dir / "vae", vae_folder)
    plain = bank_settings(tiny_sdxl_model_dir)
    replaced = dataclasses.replace(plain, vae_name_or_path=str(vae_folder))
    plain_metadata, replaced_metadata = fingerprinted_metadata(plain), fingerprinted_metadata(replaced)
    assert "vae" not in plain_metadata and replaced_metadata["vae"].startswith("local:")
    assert replaced_metadata.pop("vae") and replaced_metadata == plain_metadata
    # Other VAE bytes: another key (the VAE makes the clean latents the bank inverts).
    weights = next(vae_folder.glob("*.safetensors"))
    before = fingerprinted_metadata(replaced)["vae"]
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert fingerprinted_metadata(replaced)["vae"] != before
    # The module's source hands its VAE to the bank settings.
    source = ModelSource(str(tiny_sdxl_model_dir), vae_name_or_path=str(vae_folder))
    assert PDMSettings().bank_settings(source, CLASS_PROMPT, RESOLUTION).vae_name_or_path == str(vae_folder)


def test_centre_crop_time_ids_are_the_crop_the_bank_takes(photos: list[Path]) -> None:
    wide, square = photos[1], photos[0]  # sorted: 0x.jpg before wide.png
    assert wide.name == "wide.png"
    # (original height, width, crop top, left, target height, width)
    assert centre_crop_time_ids(wide, RESOLUTION).tolist() == [64, 96, 0, 16, 64, 64]
    assert centre_crop_time_ids(square, RESOLUTION).tolist() == [256, 256, 0, 0, 64, 64]


def test_sdxl_bank_rows_are_the_queries_of_the_unet_conditioned_as_sdxl_pipelines_do(
    tiny_sdxl_model_dir: Path, sdxl_bank: Path, photos: list[Path]
) -> None:
    from diffusers import StableDiffusionXLPipeline

    settings = bank_settings(tiny_sdxl_model_dir)
    assert settings.layer == SDXL_PDM_LAYER
    bank = open_bank(sdxl_bank, photos, settings)
    assert bank.query_shape == (16, 64)  # 64 px / 16 = 4 x 4 tokens x 64 channels
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
    with torch.no_grad():
        embeds, _, pooled, _ = pipeline.encode_prompt(CLASS_PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=False)

    def query(latents: torch.Tensor, timestep: int, time_ids: list[int]) -> torch.Tensor:
        conditioning = {"text_embeds": pooled, "time_ids": torch.tensor([time_ids], dtype=pooled.dtype)}
        with torch.no_grad(), QueryCapture(pipeline.unet, SDXL_PDM_LAYER) as capture:
            pipeline.unet(latents, timestep, encoder_hidden_states=embeds, added_cond_kwargs=conditioning)
            return capture.pop()[0]

    wide = photos.index(next(p for p in photos if p.name == "wide.png"))
    for timestep in bank.timesteps.tolist():
        index, step = torch.tensor([wide]), torch.tensor([timestep])
        latents = bank.latents(index, step)
        expected = query(latents, timestep, [64, 96, 0, 16, 64, 64])
        torch.testing.assert_close(bank.queries(index, step)[0], expected, rtol=1e-4, atol=1e-5)
    # The size conditioning matters: the uncropped sizes give another query.
    assert (query(latents, timestep, [64, 64, 0, 0, 64, 64]) - expected).abs().max() > 1e-4


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sdxl_on_the_fly_targets_equal_the_bank(
    tiny_sdxl_model_dir: Path, sdxl_bank: Path, photos: list[Path], lora: bool
) -> None:
    from pdm_lightning.training.lora import LoraSettings, add_lora_adapters

    settings = PDMSettings(teacher="on_the_fly", inversion_steps=2, dtype="float32", features_dir=str(sdxl_bank))
    teacher = PDMTeacher(settings, ModelSource(str(tiny_sdxl_model_dir)))
    entries = teacher.entries(photos, CLASS_PROMPT, RESOLUTION)
    images, timesteps = [1, 0, 1], [0, 999, 1]
    items = [entries.item(i, t) for i, t in zip(images, timesteps)]
    assert set(items[0]) == {"latents", "condition", "pooled", "time_ids"}
    assert items[0]["time_ids"].tolist() == centre_crop_time_ids(photos[1], RESOLUTION).tolist()
    batch = {name: torch.stack([item[name] for item in items]) for name in items[0]}
    unet = load_components(str(tiny_sdxl_model_dir)).unet
    if lora:  # the teacher is the same UNet with its adapters off
        # Random up matrices too: the student differs from the teacher from the start.
        settings = LoraSettings(rank=2, init_lora_weights=False)
        add_lora_adapters(unet, settings, settings.unet_target_modules)
    teacher.attach(unet, lora=lora, teacher_dtype=torch.float32)
    assert teacher.layer == SDXL_PDM_LAYER
    targets = teacher.targets(batch, torch.tensor(timesteps))
    expected = open_bank(sdxl_bank, photos).queries(torch.tensor(images), torch.tensor(timesteps))
    torch.testing.assert_close(targets, expected, rtol=1e-4, atol=1e-5)
    teacher.release()


def test_features_cli_on_sdxl_uses_the_rules_layer(tiny_sdxl_model_dir: Path, photos: list[Path], tmp_path: Path) -> None:
    instance = tmp_path / "photos"
    instance.mkdir()
    shutil.copy(photos[1], instance / photos[1].name)
    out = tmp_path / "features"
    args = ["--pretrained_model_name_or_path", str(tiny_sdxl_model_dir), "--instance_data_dir", str(instance),
            "--class_prompt", CLASS_PROMPT, "--resolution", str(RESOLUTION), "--out", str(out), "--no_progress",
            "--inversion_steps", "1"]
    assert features_main(args) == 0
    with safe_open(str(out / "wide.safetensors"), framework="pt") as handle:
        assert handle.metadata()["layer"] == SDXL_PDM_LAYER
        assert handle.get_slice("queries").get_shape() == [2, 16, 64]


def test_sdxl_vae_stays_float32_where_float16_would_overflow(tiny_model_dir: Path, tiny_sdxl_model_dir: Path) -> None:
    sdxl, sd = load_components(str(tiny_sdxl_model_dir)), load_components(str(tiny_model_dir))
    assert sdxl.vae.config.force_upcast
    assert vae_dtype(sdxl.vae, "sdxl", torch.float16) == torch.float32
    assert vae_dtype(sdxl.vae, "sdxl", torch.bfloat16) == torch.bfloat16  # bfloat16 has float32's range
    assert vae_dtype(sd.vae, "sd", torch.float16) == torch.float16  # SD runs are unchanged
    fixed = load_components(str(tiny_sdxl_model_dir)).vae
    fixed.register_to_config(force_upcast=False)  # what the fp16-fix VAE's config says
    assert vae_dtype(fixed, "sdxl", torch.float16) == torch.float16


def test_a_traced_sdxl_unet_builds_the_eager_bank_bit_for_bit(
    tiny_sdxl_model_dir: Path, sdxl_bank: Path, photos: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from pdm_lightning.pdm import query_unet

    traces = []
    trace = query_unet._trace
    monkeypatch.setattr(query_unet, "_trace", lambda *args: traces.append(1) or trace(*args))
    monkeypatch.setattr(query_unet, "MIN_CALLS_TO_TRACE", 0)
    with caplog.at_level(logging.INFO, logger=query_unet.__name__):
        build_bank(bank_settings(tiny_sdxl_model_dir), photos, tmp_path, batch_size=2, device="cpu", progress=False)
    assert traces == [1] and "eagerly" not in caplog.text  # the pooled embedding and time ids are traced inputs
    for photo in photos:
        name = f"{photo.stem}.safetensors"
        assert (tmp_path / name).read_bytes() == (sdxl_bank / name).read_bytes()
