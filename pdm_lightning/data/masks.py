"""Subject masks (white = subject): loading, checking, cropping like their image, and down-sampling for the losses.

A mask restricts the mean of a loss to the subject: L_inst / L_prior over the subject's latent
elements, L_pdm over the subject's tokens (docs/method.md). Masks come from a user folder (same file
stem as the photo) or from a segmentation model (``pdm_lightning.data.segmentation``), which
writes them to a cache folder; either way they are read from files here, so the dataset treats
both alike. The user's folders are only read.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pdm_lightning.core.images import IMAGE_SUFFIXES, load_rgb_image, to_rgb
from pdm_lightning.core.errors import InputDataError
from pdm_lightning.losses.masks import MaskMode

# A mask covering less than this fraction of its image (or more than 1 minus it) is probably wrong
# (a mask of the wrong photo, an inverted mask, a failed segmentation): reported with a warning.
MIN_COVERAGE = 0.01
# Two sizes with aspect ratios this close count as the same picture at another scale (rounding of
# an exported mask): the mask is resized to its image. Anything further apart is refused.
ASPECT_TOLERANCE = 0.01



@dataclass
class MaskSettings:
    """Where subject masks come from and which losses they restrict.

    Args:
        instance_mask_dir: folder of masks for the instance photos, one per photo with the same file
            stem (any image format), white = subject, black = background. Read only.
        auto_mask_model: a CLIPSeg model (hub id or local folder, e.g. "CIDAS/clipseg-rd64-refined") that
            computes the masks missing from ``instance_mask_dir`` (all of them when no folder is given).
        auto_mask_revision: revision of ``auto_mask_model``.
        auto_mask_prompt: what CLIPSeg segments; default: the class noun (the class prompt without
            a leading "a photo of").
        threshold: CLIPSeg probability above which a pixel is subject.
        cache_dir: where computed masks are kept (default ``~/.cache/pdm_lightning/masks``); a second run
            with the same model, photos, prompt and threshold reads them without loading the model.
        batch_size: photos per CLIPSeg forward.
        mask_instance_loss: restrict the instance loss to the subject.
        mask_prior_loss: restrict the prior loss to the class subject (class images are masked by
            ``auto_mask_model``, since generated class images have no user masks).
        mask_pdm_loss: restrict the PDM loss to the subject's tokens.
        mode: how a mask is brought down to the latent and token grids: ``binary`` (the reference's
            rule: any latent cell with some subject counts fully as subject) or ``soft`` (each cell
            weighted by the fraction of subject it holds).
    """

    instance_mask_dir: str | None = None
    auto_mask_model: str | None = None
    auto_mask_revision: str | None = None
    auto_mask_prompt: str | None = None
    threshold: float = 0.5
    cache_dir: str | None = None
    batch_size: int = 4
    mask_instance_loss: bool = False
    mask_prior_loss: bool = False
    mask_pdm_loss: bool = False
    mode: MaskMode = "binary"

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise InputDataError(f"masks threshold {self.threshold} must lie strictly between 0 and 1 (0.5 is usual).")
        if self.batch_size < 1:
            raise InputDataError(f"masks batch_size {self.batch_size} must be at least 1.")

    @property
    def needs_instance_masks(self) -> bool:
        return self.mask_instance_loss or self.mask_pdm_loss

    @property
    def enabled(self) -> bool:
        return self.needs_instance_masks or self.mask_prior_loss

    def check_sources(self) -> None:
        """Fails early when a mask switch is on without a source of masks (and warns on the reverse)."""
        has_source = bool(self.instance_mask_dir or self.auto_mask_model)
        if self.needs_instance_masks and not has_source:
            raise InputDataError(
                "mask_instance_loss / mask_pdm_loss need masks: set instance_mask_dir (a folder of masks named like "
                "the photos) or auto_mask_model (e.g. CIDAS/clipseg-rd64-refined), or turn the switches off."
            )
        if self.mask_prior_loss and not self.auto_mask_model:
            raise InputDataError(
                "mask_prior_loss needs auto_mask_model (e.g. CIDAS/clipseg-rd64-refined) to mask the generated class "
                "images, or turn mask_prior_loss off."
            )
        if has_source and not self.enabled:
            warnings.warn(
                "Subject masks are configured (instance_mask_dir / auto_mask_model) but no loss uses them: set "
                "mask_instance_loss, mask_prior_loss or mask_pdm_loss.",
                stacklevel=2,
            )


_PROMPT_PREFIX = re.compile(r"^\s*(?:an?\s+)?(?:photo|picture|image)\s+of\s+(?:an?\s+|the\s+)?", re.IGNORECASE)


def default_mask_prompt(class_prompt: str | None) -> str:
    """The class noun CLIPSeg is prompted with: "a photo of dog" -> "dog", "a photo of a red backpack" -> "red backpack"."""
    noun = _PROMPT_PREFIX.sub("", class_prompt or "").strip()
    if not noun:
        raise InputDataError(
            f"No class noun to prompt the mask model with (class prompt {class_prompt!r}): set auto_mask_prompt, "
            "e.g. 'dog'."
        )
    return noun


# ---------------------------------------------------------------------------------------------
# Files


def find_mask_file(image_path: Path, mask_dir: str | os.PathLike) -> Path | None:
    """The mask of ``image_path`` in ``mask_dir``: the image file with the same stem (None when absent)."""
    mask_dir = Path(mask_dir)
    candidates = sorted(
        p for p in mask_dir.glob(f"{glob_escape(image_path.stem)}.*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )
    if len(candidates) > 1:
        raise InputDataError(
            f"{image_path.name} has {len(candidates)} masks in {mask_dir} ({', '.join(p.name for p in candidates)}): "
            "keep one file per photo stem."
        )
    return candidates[0] if candidates else None


def glob_escape(text: str) -> str:
    """``text`` with glob wildcards escaped, so a stem like "dog[1]" matches itself only."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def check_mask_dir(mask_dir: str | os.PathLike) -> Path:
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise InputDataError(
            f"instance_mask_dir {mask_dir} is not a folder: create it with one mask per photo (same file stem, "
            "white = subject), or fix the path."
        )
    return mask_dir


def decode_mask(path: str | os.PathLike) -> Image.Image:
    """Decodes a mask file as 8-bit greyscale ("L"), EXIF-oriented like the photos.

    Transparent pixels count as background (black); 16-bit masks are rescaled, not clipped; colour
    masks count by their luminance.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise InputDataError(
            f"Mask {path} cannot be read as an image ({type(error).__name__}: {error}): re-export it as a greyscale "
            "PNG (white = subject)."
        ) from error
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L")
    return image if image.mode == "L" else to_rgb(image).convert("L")


def fit_mask_to_image(mask: Image.Image, image_size: tuple[int, int], mask_path: Path, image_path: Path) -> Image.Image:
    """``mask`` at ``image_size``: unchanged, resized when only the scale differs, refused otherwise."""
    if mask.size == image_size:
        return mask
    (mask_w, mask_h), (image_w, image_h) = mask.size, image_size
    if abs(math.log((mask_w / mask_h) / (image_w / image_h))) > ASPECT_TOLERANCE:
        raise InputDataError(
            f"Mask {mask_path} is {mask_w}x{mask_h} px but its photo {image_path} is {image_w}x{image_h} px "
            "(after EXIF rotation), a different shape: export the mask from the same, uncropped and upright photo."
        )
    return mask.resize(image_size, resample=Image.BILINEAR)


def load_subject_mask(mask_path: Path, image_path: Path, image_size: tuple[int, int] | None = None) -> Image.Image:
    """The mask of ``image_path`` as greyscale at the photo's (EXIF-oriented) size."""
    if image_size is None:
        image_size = load_rgb_image(image_path).size
    return fit_mask_to_image(decode_mask(mask_path), image_size, mask_path, image_path)


def mask_coverage(mask: Image.Image) -> float:
    """Subject fraction of a mask: its mean value in [0, 1]."""
    return float(np.asarray(mask, dtype=np.float64).mean() / 255.0)


def check_mask_coverage(mask: Image.Image, mask_path: Path, image_path: Path) -> float:
    """Reports a mask that selects (almost) nothing or (almost) everything; returns its coverage.

    An all-black mask is an error: every masked loss of that photo would average over nothing.
    A mask below MIN_COVERAGE or above 1 - MIN_COVERAGE gets a warning (an all-white one makes
    masking a no-op for that photo, which is harmless but probably not what was meant).
    """
    coverage = mask_coverage(mask)
    if np.asarray(mask).max() == 0:
        raise InputDataError(
            f"Mask {mask_path} of {image_path} is completely black (no subject): paint the subject white, or remove "
            "the mask so it is computed by auto_mask_model (lower the threshold if the model found nothing)."
        )
    if coverage < MIN_COVERAGE or coverage > 1.0 - MIN_COVERAGE:
        warnings.warn(
            f"Mask {mask_path} of {image_path} covers {coverage:.1%} of the photo: check that white marks the subject "
            f"(see the overlays under <log dir>/masks/).",
            stacklevel=2,
        )
    return coverage


def find_user_masks(image_paths: Sequence[Path], mask_dir: str | os.PathLike) -> dict[Path, Path]:
    """Maps each photo that has a mask in ``mask_dir`` to that mask file (reading nothing else)."""
    mask_dir = check_mask_dir(mask_dir)
    found = {}
    for image_path in image_paths:
        mask_path = find_mask_file(image_path, mask_dir)
        if mask_path is not None:
            found[image_path] = mask_path
    return found


def validate_masks(pairs: dict[Path, Path]) -> dict[Path, float]:
    """Decodes every (photo -> mask) pair once and checks size and coverage; returns each mask's coverage."""
    return {
        image_path: check_mask_coverage(load_subject_mask(mask_path, image_path), mask_path, image_path)
        for image_path, mask_path in pairs.items()
    }


def missing_masks_error(missing: Sequence[Path], mask_dir: str | os.PathLike) -> InputDataError:
    names = ", ".join(p.name for p in missing[:5]) + (" ..." if len(missing) > 5 else "")
    return InputDataError(
        f"instance_mask_dir {mask_dir} has no mask for {len(missing)} photo(s): {names}. Add a mask with the same "
        f"file stem (e.g. {missing[0].stem}.png, white = subject), or set auto_mask_model to compute the missing ones."
    )


# ---------------------------------------------------------------------------------------------
# Training crops


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """Greyscale mask as a float 1 x H x W tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0).unsqueeze(0).contiguous()


# ---------------------------------------------------------------------------------------------
# Preview


def mask_overlay(
    image: Image.Image, mask: Image.Image, color: tuple[int, int, int] = (255, 0, 64), alpha: float = 0.5
) -> Image.Image:
    """``image`` with the subject tinted ``color`` (by ``alpha`` times the mask value), as RGB."""
    image = image.convert("RGB")
    mask = mask.convert("L")
    if mask.size != image.size:
        mask = mask.resize(image.size, resample=Image.BILINEAR)
    tint = Image.new("RGB", image.size, color)
    weight = Image.fromarray((np.asarray(mask, dtype=np.float32) * alpha).round().astype(np.uint8), mode="L")
    return Image.composite(tint, image, weight)


# ---------------------------------------------------------------------------------------------
# Putting it together (called once, before training, on the process that prepares the data)


def resolve_instance_masks(
    image_paths: Sequence[Path],
    settings: MaskSettings,
    class_prompt: str | None = None,
    device: torch.device | str = "cpu",
) -> dict[Path, Path]:
    """Maps every instance photo to its mask file, checked (readable, same shape as the photo, not empty).

    User masks from ``instance_mask_dir`` come first; photos without one get a CLIPSeg mask when
    ``auto_mask_model`` is set, else the run stops naming them. Nothing in the user's folders is written.
    """
    settings.check_sources()
    masks = find_user_masks(image_paths, settings.instance_mask_dir) if settings.instance_mask_dir else {}
    missing = [path for path in image_paths if path not in masks]
    if missing and not settings.auto_mask_model:
        raise missing_masks_error(missing, settings.instance_mask_dir)
    validate_masks(masks)  # the user's masks are checked before any model is loaded
    if missing:
        computed = _auto_masks(missing, settings, class_prompt, device)
        validate_masks(computed)
        masks.update(computed)
    return {path: masks[path] for path in image_paths}


def resolve_class_masks(
    image_paths: Sequence[Path],
    settings: MaskSettings,
    class_prompt: str | None,
    device: torch.device | str = "cpu",
) -> dict[Path, Path]:
    """Maps every class image to a CLIPSeg mask file (for ``mask_prior_loss``).

    A generated class image may not show the class at all: an empty mask is then a warning, and
    that image's prior loss averages over nothing (it contributes zero), rather than a stopped run.
    """
    settings.check_sources()
    masks = _auto_masks(image_paths, settings, class_prompt, device)
    # Computed masks have their photo's size by construction: only the masks are decoded (setup
    # runs this on every rank, over hundreds of class images).
    empty = [image_path.name for image_path, mask_path in masks.items() if np.asarray(decode_mask(mask_path)).max() == 0]
    if empty:
        warnings.warn(
            f"The mask model found no {settings.auto_mask_prompt or default_mask_prompt(class_prompt)!r} in "
            f"{len(empty)} of {len(masks)} class images ({', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}): "
            "their prior loss is zero. Lower the threshold or check auto_mask_prompt.",
            stacklevel=2,
        )
    return masks


def _auto_masks(
    image_paths: Sequence[Path], settings: MaskSettings, class_prompt: str | None, device: torch.device | str
) -> dict[Path, Path]:
    from pdm_lightning.data.segmentation import compute_auto_masks  # transformers only when masks are computed

    return compute_auto_masks(
        image_paths,
        prompt=settings.auto_mask_prompt or default_mask_prompt(class_prompt),
        model_id=settings.auto_mask_model,
        revision=settings.auto_mask_revision,
        threshold=settings.threshold,
        cache_dir=settings.cache_dir,
        batch_size=settings.batch_size,
        device=device,
    )
