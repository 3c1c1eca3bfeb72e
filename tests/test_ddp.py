"""Two-process DDP on CPU (gloo) through train.py: trains, checkpoints and exports once, without hanging."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO_ROOT, quickstart_args


def test_ddp_two_processes_on_cpu(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    args = quickstart_args(
        tmp_path / "run", tiny_model_dir, instance_dir,
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_steps", "3",
        "--data.with_prior_preservation", "true", "--data.num_class_images", "4",
        "--data.class_generation.num_inference_steps", "2",
        # The PDM chunk with masks: the bank is built once (rank 0) and every rank reads it.
        "--model.pdm", "{}", "--model.pdm.inversion_steps", "4",
        "--data.masks.instance_mask_dir", str(REPO_ROOT / "examples" / "dog_masks"), "--data.masks.mask_pdm_loss", "true",
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PDM_LIGHTNING_CACHE": str(tmp_path / "bank-cache")}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "fit", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in result.stderr + result.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "run" / "export" / "pipeline" / "model_index.json").is_file()
    assert len(list((tmp_path / "class_images").glob("*.png"))) == 4  # generated once, not once per rank
    output = result.stderr + result.stdout
    assert output.count("PDM teacher bank (5 images)") >= 1
    assert "train/loss_pdm" in set(EventAccumulator(str(tmp_path / "run")).Reload().Tags()["scalars"])
    banks = list((tmp_path / "bank-cache").glob("*/*.safetensors"))
    assert len(banks) == 5 and not list((tmp_path / "bank-cache").rglob("*.partial*"))
