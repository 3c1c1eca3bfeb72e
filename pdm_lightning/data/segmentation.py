"""Subject masks computed by CLIPSeg (transformers), prompted with the class noun, cached as PNG files.

Each mask is a file ``<cache_dir>/<key>.png`` (8-bit, 255 = subject) whose key hashes the model
(id, revision, and for a local folder its files' sizes and dates), the photo's bytes, the prompt
and the threshold. A run whose masks are all cached never loads the model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from pdm_lightning.core.atomic import write_bytes_atomically
from pdm_lightning.core.errors import InputDataError
from pdm_lightning.core.images import load_rgb_image

DEFAULT_AUTO_MASK_MODEL = "CIDAS/clipseg-rd64-refined"


def default_mask_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pdm_lightning/masks`` (``~/.cache/pdm_lightning/masks`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pdm_lightning" / "masks"


def model_fingerprint(model_id: str, revision: str | None) -> str:
    """Identifies the segmentation weights: hub id + revision, or a local folder's path and file stamps."""
    folder = Path(model_id)
    if folder.is_dir():
        stamps = [
            (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()
        ]
        return json.dumps({"folder": str(folder.resolve()), "files": stamps})
    return json.dumps({"hub": model_id, "revision": revision or "main"})


def mask_cache_key(fingerprint: str, image_bytes: bytes, prompt: str, threshold: float) -> str:
    """Content key of one computed mask."""
    digest = hashlib.sha256()
    for part in (fingerprint.encode(), image_bytes, prompt.encode(), repr(float(threshold)).encode()):
        digest.update(len(part).to_bytes(8, "little"))  # length-prefixed: no two inputs share a byte stream
        digest.update(part)
    return digest.hexdigest()[:32]


def load_clipseg(model_id: str, revision: str | None, device: torch.device | str):  # noqa: ANN201 - (model, processor)
    """CLIPSeg model (eval mode, on ``device``) and its processor, through ``from_pretrained``."""
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    try:
        processor = CLIPSegProcessor.from_pretrained(model_id, revision=revision)
        model = CLIPSegForImageSegmentation.from_pretrained(model_id, revision=revision)
    except (OSError, ValueError) as error:
        raise InputDataError(
            f"auto_mask_model {model_id!r} cannot be loaded as CLIPSeg ({type(error).__name__}: {error}). Use a CLIPSeg "
            f"hub id such as {DEFAULT_AUTO_MASK_MODEL} (downloaded once, then cached), a local folder saved with "
            "save_pretrained, or give the masks in instance_mask_dir."
        ) from error
    # The mask must cover the whole photo: the photo is squashed to the model's square input and a
    # centre crop would cut its sides off, so cropping is turned off.
    if getattr(processor.image_processor, "do_center_crop", False):
        processor.image_processor.do_center_crop = False
    return model.eval().to(device), processor


@torch.inference_mode()
def segment_batch(model, processor, images: Sequence[Image.Image], prompt: str, threshold: float) -> list[np.ndarray]:  # noqa: ANN001
    """Binary masks (bool H x W, one per photo at its own size) of ``prompt`` in ``images``."""
    side = model.config.vision_config.image_size
    squashed = [image.resize((side, side), resample=Image.BICUBIC) for image in images]
    inputs = processor(text=[prompt] * len(images), images=squashed, padding=True, return_tensors="pt")
    device = next(model.parameters()).device
    logits = model(**{name: value.to(device) for name, value in inputs.items()}).logits
    logits = logits.reshape(len(images), 1, *logits.shape[-2:]).float()
    masks = []
    for index, image in enumerate(images):
        width, height = image.size
        upsampled = F.interpolate(logits[index : index + 1], size=(height, width), mode="bilinear", align_corners=False)
        masks.append((torch.sigmoid(upsampled)[0, 0] > threshold).cpu().numpy())
    return masks


def _png_bytes(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def compute_auto_masks(
    image_paths: Sequence[Path],
    prompt: str,
    model_id: str = DEFAULT_AUTO_MASK_MODEL,
    revision: str | None = None,
    threshold: float = 0.5,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> dict[Path, Path]:
    """Maps each photo to its CLIPSeg mask file in ``cache_dir``, computing (batched) only the missing ones."""
    cache_dir = Path(cache_dir) if cache_dir else default_mask_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = model_fingerprint(model_id, revision)
    mask_files = {
        path: cache_dir / f"{mask_cache_key(fingerprint, Path(path).read_bytes(), prompt, threshold)}.png"
        for path in image_paths
    }
    missing = [path for path, mask_file in mask_files.items() if not mask_file.is_file()]
    if not missing:
        return mask_files
    model, processor = load_clipseg(model_id, revision, device)
    with tqdm(total=len(missing), desc=f"Subject masks ({prompt!r})", unit="image") as progress:
        for start in range(0, len(missing), batch_size):
            batch = missing[start : start + batch_size]
            masks = segment_batch(model, processor, [load_rgb_image(p) for p in batch], prompt, threshold)
            for path, mask in zip(batch, masks):
                write_bytes_atomically(mask_files[path], _png_bytes(mask))
            progress.update(len(batch))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return mask_files
