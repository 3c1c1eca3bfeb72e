"""The quickstart through the real `fit` subcommand: class images, loss scalars, checkpoints, export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import folder_snapshot, quickstart_args
from pdm_lightning.cli import cli_main
from pdm_lightning.prepare.class_images import MANIFEST_NAME


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    import shutil

    from conftest import EXAMPLE_SUBJECT

    root = tmp_path_factory.mktemp("quickstart")
    instance_dir = Path(shutil.copytree(EXAMPLE_SUBJECT, root / "instance"))
    before = folder_snapshot(instance_dir)
    args = quickstart_args(
        root / "run", tiny_model_dir, instance_dir,
        "--data.with_prior_preservation", "true", "--data.num_class_images", "6",
        "--data.class_generation.num_inference_steps", "3", "--data.class_generation.sample_batch_size", "4",
        "--trainer.max_steps", "6", "--checkpoint.every_n_train_steps", "3",
    )
    cli = cli_main(["fit", *args])
    return {"root": root, "run": root / "run", "cli": cli, "instance_dir": instance_dir, "before": before}


def test_class_images_generated_with_manifest(quickstart_run: dict) -> None:
    class_dir = quickstart_run["root"] / "class_images"
    images = sorted(class_dir.glob("*.png"))
    assert len(images) == 6
    manifest = (class_dir / MANIFEST_NAME).read_text()
    for image in images:
        assert image.name in manifest
    assert "a photo of dog" in manifest


def test_checkpoints_written(quickstart_run: dict) -> None:
    names = sorted(p.name for p in (quickstart_run["run"] / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step=000003.ckpt", "step=000006.ckpt"]


def test_loss_components_and_lr_logged_every_step(quickstart_run: dict) -> None:
    events = EventAccumulator(str(quickstart_run["run"])).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_instance", "train/loss_prior"} <= tags
    assert any(tag.startswith("lr-") for tag in tags)
    steps = [event.step for event in events.Scalars("train/loss")]
    assert len(steps) == 6
    total, instance, prior = (events.Scalars(t) for t in ("train/loss", "train/loss_instance", "train/loss_prior"))
    for t, i, p in zip(total, instance, prior):
        assert t.value == pytest.approx(i.value + 1.0 * p.value, rel=1e-5)


def test_export_loads_in_diffusers_and_matches_trained_weights(quickstart_run: dict) -> None:
    export = quickstart_run["run"] / "export" / "pipeline"
    pipeline = StableDiffusionPipeline.from_pretrained(export)
    module = quickstart_run["cli"].model
    for name, value in module.unet.state_dict().items():
        assert torch.equal(pipeline.unet.state_dict()[name], value), name
    for name, value in module.text_encoder.state_dict().items():
        assert torch.equal(pipeline.text_encoder.state_dict()[name], value), name
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert not list(export.parent.glob(".pipeline*"))  # no staging folder left behind


def test_instance_folder_untouched(quickstart_run: dict) -> None:
    assert folder_snapshot(quickstart_run["instance_dir"]) == quickstart_run["before"]


def test_config_saved_for_rerun(quickstart_run: dict) -> None:
    config = (quickstart_run["run"] / "config.yaml").read_text()
    assert "instance_prompt: a photo of sks dog" in config


def test_lora_quickstart_trains_resumes_and_exports_both_formats(tmp_path: Path, tiny_model_dir: Path) -> None:
    import shutil

    from conftest import EXAMPLE_SUBJECT, REPO_ROOT

    instance = Path(shutil.copytree(EXAMPLE_SUBJECT, tmp_path / "instance"))
    run = tmp_path / "run"

    def fit(max_steps: int, *extra: str) -> None:
        cli_main([
            "fit", "--config", str(REPO_ROOT / "configs" / "quickstart.yaml"),
            "--config", str(REPO_ROOT / "configs" / "quickstart" / "lora.yaml"),
            "--model.pretrained_model_name_or_path", str(tiny_model_dir), "--data.instance_data_dir", str(instance),
            "--data.class_data_dir", str(tmp_path / "class_images"), "--data.num_class_images", "2",
            "--data.class_generation.num_inference_steps", "2", "--trainer.max_steps", str(max_steps),
            "--trainer.logger.init_args.save_dir", str(run), "--trainer.enable_progress_bar", "false",
            "--samples.at_fit_end", "false", *extra,
        ])

    fit(2)
    fit(4, "--ckpt_path", "last")
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4
    assert checkpoint["state_dict"] and all("lora_" in key for key in checkpoint["state_dict"])
    assert (run / "export" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "export" / "pdm_lightning_lora.safetensors").is_file()
    assert not (run / "export" / "pipeline").exists()
