"""A run's config.yaml stays the fit config: predict on it, then resume fit from it."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import quickstart_args
from pdm_lightning.cli import cli_main


def test_predict_leaves_the_run_config_usable_for_fit(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    run = tmp_path / "run"
    cli_main(["fit", *quickstart_args(run, tiny_model_dir, instance_dir, "--trainer.max_steps", "2", "--samples.at_fit_end", "false")])
    config = run / "config.yaml"
    written = config.read_bytes()

    cli_main([
        "predict", "--config", str(config), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
        "--data.predict.prompts", "[a photo of sks dog]", "--data.predict.num_images_per_prompt", "1",
        "--data.predict.num_inference_steps", "2", "--trainer.enable_progress_bar", "false",
    ])
    assert len(list((run / "predictions").glob("*.png"))) == 1
    assert config.read_bytes() == written  # predict's own options did not replace the fit config

    cli_main(["fit", "--config", str(config), "--trainer.max_steps", "3", "--ckpt_path", "last"])
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
