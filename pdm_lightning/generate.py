"""Generating images from an exported pipeline folder, seeded per image so results are reproducible."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from pdm_lightning.atomic import write_bytes_atomically
from pdm_lightning.data.sampler import derive_seed
from pdm_lightning.model.loading import load_pipeline


def slugify(text: str, max_length: int = 60) -> str:
    """A file-name-safe version of a prompt."""
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:max_length] or "prompt"


def save_png_with_metadata(image: Image.Image, path: Path, metadata: dict[str, str]) -> None:
    """Writes ``image`` as PNG with ``metadata`` in its text chunks, atomically."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    write_bytes_atomically(path, buffer.getvalue())


@torch.no_grad()
def generate_images(
    pipeline_dir: str | Path,
    prompts: Sequence[str],
    out_dir: str | Path,
    num_images: int = 4,
    seed: int = 0,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[Path]:
    """Generates ``num_images`` per prompt into ``out_dir``; image k of a prompt uses seed (seed, k).

    The same seed gives the same images whatever the number of prompts; returns the written paths.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = load_pipeline(str(pipeline_dir), dtype=dtype).to(device)
    pipeline.set_progress_bar_config(disable=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tqdm(total=len(prompts) * num_images, desc="Generating", unit="img") as progress:
        for prompt_index, prompt in enumerate(prompts):
            for k in range(num_images):
                image_seed = derive_seed(seed, k)
                generator = torch.Generator(device=device).manual_seed(image_seed)
                image = pipeline(
                    prompt,
                    negative_prompt=negative_prompt,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=generator,
                ).images[0]
                path = out_dir / f"{prompt_index:02d}_{slugify(prompt)}_{k:02d}.png"
                save_png_with_metadata(
                    image, path, {"prompt": prompt, "seed": str(image_seed), "steps": str(num_inference_steps),
                                  "guidance_scale": str(guidance_scale), "model": str(pipeline_dir)}
                )
                written.append(path)
                progress.update(1)
    return written
