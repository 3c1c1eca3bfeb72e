"""Generated images on disk: file names, PNGs with what reproduces them in their metadata, grids."""

from __future__ import annotations

import io
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, PngImagePlugin

from pdm_lightning.core.atomic import write_bytes_atomically
from pdm_lightning.generation.jobs import CLASS, ImageJob
from pdm_lightning.generation.settings import GenerationSettings

GRID_DIRNAME = "grids"


def slugify(text: str, max_length: int = 60) -> str:
    """A file-name-safe version of a prompt."""
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:max_length] or "prompt"


def image_file_name(job: ImageJob) -> str:
    """``<prompt index>_<prompt>_<image index>.png``; ``class_<image index>.png`` for a class-prompt image."""
    if job.kind == CLASS:
        return f"class_{job.image_index:02d}.png"
    return f"{job.prompt_index:02d}_{slugify(job.prompt)}_{job.image_index:02d}.png"


def grid_name(prompt_index: int, prompt: str) -> str:
    """The name (without extension) of a prompt's grid, also its TensorBoard tag's last part."""
    return f"{prompt_index:02d}_{slugify(prompt)}"


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


def save_png_with_metadata(image: Image.Image, path: Path, metadata: Mapping[str, str]) -> None:
    """Writes ``image`` as PNG with ``metadata`` in its text chunks, atomically."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    write_bytes_atomically(path, buffer.getvalue())


def open_rgb(path: str | Path) -> Image.Image:
    """A written PNG read back as RGB (closed again at once)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def write_image(
    out_dir: Path, job: ImageJob, image: Image.Image, settings: GenerationSettings, model: str, run_seed: int
) -> Path:
    """Saves one generated image with what reproduces it (prompt, seed, sampler, model) in its metadata."""
    path = out_dir / image_file_name(job)
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
        images = [open_rgb(out_dir / image_file_name(job)) for job in sorted(prompt_jobs, key=lambda j: j.image_index)]
        path = out_dir / GRID_DIRNAME / f"{grid_name(prompt_index, prompt_jobs[0].prompt)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png_with_metadata(make_grid(images), path, {"prompt": prompt_jobs[0].prompt})
        written.append(path)
    return written
