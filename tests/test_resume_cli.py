"""The README's resume recipe end to end: kill train.py mid-run, re-run the same command with --ckpt_path last."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, quickstart_args

TESTS_DIR = Path(__file__).resolve().parent


def train(tmp_path: Path, run_name: str, model_dir: Path, instance_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = quickstart_args(
        tmp_path / run_name, model_dir, instance_dir,
        "--trainer.max_steps", "8", "--checkpoint.every_n_train_steps", "3",
        "--data.with_prior_preservation", "true", "--data.num_class_images", "4",
        "--data.class_generation.num_inference_steps", "2", "--model.learning_rate", "1e-3",
        *extra,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)])}
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "fit", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )


def exported_unet(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "export" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


def test_killed_run_resumed_from_the_command_line_matches_straight_run(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path
) -> None:
    straight = train(tmp_path, "straight", tiny_model_dir, instance_dir)
    assert straight.returncode == 0, straight.stderr[-3000:]

    crash = json.dumps({"class_path": "hard_crash.HardCrashAtStep", "init_args": {"step": 5}})
    killed = train(tmp_path, "run", tiny_model_dir, instance_dir, f"--trainer.callbacks+={crash}")
    assert killed.returncode == 137
    assert not (tmp_path / "run" / "export").exists()
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3

    resumed = train(tmp_path, "run", tiny_model_dir, instance_dir, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr
    expected, actual = exported_unet(tmp_path / "straight"), exported_unet(tmp_path / "run")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8
