"""Sampling images: a pipeline over a module's live weights, and generation that leaves training untouched.

``generate_from_module`` is the one way the project generates from the model being trained or
evaluated (samples during fit, the quality checkpoint, ``train.py predict`` / ``test``):
``generate_images`` writes a pipeline's images to a folder (``predict.py``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from tqdm.auto import tqdm

from pdm_lightning.core.loading import pipeline_options
from pdm_lightning.generation.files import write_grids, write_image
from pdm_lightning.generation.jobs import ImageJob, chunked, plan_jobs, unpack_job_batch
from pdm_lightning.generation.schedulers import make_scheduler, use_scheduler
from pdm_lightning.generation.settings import GenerationSettings


class DiffusionModule(Protocol):
    """What sampling needs of a module: the Stable Diffusion parts it trains or holds frozen.

    An SDXL module also has ``text_encoder_2`` and ``tokenizer_2`` (None or absent for SD).
    """

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    unet: torch.nn.Module
    noise_scheduler: Any


class HeldOutput(Protocol):
    """A forward hook's keeper (the PDM query capture): sampling's UNet calls would overwrite what it holds."""

    output: Any


def inference_pipeline(module: DiffusionModule, scheduler: str = "dpmsolver++") -> DiffusionPipeline:
    """A StableDiffusionPipeline (StableDiffusionXLPipeline for a module with ``text_encoder_2``) that
    shares the module's modules (no copy, no reload from disk).

    Whatever the module holds is what samples: LoRA adapters active, fine-tuned weights as they are
    now. The caller owns train/eval mode and the no-grad context (``preserved_training_state``).
    """
    parts = {
        "vae": module.vae,
        "text_encoder": module.text_encoder,
        "tokenizer": module.tokenizer,
        "unet": module.unet,
        "scheduler": make_scheduler(scheduler, module.noise_scheduler.config),
    }
    text_encoder_2 = getattr(module, "text_encoder_2", None)
    if text_encoder_2 is not None:
        return StableDiffusionXLPipeline(
            **parts, text_encoder_2=text_encoder_2, tokenizer_2=module.tokenizer_2, **pipeline_options("sdxl")
        )
    return StableDiffusionPipeline(**parts, feature_extractor=None, **pipeline_options("sd"))


@contextmanager
def preserved_training_state(module: torch.nn.Module, held: Sequence[HeldOutput | None] = ()) -> Iterator[None]:
    """Evaluation mode, no autograd, and on exit every submodule's mode, every global RNG and what each
    of ``held`` holds, as they were.

    Modes are restored one by one because the module keeps its frozen parts in eval mode while
    training; a plain ``module.train()`` would not give back the same state. no_grad (not
    inference_mode) so that no tensor made here is unusable by the training that follows.
    """
    modes = {name: sub.training for name, sub in module.named_modules()}
    keepers = [keeper for keeper in held if keeper is not None]
    outputs = [keeper.output for keeper in keepers]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            module.eval()
            yield
    finally:
        for name, sub in module.named_modules():
            sub.training = modes.get(name, sub.training)
        for keeper, output in zip(keepers, outputs):
            keeper.output = output
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def sample_images(
    pipeline: DiffusionPipeline, jobs: Sequence[ImageJob], settings: GenerationSettings
) -> list[Image.Image]:
    """One sampling batch: each job's image from its own generator (same seed, same image, any batch).

    SD and SDXL pipelines take the same call; SDXL conditions on the image size itself (original and
    target size = the generated size, no crop).
    """
    device = pipeline._execution_device
    generators = [torch.Generator(device=device).manual_seed(job.seed) for job in jobs]
    negative = [settings.negative_prompt] * len(jobs) if settings.negative_prompt else None
    return pipeline(
        [job.prompt for job in jobs],
        negative_prompt=negative,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        height=settings.height,
        width=settings.width,
        generator=generators,
    ).images


def generate_from_module(
    module: torch.nn.Module,
    jobs: Sequence[ImageJob],
    settings: GenerationSettings,
    batch_size: int | None = None,
    forward_context: Callable[[], AbstractContextManager] = nullcontext,
    held: Sequence[HeldOutput | None] = (),
) -> list[Image.Image]:
    """The jobs' images from ``module``'s live weights, its training state handed back untouched.

    ``module`` has the Stable Diffusion parts (``DiffusionModule``). Sampling runs in eval mode without
    gradients on forked RNGs, in ``batch_size`` batches (None: one), inside ``forward_context`` (the
    Trainer's precision context); modes, RNG states, gradients and the outputs ``held`` by forward
    hooks are as before afterwards, so a run that generates ends exactly as one that does not.
    """
    batches = chunked(jobs, batch_size or max(len(jobs), 1))
    images: list[Image.Image] = []
    with preserved_training_state(module, held), forward_context():
        pipeline = inference_pipeline(module, settings.scheduler)
        pipeline.set_progress_bar_config(disable=True)
        for batch in batches:
            images += sample_images(pipeline, batch, settings)
    return images


def generate_batch(
    module: torch.nn.Module, batch: Mapping[str, Any], held: Sequence[HeldOutput | None] = ()
) -> dict[str, Any]:
    """A ``predict_step`` / ``test_step``: the batch (a ``jobs.job_batch``) with its ``images`` added."""
    jobs, settings = unpack_job_batch(batch)
    # Plain dicts and images: Lightning's output transfer refuses frozen dataclasses.
    return {**batch, "images": generate_from_module(module, jobs, settings, held=held)}


@torch.no_grad()
def generate_images(
    pipeline: DiffusionPipeline,
    prompts: Sequence[str],
    out_dir: str | Path,
    num_images: int = 4,
    seed: int = 0,
    settings: GenerationSettings | None = None,
    batch_size: int = 4,
    model: str = "",
) -> list[Path]:
    """Generates ``num_images`` per prompt into ``out_dir`` plus a grid per prompt in ``out_dir/grids``.

    Returns the image paths (grids excluded), prompt by prompt. ``model`` is recorded in the metadata.
    """
    settings = settings or GenerationSettings()
    jobs = plan_jobs(prompts, num_images, seed)
    batches = chunked(jobs, batch_size)  # both checked before anything is written
    use_scheduler(pipeline, settings.scheduler)
    pipeline.set_progress_bar_config(disable=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tqdm(total=len(jobs), desc="Generating", unit="img") as progress:
        for batch in batches:
            for job, image in zip(batch, sample_images(pipeline, batch, settings)):
                written.append(write_image(out_dir, job, image, settings, model, seed))
            progress.update(len(batch))
    write_grids(out_dir, jobs)
    return written
