"""The export callback in full fine-tuning runs: periodic and final exports, dtype, early refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from conftest import build_cli
from pdm_lightning.export.export_set import check_export_set
from pdm_lightning.export.single_file import UnsupportedModelError


def test_full_fine_tune_exports_pipeline_and_single_file_every_n_steps(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path
) -> None:
    cli = build_cli(
        tmp_path / "run", tiny_model_dir, instance_dir,
        "--trainer.max_steps", "2", "--model.learning_rate", "1e-3",
        "--export.every_n_train_steps", "1", "--export.dtype", "float16", "--export.name", "sks_dog",
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    export, steps = tmp_path / "run" / "export", tmp_path / "run" / "export_steps"
    assert sorted(p.name for p in export.iterdir()) == ["manifest.json", "pipeline", "sks_dog.safetensors"]
    assert sorted(p.name for p in steps.iterdir()) == ["step_000001"]
    assert sorted(p.name for p in (steps / "step_000001").iterdir()) == ["manifest.json", "pipeline", "sks_dog.safetensors"]
    assert not list((tmp_path / "run").rglob(".*"))  # no staging folder or partial file left
    assert check_export_set(export).step == 2 and check_export_set(steps / "step_000001").step == 1

    single_file = load_file(export / "sks_dog.safetensors")
    assert {tensor.dtype for tensor in single_file.values()} == {torch.float16}
    loaded = StableDiffusionPipeline.from_single_file(
        str(export / "sks_dog.safetensors"), config=str(export / "pipeline"), local_files_only=True
    )
    module = cli.model
    for part in ("unet", "text_encoder"):  # the quickstart trains both
        trained, state = getattr(module, part).state_dict(), getattr(loaded, part).state_dict()
        assert state.keys() == trained.keys()
        assert all(torch.equal(state[key].half(), value.half()) for key, value in trained.items()), part
    # The step-1 export holds other (earlier) weights than the final one.
    early = load_file(steps / "step_000001" / "sks_dog.safetensors")
    assert early.keys() == single_file.keys()
    assert any(not torch.equal(early[key], single_file[key]) for key in single_file if key.startswith("model.diffusion_model."))


def test_a_model_without_the_sd1_layout_is_refused_before_training(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path
) -> None:
    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "sd2-like"))
    config_file = model_dir / "text_encoder" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "hidden_act": "gelu"}))  # as SD 2.x's OpenCLIP
    cli = build_cli(tmp_path / "run", model_dir, instance_dir, "--trainer.max_steps", "1")
    with pytest.raises(UnsupportedModelError, match="--export.single_file false"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 0
    assert not (tmp_path / "run" / "export").exists()
