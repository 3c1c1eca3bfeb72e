"""The mask preview: overlays of every instance photo and its mask, in TensorBoard and as PNGs, once per fit."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from pdm_lightning.callbacks.mask_preview import MaskPreview
from pdm_lightning.training.datamodule import DreamBoothDataModule


class OneParameter(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return (self.weight - batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class MaskedData(DreamBoothDataModule):
    """What MaskPreview reads of the DreamBooth data module (its photo -> mask files), with stub batches."""

    def __init__(self, instance_mask_files: dict[Path, Path] | None) -> None:
        L.LightningDataModule.__init__(self)  # none of the DreamBooth inputs: nothing is prepared or loaded
        self.instance_mask_files = instance_mask_files

    def prepare_data(self) -> None:
        pass

    def setup(self, stage: str) -> None:
        pass

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.ones(2, 1)), batch_size=1)


def photos_and_masks(folder: Path) -> dict[Path, Path]:
    folder.mkdir()
    pairs = {}
    for index, (width, height) in enumerate([(48, 32), (600, 400)]):
        photo = folder / f"photo{index}.jpg"
        Image.new("RGB", (width, height), (0, 0, 255)).save(photo)
        mask = np.zeros((height // 2, width // 2), dtype=np.uint8)  # half size: scaled to the photo
        mask[:, : width // 4] = 255  # left half is the subject
        Image.fromarray(mask).save(folder / f"mask{index}.png")
        pairs[photo] = folder / f"mask{index}.png"
    return pairs


def fit(run_dir: Path, mask_files: dict[Path, Path] | None) -> None:
    trainer = L.Trainer(
        max_steps=1,
        logger=TensorBoardLogger(save_dir=run_dir, name="", version=""),
        callbacks=[MaskPreview(max_side=64, color=(255, 0, 0), alpha=1.0)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(OneParameter(), datamodule=MaskedData(mask_files))


def test_overlays_are_logged_and_saved(tmp_path: Path) -> None:
    pairs = photos_and_masks(tmp_path / "inputs")
    run_dir = tmp_path / "run"
    fit(run_dir, pairs)

    saved = sorted((run_dir / "masks").iterdir())
    assert [p.name for p in saved] == ["photo0.png", "photo1.png"]
    big = np.asarray(Image.open(run_dir / "masks" / "photo1.png")).astype(int)
    assert big.shape == (43, 64, 3)  # shrunk to max_side, aspect kept
    assert np.abs(big[20, 5] - [255, 0, 0]).max() <= 2  # subject: tinted
    assert np.abs(big[20, 60] - [0, 0, 255]).max() <= 2  # background: the photo

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["masks/photo0", "masks/photo1"]
    (logged,) = events.Images("masks/photo1")
    assert (logged.width, logged.height) == (64, 43)


def test_without_masks_nothing_is_written(tmp_path: Path) -> None:
    fit(tmp_path / "run", None)
    assert not (tmp_path / "run" / "masks").exists()
