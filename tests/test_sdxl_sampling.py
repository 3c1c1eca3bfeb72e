"""Generation (predict, samples, evaluation, class images) with SDXL: the same calls as for SD."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from pdm_lightning.core.loading import ModelSource, load_pipeline
from pdm_lightning.generation.jobs import job_batch, plan_jobs
from pdm_lightning.generation.sampling import generate_batch, generate_from_module, generate_images, inference_pipeline
from pdm_lightning.generation.settings import GenerationSettings

SETTINGS = GenerationSettings(num_inference_steps=2, scheduler="ddim", height=64, width=64)


class SDXLParts(torch.nn.Module):
    """A module with an SDXL model's parts, as the training module will hold them."""

    def __init__(self, model_dir: Path) -> None:
        super().__init__()
        parts = ModelSource(str(model_dir)).components()
        self.unet, self.vae = parts.unet, parts.vae
        self.text_encoder, self.text_encoder_2 = parts.text_encoder, parts.text_encoder_2
        self.tokenizer, self.tokenizer_2, self.noise_scheduler = parts.tokenizer, parts.tokenizer_2, parts.noise_scheduler


@pytest.fixture(scope="module")
def module(tiny_sdxl_model_dir: Path) -> SDXLParts:
    return SDXLParts(tiny_sdxl_model_dir).train()


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


def test_inference_pipeline_is_sdxl_sharing_the_modules(module: SDXLParts) -> None:
    pipeline = inference_pipeline(module, "euler")
    assert isinstance(pipeline, StableDiffusionXLPipeline) and pipeline.watermark is None
    assert pipeline.unet is module.unet and pipeline.text_encoder_2 is module.text_encoder_2
    assert type(pipeline.scheduler).__name__ == "EulerDiscreteScheduler"


def test_generate_from_module_matches_the_saved_pipeline_and_keeps_training_state(
    module: SDXLParts, tiny_sdxl_model_dir: Path, tmp_path: Path
) -> None:
    jobs = plan_jobs(["a photo of sks dog", "a red cube"], num_images=1, seed=5)
    rng = torch.get_rng_state()
    images = generate_from_module(module, jobs, SETTINGS)
    assert torch.equal(torch.get_rng_state(), rng) and module.unet.training
    assert [image.size for image in images] == [(64, 64)] * 2
    # The same images one by one (up to float rounding in batched kernels: one level of 255),
    # through predict_step's batch, and from the saved pipeline through predict.py's path.
    one_by_one = generate_from_module(module, jobs, SETTINGS, batch_size=1)
    assert np.abs(pixels(one_by_one).astype(int) - pixels(images)).max() <= 1
    batch = generate_batch(module, job_batch([asdict(job) for job in jobs], SETTINGS, run_seed=5))
    np.testing.assert_array_equal(pixels(batch["images"]), pixels(images))
    pipeline = load_pipeline(str(tiny_sdxl_model_dir))
    written = generate_images(pipeline, ["a photo of sks dog", "a red cube"], tmp_path, num_images=1, seed=5, settings=SETTINGS)
    loaded = [Image.open(path).convert("RGB") for path in written]
    np.testing.assert_array_equal(pixels(loaded), pixels(images))
    assert (tmp_path / "grids").is_dir() and pixels(images).std() > 0


def test_default_size_is_the_models_native_size(module: SDXLParts) -> None:
    # The tiny model's UNet sample_size 8 latents -> 64 px (SDXL base: 128 -> 1024 px).
    settings = GenerationSettings(num_inference_steps=1, scheduler="euler", guidance_scale=1.0)
    (image,) = generate_from_module(module, plan_jobs(["a dog"], 1, 0), settings)
    assert image.size == (64, 64)
