"""Finding, checking and decoding the user's photos.

Every check here reads files and never writes, renames or deletes anything in the user's folders.
Errors name the file and say how to fix it, and are raised before any model is loaded.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pdm_lightning.core.errors import InputDataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Photo formats Pillow cannot decode without plugins: reported as errors, not silently skipped.
UNSUPPORTED_PHOTO_SUFFIXES = frozenset({".heic", ".heif", ".avif", ".cr2", ".nef", ".arw", ".dng"})
# An image whose shorter side is below this fraction of the resolution would be upscaled so much
# that the model learns blur: refuse it. Between this and the resolution: warn.
MIN_SIDE_FRACTION = 0.5


def list_image_files(folder: str | os.PathLike, role: str, ignore: Iterable[str] = ()) -> list[Path]:
    """The image files of ``folder`` in name order; hidden files and non-images are skipped with a warning.

    ``role`` is the option that names the folder, so messages say which setting to change.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputDataError(f"{role} {folder} does not exist: create it and put the photos in it, or fix the path.")
    if not folder.is_dir():
        raise InputDataError(f"{role} {folder} is a file, not a folder: point {role} at the folder holding the images.")
    ignored = set(ignore)
    images: list[Path] = []
    skipped: list[str] = []
    for path in sorted(folder.iterdir()):
        if path.name in ignored:
            continue
        suffix = path.suffix.lower()
        if suffix in UNSUPPORTED_PHOTO_SUFFIXES:
            raise InputDataError(
                f"{path} is a {suffix} file, which cannot be read without extra codecs: convert it to JPEG or PNG "
                f"(keep the original elsewhere) or remove it from {role}."
            )
        if path.name.startswith(".") or path.is_dir() or suffix not in IMAGE_SUFFIXES:
            skipped.append(path.name)
            continue
        images.append(path)
    if skipped:
        warnings.warn(
            f"Skipping {len(skipped)} hidden, non-image or folder entries in {role} {folder}: {', '.join(skipped[:5])}"
            + (" ..." if len(skipped) > 5 else ""),
            stacklevel=2,
        )
    return images


def _flatten_alpha(image: Image.Image) -> Image.Image:
    # Transparent regions become white rather than whatever colour the hidden pixels happen to hold.
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow's convert("RGB") clips 16-bit and 32-bit greyscale to 255 (a white image); rescale instead.
    values = np.asarray(image, dtype=np.float64)
    brightest = float(values.max(initial=0))
    if image.mode.startswith("I;16"):
        top = 65535.0
    elif image.mode == "F":
        top = max(brightest, 1e-12)
    else:  # "I": 32-bit container, usually holding 8- or 16-bit data
        top = 255.0 if brightest <= 255 else 65535.0 if brightest <= 65535 else brightest
    grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode (RGBA, LA, P, L, CMYK, I;16, I, F, ...) as 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return _flatten_alpha(image)
    if image.mode.startswith("I") or image.mode == "F":
        return _high_bit_depth_to_rgb(image)
    return image.convert("RGB")


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Decodes ``path`` fully, applies its EXIF orientation and returns 8-bit RGB."""
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def check_image(path: Path, role: str, resolution: int) -> tuple[int, int]:
    """Decodes one image completely; returns its (width, height) after EXIF orientation.

    Raises InputDataError for a file that cannot be decoded or is far smaller than ``resolution``.
    """
    try:
        image = load_rgb_image(path)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise InputDataError(
            f"{path} cannot be read as an image ({type(error).__name__}: {error}). Re-export it as JPEG or PNG, "
            f"or move it out of {role}."
        ) from error
    width, height = image.size
    shorter = min(width, height)
    if shorter < MIN_SIDE_FRACTION * resolution:
        raise InputDataError(
            f"{path} is {width}x{height} px, far smaller than the training resolution {resolution} "
            f"(its shorter side must be at least {int(MIN_SIDE_FRACTION * resolution)} px). Use a larger photo, "
            f"or lower the resolution (--data.resolution)."
        )
    if shorter < resolution:
        warnings.warn(
            f"{path} ({width}x{height} px) is smaller than the resolution {resolution} and will be upscaled; "
            "larger photos give sharper results.",
            stacklevel=2,
        )
    return width, height


def validate_image_folder(
    folder: str | os.PathLike,
    role: str,
    resolution: int,
    allow_empty: bool = False,
    ignore: Iterable[str] = (),
) -> list[Path]:
    """Lists and fully decodes every image of ``folder`` once; returns the image paths in name order.

    Stops at the first unreadable or too small image, and on an empty folder unless ``allow_empty``.
    """
    images = list_image_files(folder, role=role, ignore=ignore)
    if not images and not allow_empty:
        raise InputDataError(
            f"{role} {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): put the photos there, "
            "3-5 of the subject for instance images."
        )
    for path in images:
        check_image(path, role=role, resolution=resolution)
    return images
