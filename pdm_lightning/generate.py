"""Seeded, batched image generation shared by predict.py, ``train.py predict`` and the sample callback.

Image k of every prompt is drawn from its own generator seeded with ``derive_seed(seed, k)``, so an
image depends only on (prompt, seed, k): not on the batch size, the number of prompts or the order
they are generated in.
"""

from __future__ import annotations

import io
import math
import re
import string
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from pdm_lightning.atomic import write_bytes_atomically
from pdm_lightning.data.images import InputDataError
from pdm_lightning.data.sampler import derive_seed
from pdm_lightning.model.inference import SCHEDULERS, make_scheduler

# Positional aliases of the named placeholders (``{0}`` identifier, ``{1}`` class noun, as in
# DreamBench's prompt lists).
POSITIONAL_PLACEHOLDERS = {"0": "identifier", "1": "class_noun"}
GRID_DIRNAME = "grids"
# Stable Diffusion's VAE downsamples by 8: the pipeline refuses other image sizes.
SIZE_MULTIPLE = 8


def require_positive(name: str, value: int) -> int:
    """``value`` when it is at least 1, else an InputDataError naming ``name``."""
    if value < 1:
        raise InputDataError(f"{name} must be at least 1, got {value}.")
    return value


@dataclass
class GenerationSettings:
    """How each image is sampled.

    Args:
        num_inference_steps: sampler steps.
        guidance_scale: classifier-free guidance scale (1 disables guidance).
        negative_prompt: prompt to steer away from (None: the empty prompt).
        scheduler: sampler name (dpmsolver++, ddim, euler, euler_a, pndm, unipc, ddpm).
        height: image height in pixels (None: the model's native size).
        width: image width in pixels (None: the model's native size).
    """

    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    scheduler: str = "dpmsolver++"
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        # Checked when the settings are made, not when the first image is sampled (after the weights load).
        if self.scheduler not in SCHEDULERS:
            raise InputDataError(f"Unknown scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}.")
        require_positive("num_inference_steps", self.num_inference_steps)
        for name in ("height", "width"):
            size = getattr(self, name)
            if size is not None and (size < SIZE_MULTIPLE or size % SIZE_MULTIPLE):
                raise InputDataError(f"{name} must be a positive multiple of {SIZE_MULTIPLE} pixels, got {size}.")

    def metadata(self) -> dict[str, str]:
        """The settings as PNG text fields."""
        fields = {
            "steps": str(self.num_inference_steps),
            "guidance_scale": str(self.guidance_scale),
            "scheduler": self.scheduler,
        }
        if self.negative_prompt:
            fields["negative_prompt"] = self.negative_prompt
        return fields


@dataclass
class PredictSettings(GenerationSettings):
    """What ``train.py predict`` generates (``--data.predict.*``); written under ``<run>/predictions``.

    Args:
        prompts: prompts, may use ``{identifier}`` / ``{class_noun}`` (or ``{0}`` / ``{1}``); with
            neither prompts nor prompts_file, the instance prompt is used.
        prompts_file: text file with one prompt per line (blank lines and ``#`` comments skipped).
        identifier: fills ``{identifier}``; None infers it from the instance and class prompts.
        class_noun: fills ``{class_noun}``; None infers it from the instance and class prompts.
        num_images_per_prompt: images per prompt.
        seed: image k of a prompt uses seed derive_seed(seed, k).
        batch_size: images per sampling batch.
        num_inference_steps: sampler steps.
        guidance_scale: classifier-free guidance scale.
        negative_prompt: prompt to steer away from.
        scheduler: sampler name (dpmsolver++, ddim, euler, euler_a, pndm, unipc, ddpm).
        height: image height (None: the model's native size).
        width: image width (None: the model's native size).
    """

    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    identifier: str | None = None
    class_noun: str | None = None
    num_images_per_prompt: int = 4
    seed: int = 0
    batch_size: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("num_images_per_prompt", self.num_images_per_prompt)
        require_positive("batch_size", self.batch_size)

    def generation(self) -> GenerationSettings:
        """The sampling part alone (what each predict batch carries)."""
        return GenerationSettings(**{f.name: getattr(self, f.name) for f in fields(GenerationSettings)})


@dataclass(frozen=True)
class ImageJob:
    """One image to generate: image ``image_index`` of prompt ``prompt_index``."""

    prompt_index: int
    prompt: str
    image_index: int
    seed: int


def slugify(text: str, max_length: int = 60) -> str:
    """A file-name-safe version of a prompt."""
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:max_length] or "prompt"


def fill_prompt(template: str, identifier: str | None = None, class_noun: str | None = None) -> str:
    """``template`` with ``{identifier}``/``{0}`` and ``{class_noun}``/``{1}`` replaced; ``{{`` is a literal brace.

    Raises InputDataError naming the prompt for an unknown placeholder or a value that is not set.
    """
    values = {"identifier": identifier, "class_noun": class_noun}
    pieces = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise InputDataError(f"Prompt {template!r}: {error}; write a literal brace as {{{{ or }}}}.") from None
    for literal, name, format_spec, conversion in parsed:
        pieces.append(literal)
        if name is None:
            continue
        key = POSITIONAL_PLACEHOLDERS.get(name, name)
        if key not in values or format_spec or conversion:
            raise InputDataError(
                f"Prompt {template!r} has an unknown placeholder {{{name}}}: use {{identifier}} / {{0}} or "
                "{class_noun} / {1}, or write a literal brace as {{ or }}."
            )
        if values[key] is None:
            raise InputDataError(
                f"Prompt {template!r} uses {{{name}}} but no {key} is set: pass it (--{key} / --data.predict.{key})."
            )
        pieces.append(values[key])
    return "".join(pieces)


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"prompts file {path} does not exist: give a text file with one prompt per line.")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise InputDataError(f"prompts file {path} holds no prompt: write one prompt per line.")
    return prompts


def collect_prompts(
    prompts: Sequence[str] = (),
    prompts_file: str | Path | None = None,
    identifier: str | None = None,
    class_noun: str | None = None,
) -> list[str]:
    """The inline prompts then the file's, with placeholders filled."""
    templates = list(prompts) + (read_prompts_file(prompts_file) if prompts_file else [])
    if not templates:
        raise InputDataError("No prompt given: pass --prompt (repeatable) or --prompts_file.")
    return [fill_prompt(t, identifier, class_noun) for t in templates]


def plan_jobs(prompts: Sequence[str], num_images: int, seed: int) -> list[ImageJob]:
    """Every image to generate, prompt by prompt; image k of every prompt is seeded with derive_seed(seed, k)."""
    require_positive("The number of images per prompt", num_images)
    return [
        ImageJob(prompt_index, prompt, k, derive_seed(seed, k))
        for prompt_index, prompt in enumerate(prompts)
        for k in range(num_images)
    ]


def predict_jobs(settings: PredictSettings, instance_prompt: str, class_prompt: str | None = None) -> list[ImageJob]:
    """The images ``train.py predict`` generates; placeholders default to what the run's prompts say.

    Without prompts or a prompts file the instance prompt is used.
    """
    from pdm_lightning.identifier import infer_identifier

    identifier, class_noun = infer_identifier(instance_prompt, class_prompt)
    inline = settings.prompts or ([] if settings.prompts_file else [instance_prompt])
    prompts = collect_prompts(
        inline, settings.prompts_file, settings.identifier or identifier, settings.class_noun or class_noun
    )
    return plan_jobs(prompts, settings.num_images_per_prompt, settings.seed)


def collate_image_jobs(items: Sequence[dict], generation: GenerationSettings, run_seed: int) -> dict:
    """A predict batch: the jobs (as dicts, which Lightning's batch transfer leaves alone) and how to sample."""
    return {"jobs": list(items), "generation": asdict(generation), "run_seed": run_seed}


def chunked(jobs: Sequence[ImageJob], batch_size: int) -> list[list[ImageJob]]:
    """The sampling batches; a list (not a generator) so that a bad batch_size fails at the call."""
    require_positive("batch_size", batch_size)
    return [list(jobs[start : start + batch_size]) for start in range(0, len(jobs), batch_size)]


def use_scheduler(pipeline: StableDiffusionPipeline, name: str) -> StableDiffusionPipeline:
    """Swaps the pipeline's sampler for ``name``, keeping its betas and prediction type."""
    pipeline.scheduler = make_scheduler(name, pipeline.scheduler.config)
    return pipeline


def sample_images(
    pipeline: StableDiffusionPipeline, jobs: Sequence[ImageJob], settings: GenerationSettings
) -> list[Image.Image]:
    """One sampling batch: each job's image from its own generator (same seed, same image, any batch)."""
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


def make_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """The images side by side in rows of ``columns`` (default: as square as possible)."""
    if not images:
        raise ValueError("make_grid needs at least one image.")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        position = ((index % columns) * width, (index // columns) * height)
        grid.paste(image.convert("RGB").resize((width, height)), position)
    return grid


def save_png_with_metadata(image: Image.Image, path: Path, metadata: dict[str, str]) -> None:
    """Writes ``image`` as PNG with ``metadata`` in its text chunks, atomically."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    write_bytes_atomically(path, buffer.getvalue())


def image_path(out_dir: Path, job: ImageJob) -> Path:
    return out_dir / f"{job.prompt_index:02d}_{slugify(job.prompt)}_{job.image_index:02d}.png"


def grid_path(out_dir: Path, prompt_index: int, prompt: str) -> Path:
    return out_dir / GRID_DIRNAME / f"{prompt_index:02d}_{slugify(prompt)}.png"


def write_image(
    out_dir: Path, job: ImageJob, image: Image.Image, settings: GenerationSettings, model: str, run_seed: int
) -> Path:
    """Saves one generated image with what reproduces it (prompt, seed, sampler, model) in its metadata."""
    path = image_path(out_dir, job)
    metadata = {"prompt": job.prompt, "seed": str(job.seed), "run_seed": str(run_seed),
                "image_index": str(job.image_index), **settings.metadata(), "model": model}
    save_png_with_metadata(image, path, metadata)
    return path


def write_grids(out_dir: Path, jobs: Sequence[ImageJob]) -> list[Path]:
    """One grid per prompt of the images already written for ``jobs`` (read back from ``out_dir``)."""
    by_prompt: dict[int, list[ImageJob]] = defaultdict(list)
    for job in jobs:
        by_prompt[job.prompt_index].append(job)
    written = []
    for prompt_index, prompt_jobs in sorted(by_prompt.items()):
        images = []
        for job in sorted(prompt_jobs, key=lambda j: j.image_index):
            with Image.open(image_path(out_dir, job)) as image:
                images.append(image.convert("RGB"))
        path = grid_path(out_dir, prompt_index, prompt_jobs[0].prompt)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png_with_metadata(make_grid(images), path, {"prompt": prompt_jobs[0].prompt})
        written.append(path)
    return written


@torch.no_grad()
def generate_images(
    pipeline: StableDiffusionPipeline,
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
