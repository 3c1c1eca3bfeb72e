"""Two-process DDP on CPU (gloo) through train.py: prepares split across the ranks, trains, checkpoints and exports once, without hanging."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO_ROOT, folder_snapshot, quickstart_args
from pdm_lightning.prepare.__main__ import main as prepare_main

# Prior preservation with 4 class images in batches of 2, and the PDM bank of the 5 photos one at a time:
# rank 0 generates batch 0 (slots 0-1) and builds photos 0, 2, 4; rank 1 batch 1 (slots 2-3) and photos 1, 3.
PREPARED = (
    "--data.with_prior_preservation", "true", "--data.num_class_images", "4",
    "--data.class_generation.num_inference_steps", "2", "--data.class_generation.sample_batch_size", "2",
    "--model.pdm", "{}", "--model.pdm.inversion_steps", "4", "--model.pdm.batch_size", "1",
)


def test_ddp_two_processes_on_cpu(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = quickstart_args(
        tmp_path / "run", tiny_model_dir, instance_dir,
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_steps", "3", *PREPARED,
        # The PDM chunk with masks: every rank reads the whole bank.
        "--data.masks.instance_mask_dir", str(REPO_ROOT / "examples" / "dog_masks"), "--data.masks.mask_pdm_loss", "true",
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PDM_LIGHTNING_CACHE": str(tmp_path / "bank-cache")}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "fit", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stderr + result.stdout
    assert "GLOBAL_RANK: 1" in output
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "run" / "export" / "pipeline" / "model_index.json").is_file()
    # Each rank made its half, once: the class images of one batch each, the bank files of its photos.
    assert f"Class images: 4 generated (rank 0: 2, rank 1: 2) in {tmp_path / 'class_images'}" in output
    assert "PDM teacher bank: 5 image(s) built (rank 0: 3, rank 1: 2), 0 reused" in output
    assert len(list((tmp_path / "class_images").glob("*.png"))) == 4
    assert "train/loss_pdm" in set(EventAccumulator(str(tmp_path / "run")).Reload().Tags()["scalars"])
    [bank] = [path for path in (tmp_path / "bank-cache").iterdir() if path.is_dir()]
    assert len(list(bank.glob("*.safetensors"))) == 5 and not list((tmp_path / "bank-cache").rglob("*.partial*"))

    # One process preparing the same run makes the very same files, byte for byte.
    monkeypatch.setenv("PDM_LIGHTNING_CACHE", str(tmp_path / "single-cache"))
    prepare_main(quickstart_args(tmp_path / "single-run", tiny_model_dir, instance_dir, *PREPARED,
                                 "--data.class_data_dir", str(tmp_path / "single-class")))
    assert folder_snapshot(tmp_path / "single-class") == folder_snapshot(tmp_path / "class_images")
    single_bank = tmp_path / "single-cache" / bank.name  # the same settings: the same cache key
    assert folder_snapshot(single_bank) == folder_snapshot(bank)
