"""The benchmark's inputs on disk, made once and reused: the preset model, the photos, the class images.

Layout under the work folder (default ``$TMPDIR/pdm_lightning_benchmarks``):
``models/<preset>/`` (built by ``python -m pdm_lightning.tiny --preset <preset>``), ``photos/<N>x<R>_4x3/`` and
``masks/<N>x<R>_4x3/`` (the bundled dog photos and masks stretched to 4:3 like camera photos, at least the
resolution high), ``class_images/<R>/``
(random-noise PNGs: prior preservation then reads class images without generating any), ``bank_cache/`` (the PDM
banks the cases build and reuse), ``runs/`` (each case's run folder, removed after the case).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PHOTOS = REPO_ROOT / "examples" / "dog"
EXAMPLE_MASKS = REPO_ROOT / "examples" / "dog_masks"
INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of dog"


def default_workdir() -> Path:
    return Path(tempfile.gettempdir()) / "pdm_lightning_benchmarks"


def unknown_option(stderr: str) -> str | None:
    """The option a CLI refused (ours: ``unknown option --x``; argparse: ``unrecognized arguments: --x``)."""
    for marker in ("unknown option ", "unrecognized arguments: "):
        if marker in stderr:
            return stderr.split(marker, 1)[1].split()[0].rstrip(";,")
    return None


def write_json(path: Path, document: dict[str, Any]) -> None:
    """``document`` as indented JSON at ``path``, replaced in one rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(document, indent=1))
    os.replace(partial, path)


def build_preset_model(preset: str, out_dir: Path, env: dict[str, str] | None = None) -> Path:
    """The preset's random pipeline in ``out_dir`` (kept when already there), built in a subprocess."""
    if (out_dir / "model_index.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pdm_lightning.tiny", "--preset", preset, str(out_dir)]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"Building the {preset} model failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    return out_dir


def camera_shaped_copy(source: Path, target: Path, resolution: int, resample: int) -> None:
    """``source`` stretched to 4:3 landscape, its height at least ``resolution`` (never downscaled).

    Most photos are not square: their square training crop then moves every step, so their latents cannot be
    cached. The bundled photos are 256 px squares; square photos would crop the same every step and let our run
    cache their latents, a best case that would flatter the comparison with the plain loop.
    """
    image = Image.open(source)
    height = max(resolution, image.height)
    image.resize((round(height * 4 / 3), height), resample=resample).save(target)


@dataclass(frozen=True)
class Inputs:
    """The folders a case trains on."""

    model: Path
    photos: Path
    masks: Path
    class_images: Path
    num_class_images: int
    bank_cache: Path
    runs: Path


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root

    def photos(self, count: int, resolution: int) -> tuple[Path, Path]:
        """The first ``count`` bundled photos and their masks, 4:3, at least ``resolution`` px high."""
        name = f"{count}x{resolution}_4x3"
        photos, masks = self.root / "photos" / name, self.root / "masks" / name
        sources = sorted(EXAMPLE_PHOTOS.glob("*.jpg"))[:count]
        if len(sources) < count:
            raise ValueError(f"--photos {count}: examples/dog has only {len(sources)} photos.")
        for folder in (photos, masks):
            folder.mkdir(parents=True, exist_ok=True)
        for source in sources:
            if not (photos / source.name).is_file():
                camera_shaped_copy(source, photos / source.name, resolution, Image.BICUBIC)
            mask = EXAMPLE_MASKS / f"{source.stem}.png"
            if not (masks / mask.name).is_file():
                camera_shaped_copy(mask, masks / mask.name, resolution, Image.NEAREST)
        return photos, masks

    def class_images(self, count: int, resolution: int) -> Path:
        """``count`` random-noise PNGs of ``resolution`` px: prior preservation's class chunk without generating any."""
        folder = self.root / "class_images" / str(resolution)
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for index in range(count):
            path = folder / f"noise_{index:03d}.png"
            if not path.is_file():
                pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path)
        return folder

    def inputs(self, preset: str, model: Path | None, photos: int, resolution: int, num_class_images: int = 4,
               env: dict[str, str] | None = None) -> Inputs:
        model_dir = model or build_preset_model(preset, self.root / "models" / preset, env)
        photo_dir, mask_dir = self.photos(photos, resolution)
        return Inputs(
            model=model_dir.resolve(),
            photos=photo_dir,
            masks=mask_dir,
            class_images=self.class_images(num_class_images, resolution),
            num_class_images=num_class_images,
            bank_cache=self.root / "bank_cache",
            runs=self.root / "runs",
        )
