"""Subject masks (white = subject): loading, checking, cropping like their image, and down-sampling for the losses.

A mask restricts the mean of a loss to the subject: L_inst / L_prior over the subject's latent
elements, L_pdm over the subject's tokens (docs/method.md). Masks come from a user folder (same file
stem as the photo) or from a segmentation model (``pdm_lightning.data.segmentation``), which
writes them to a cache folder; either way they are read from files here, so the dataset treats
both alike. The user's folders are only read.

A file stem says nothing about which photo a mask was drawn for (DreamBench subjects all name their
photos 00.jpg, 01.jpg, ...), so a user mask must prove it belongs to its photo: either its folder's
``masks.json`` records the SHA-256 of the photo it was drawn for, or it has exactly the photo's size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pdm_lightning.core.atomic import write_bytes_atomically
from pdm_lightning.core.images import IMAGE_SUFFIXES, list_image_files, load_rgb_image, to_rgb
from pdm_lightning.core.errors import InputDataError
from pdm_lightning.losses.masks import MaskMode

# A mask covering less than this fraction of its image (or more than 1 minus it) is probably wrong
# (a mask of the wrong photo, an inverted mask, a failed segmentation): reported with a warning.
MIN_COVERAGE = 0.01
# Two sizes with aspect ratios this close count as the same picture at another scale (rounding of
# an exported mask): the mask is resized to its image, but only when the folder's manifest says the
# mask was drawn for this very photo. Anything further apart is refused.
ASPECT_TOLERANCE = 0.01
# The optional manifest of a mask folder: mask file name -> the photo (name, SHA-256) it was drawn for.
MASK_MANIFEST_NAME = "masks.json"
MASK_MANIFEST_FORMAT = 1


@dataclass
class MaskSettings:
    """Where subject masks come from and which losses they restrict.

    Args:
        instance_mask_dir: folder of masks for the instance photos, one per photo with the same file
            stem (any image format), white = subject, black = background. Read only. Each mask must have
            exactly its photo's size, unless the folder's ``masks.json`` (``write_mask_manifest``) records
            the photo it was drawn for; a recorded mask matched to another photo is an error.
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
    """``mask`` at ``image_size``: unchanged, resized when only the scale differs, refused otherwise.

    Only masks that ``validate_masks`` accepted reach training, and a scaled one only when its folder's
    manifest records this photo.
    """
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
    """Checks every (photo -> mask) pair once; returns each mask's coverage.

    Each mask must belong to its photo (recorded in its folder's manifest, else exactly the photo's
    size), have the photo's shape, and select some subject.
    """
    origins = recorded_origins(pairs)
    check_recorded_photos(pairs, origins)
    masks, unmatched = {}, []
    for image_path, mask_path in pairs.items():
        image_size = load_rgb_image(image_path).size
        mask = decode_mask(mask_path)
        if origins[mask_path] is None and mask.size != image_size:
            unmatched.append((image_path, mask_path, mask.size, image_size))
            continue
        masks[image_path] = fit_mask_to_image(mask, image_size, mask_path, image_path)
    if unmatched:
        raise unmatched_size_error(unmatched)
    return {image_path: check_mask_coverage(mask, pairs[image_path], image_path) for image_path, mask in masks.items()}


# ---------------------------------------------------------------------------------------------
# Which photo a mask was drawn for


@dataclass(frozen=True)
class MaskOrigin:
    """The photo a mask was drawn for, as its folder's manifest records it: file name and SHA-256 of its bytes."""

    photo: str
    sha256: str


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_mask_manifest(mask_dir: Path) -> dict[str, MaskOrigin] | None:
    """The records of ``mask_dir/masks.json`` by mask file name; None when the folder has no manifest."""
    path = mask_dir / MASK_MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != MASK_MANIFEST_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {MASK_MANIFEST_FORMAT}")
        return {str(name): MaskOrigin(str(r["photo"]), str(r["sha256"]).lower()) for name, r in data["masks"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # bad JSON, bad text, wrong layout
        raise InputDataError(
            f"Mask manifest {path} cannot be read ({type(error).__name__}: {error}): rewrite it with "
            "pdm_lightning.data.masks.write_mask_manifest (docs/masks.md), or delete it (each mask must then have "
            "exactly its photo's size)."
        ) from error


def write_mask_manifest(mask_dir: str | os.PathLike, photo_dir: str | os.PathLike) -> Path:
    """Records in ``mask_dir/masks.json`` which photo of ``photo_dir`` each mask was drawn for (matched by stem).

    Run once, by whoever draws the masks: runs then refuse these masks for any other photo, even one
    with the same name and size. Records of masks without a photo in ``photo_dir`` are kept.
    """
    mask_dir = check_mask_dir(mask_dir)
    records = dict(read_mask_manifest(mask_dir) or {})
    photos = list_image_files(photo_dir, role="photo folder")
    for photo, mask in find_user_masks(photos, mask_dir).items():
        records[mask.name] = MaskOrigin(photo.name, file_sha256(photo))
    if not records:
        raise InputDataError(f"No mask of {mask_dir} has the file stem of a photo of {photo_dir}: nothing to record.")
    data = {"format": MASK_MANIFEST_FORMAT, "masks": {name: asdict(origin) for name, origin in sorted(records.items())}}
    path = mask_dir / MASK_MANIFEST_NAME
    write_bytes_atomically(path, (json.dumps(data, indent=1) + "\n").encode())
    return path


def recorded_origins(pairs: dict[Path, Path]) -> dict[Path, MaskOrigin | None]:
    """Each mask's recorded photo (None when its folder has no manifest or the manifest does not list it)."""
    manifests = {folder: read_mask_manifest(folder) for folder in {mask_path.parent for mask_path in pairs.values()}}
    return {mask_path: (manifests[mask_path.parent] or {}).get(mask_path.name) for mask_path in pairs.values()}


def check_recorded_photos(pairs: dict[Path, Path], origins: dict[Path, MaskOrigin | None]) -> None:
    """Fails, naming every such pair, when a mask's manifest records another photo than the one it is matched to."""
    foreign, mask_dir = [], None
    for image_path, mask_path in pairs.items():
        origin = origins[mask_path]
        if origin is not None:
            actual = file_sha256(image_path)
            if actual != origin.sha256:
                mask_dir = mask_dir or mask_path.parent
                foreign.append(
                    f"{mask_path.name} was drawn for a photo {origin.photo} with sha256 {origin.sha256[:12]}..., "
                    f"but {image_path} has sha256 {actual[:12]}..."
                )
    if foreign:
        raise InputDataError(
            f"These masks were drawn for other photos ({len(foreign)} of {len(pairs)}, per "
            f"{mask_dir / MASK_MANIFEST_NAME}): " + "; ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            + ". Point --data.masks.instance_mask_dir at this subject's masks, or remove the mask options. (If these "
            "are the right masks and only the photos were re-saved, rewrite the manifest with write_mask_manifest: "
            "docs/masks.md.)"
        )


def unmatched_size_error(unmatched: Sequence[tuple[Path, Path, tuple[int, int], tuple[int, int]]]) -> InputDataError:
    """The error for masks without a manifest record whose size differs from their photo's."""
    details = "; ".join(
        f"mask {mask_path} is {mw}x{mh} px but its photo {image_path} is {iw}x{ih} px"
        for image_path, mask_path, (mw, mh), (iw, ih) in unmatched[:5]
    ) + (" ..." if len(unmatched) > 5 else "")
    mask_dir = unmatched[0][1].parent
    return InputDataError(
        f"{len(unmatched)} mask(s) of {mask_dir} do not have their photo's size (after EXIF rotation): {details}. "
        f"Masks are matched to photos by file name, and without a {MASK_MANIFEST_NAME} recording the photo each was "
        "drawn for, only a mask of exactly its photo's size is taken as that photo's. Check that "
        "--data.masks.instance_mask_dir holds this subject's masks; then export each mask at its photo's size, or "
        f"record the photos in {mask_dir / MASK_MANIFEST_NAME} with write_mask_manifest (docs/masks.md)."
    )


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
