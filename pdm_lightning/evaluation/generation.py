"""Generating the evaluation images with the module's live weights, one fixed seed per image."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from pdm_lightning.generate import GenerationSettings, ImageJob, sample_images
from pdm_lightning.model.inference import inference_pipeline


@torch.no_grad()
def generate_for_requests(module: Any, requests: list[dict[str, Any]]) -> list[Image.Image]:
    """One image per request (prompt, seed, sampler settings) with ``inference_pipeline(module)``.

    Each image has its own generator (``generate.sample_images``), so an image does not depend on
    what else is in the batch. The caller owns train/eval mode and the precision context.
    """
    first = requests[0]
    settings = ("num_inference_steps", "guidance_scale", "scheduler", "resolution")
    if any(tuple(r[k] for k in settings) != tuple(first[k] for k in settings) for r in requests):
        raise ValueError("All requests of a batch must share the sampler settings.")
    generation = GenerationSettings(
        num_inference_steps=int(first["num_inference_steps"]), guidance_scale=float(first["guidance_scale"]),
        scheduler=first["scheduler"], height=first["resolution"], width=first["resolution"],
    )
    pipeline = inference_pipeline(module, generation.scheduler)
    pipeline.set_progress_bar_config(disable=True)
    jobs = [ImageJob(int(r["prompt_index"]), r["prompt"], int(r["image_index"]), int(r["seed"])) for r in requests]
    return sample_images(pipeline, jobs, generation)
