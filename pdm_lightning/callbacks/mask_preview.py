"""Shows the user what the subject masks select: each instance photo with its mask overlaid, once per fit."""

from __future__ import annotations

import io
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from pdm_lightning.callbacks.run_outputs import log_image, run_dir
from pdm_lightning.callbacks.run_parts import dreambooth_data
from pdm_lightning.core.atomic import write_bytes_atomically
from pdm_lightning.core.images import load_rgb_image
from pdm_lightning.data.masks import load_subject_mask, mask_coverage, mask_overlay


class MaskPreview(L.Callback):
    """At the start of fit, logs every instance photo with its subject mask tinted over it.

    The overlays go to TensorBoard (``masks/<photo stem>``) and to ``<log dir>/<dirname>/<photo stem>.png``.
    The photos and masks come from the DreamBoothDataModule's ``instance_mask_files`` (photo path ->
    mask path); without masks the callback does nothing.

    Args:
        dirname: folder under the run's log directory for the overlay PNGs.
        max_side: longest side of the logged overlays, in pixels (larger photos are shrunk).
        color: RGB tint of the subject.
        alpha: opacity of the tint where the mask is white.
    """

    def __init__(
        self, dirname: str = "masks", max_side: int = 512, color: tuple[int, int, int] = (255, 0, 64), alpha: float = 0.5
    ) -> None:
        self.dirname = dirname
        self.max_side = max_side
        self.color = tuple(color)
        self.alpha = alpha

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        mask_files = dreambooth_data(trainer, "MaskPreview").instance_mask_files
        if not mask_files:
            return
        out_dir = run_dir(trainer) / self.dirname  # on every rank (a collective)
        if not trainer.is_global_zero:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for image_path, mask_path in mask_files.items():
            image_path, mask_path = Path(image_path), Path(mask_path)
            image = load_rgb_image(image_path)
            mask = load_subject_mask(mask_path, image_path, image.size)
            overlay = mask_overlay(image, mask, self.color, self.alpha)
            overlay.thumbnail((self.max_side, self.max_side))
            buffer = io.BytesIO()
            overlay.save(buffer, format="PNG")
            write_bytes_atomically(out_dir / f"{image_path.stem}.png", buffer.getvalue())
            log_image(trainer, f"masks/{image_path.stem}", overlay, trainer.global_step)
            lines.append(f"{image_path.name}: {mask_coverage(mask):.0%} subject ({mask_path})")
        rank_zero_info(f"Subject masks (overlays in {out_dir}):\n  " + "\n  ".join(lines))
