"""Papercuts of the newcomer's path (issue 12): the step an evaluation reports, a checkpoint's base model
from another directory, a readable results plot, grids of the training samples, predict's last line."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_cli
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import (
    IMAGES,
    EventAccumulator,
)
from test_eval_cli import eval_args, scalars
from test_predict import load_predict_script, pixels

from pdm_lightning.cli import cli_main
from pdm_lightning.evaluation.report import (
    METRIC_NAMES,
    PALETTE,
    bar_plot,
    write_subject_table,
)
from pdm_lightning.export.export_set import write_manifest
from pdm_lightning.generation.files import make_grid, open_rgb

FEW = ("--data.evaluation.max_prompts", "1", "--data.evaluation.num_images_per_prompt", "1",
       "--data.evaluation.pres_num_images", "0")


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from pdm_lightning.evaluation.tiny_models import save_tiny_evaluation_models

    return save_tiny_evaluation_models(tmp_path_factory.mktemp("eval-models"))


# ---- 1. train.py test reports the step the weights were trained to -----------------------------------


def test_test_reports_the_checkpoints_step_not_zero(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, eval_models: tuple[Path, Path]
) -> None:
    run = tmp_path / "run"
    cli_main(["fit", *eval_args(run, tiny_model_dir, instance_dir, eval_models, "--trainer.max_steps", "3",
                                "--samples.at_fit_end", "false")])
    cli_main(["test", *eval_args(run, tiny_model_dir, instance_dir, eval_models, *FEW, "--ckpt_path", "last")])
    report = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert report["model"]["global_step"] == 3 and report["model"]["ckpt_path"].endswith(".ckpt")
    for metric in report["metrics"]:
        assert sorted(scalars(run, f"eval/{metric}")) == [3], metric  # was step 0
    events = EventAccumulator(str(run), size_guidance={IMAGES: 0}).Reload()
    assert {e.step for tag in events.Tags()[IMAGES] if tag.startswith("eval/") for e in events.Images(tag)} == {3}

    # The exported pipeline (no checkpoint): the step of its export set's manifest.
    exported = tmp_path / "exported"
    cli_main(["test", *eval_args(exported, run / "export" / "pipeline", instance_dir, eval_models, *FEW)])
    assert json.loads((exported / "eval" / "test" / "metrics.json").read_text())["model"]["global_step"] == 3
    assert sorted(scalars(exported, "eval/dino_i")) == [3]

    # The base model: no step to report (null), never a made-up 0 in metrics.json.
    base = tmp_path / "base"
    cli_main(["test", *eval_args(base, tiny_model_dir, instance_dir, eval_models, *FEW)])
    assert json.loads((base / "eval" / "test" / "metrics.json").read_text())["model"]["global_step"] is None


def test_exported_step_reads_only_the_manifest_of_that_pipelines_set(tmp_path: Path) -> None:
    from pdm_lightning.callbacks.evaluation import exported_step

    export = tmp_path / "export"
    (export / "pipeline" / "unet").mkdir(parents=True)
    (export / "pipeline" / "unet" / "weights.safetensors").write_bytes(b"w")
    (export / "other").mkdir()
    write_manifest(export, 14, "hash")
    assert exported_step(str(export / "pipeline")) == 14
    assert exported_step(str(export / "other")) is None  # not part of the set's files
    assert exported_step(str(tmp_path)) is None  # no manifest beside it
    assert exported_step("stable-diffusion-v1-5/stable-diffusion-v1-5") is None  # a hub id
    (export / "manifest.json").write_text("{not json")
    assert exported_step(str(export / "pipeline")) is None  # damaged: informative only, no failure


# ---- 2. a checkpoint's base model, predicted from another directory -----------------------------------


def refuse_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any hub request fails the test (a local path must never be sent there, with or without network)."""
    from pdm_lightning.core import loading

    def no_hub(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"hub called with {args}")

    monkeypatch.setattr(loading, "hf_hub_download", no_hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_local_base_model_is_recorded_absolute_and_a_hub_id_as_given(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pdm_lightning.training.module import DreamBoothModule

    shutil.copytree(tiny_model_dir, tmp_path / "runs" / "tiny-sd")
    monkeypatch.chdir(tmp_path)
    module = DreamBoothModule("runs/tiny-sd")
    assert module.hparams.pretrained_model_name_or_path == str(tmp_path.resolve() / "runs" / "tiny-sd")
    assert module.trained_steps is None
    hub = DreamBoothModule("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert hub.hparams.pretrained_model_name_or_path == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_checkpoint_with_a_relative_base_model_predicts_from_another_directory(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    from pdm_lightning.callbacks.export import ExportWeights

    refuse_hub(monkeypatch)
    work = tmp_path / "work"
    shutil.copytree(tiny_model_dir, work / "runs" / "tiny-sd")
    monkeypatch.chdir(work)
    fit = build_cli(work / "run", Path("runs/tiny-sd"), instance_dir, "--trainer.max_steps", "1",
                    "--samples.at_fit_end", "false", "--samples.every_n_train_steps", "0")
    fit.trainer.callbacks = [c for c in fit.trainer.callbacks if not isinstance(c, ExportWeights)]
    fit.trainer.fit(fit.model, datamodule=fit.datamodule)
    checkpoint = work / "run" / "checkpoints" / "last.ckpt"
    recorded = torch.load(checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert recorded["pretrained_model_name_or_path"] == str(work.resolve() / "runs" / "tiny-sd")  # as the CLI got it: relative
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    script = load_predict_script()
    common = ["--checkpoint", str(checkpoint), "--prompt", "a photo of sks dog", "--num_images", "2", "--steps", "2",
              "--device", "cpu"]

    script.main([*common, "--out", "out"])
    assert len(list((elsewhere / "out").glob("*.png"))) == 2
    assert capsys.readouterr().out.strip().endswith("Wrote 2 images and 1 grid to out/ (grids in out/grids/)")

    # Checkpoints written before paths were recorded absolute hold "runs/tiny-sd" as typed: found above the checkpoint.
    legacy = work / "run" / "checkpoints" / "legacy.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["hyper_parameters"]["pretrained_model_name_or_path"] = "runs/tiny-sd"
    torch.save(state, legacy)
    with pytest.warns(UserWarning, match="relative to the directory it was trained in"):
        script.main([*common, "--checkpoint", str(legacy), "--out", "legacy"])
    assert len(list((elsewhere / "legacy").glob("*.png"))) == 2

    moved = tmp_path / "moved-model"
    shutil.move(work / "runs" / "tiny-sd", moved)
    for ckpt, recorded in ((checkpoint, str(work.resolve() / "runs" / "tiny-sd")), (legacy, "runs/tiny-sd")):
        started = time.monotonic()
        with pytest.raises(SystemExit) as exit_info:
            script.main([*common, "--checkpoint", str(ckpt), "--out", "failed"])
        assert time.monotonic() - started < 5  # at once: no hub request, no retries
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert f"records its base model as {recorded}, which does not exist here" in error
        assert "--pretrained_model_name_or_path DIR" in error
    assert not (elsewhere / "failed").exists()

    script.main([*common, "--pretrained_model_name_or_path", str(moved), "--out", "overridden"])  # the fix it names
    assert len(list((elsewhere / "overridden").glob("*.png"))) == 2


# ---- 3. the runner's results plot -------------------------------------------------------------------


def zero_line_x(image: np.ndarray) -> int:
    """The panel's zero line: the column with the most pure-black pixels (text glyphs are short)."""
    black = (image == 0).all(axis=-1)
    return int(black.sum(axis=0).argmax())


def colour_columns(image: np.ndarray, colour: str) -> np.ndarray:
    rgb = np.array(Image.new("RGB", (1, 1), colour).getpixel((0, 0)))
    return np.nonzero((image == rgb).all(axis=-1).any(axis=0))[0]


def test_results_plot_draws_negative_values_left_of_a_zero_line(tmp_path: Path) -> None:
    rows = [["neg", -0.2], ["pos", 0.5], ["mean", 0.15]]
    image = np.asarray(bar_plot(["clip_t"], rows))
    zero = zero_line_x(image)
    negative, positive = colour_columns(image, PALETTE[0]), colour_columns(image, PALETTE[1])
    assert negative.size > 20 and positive.size > 20  # both bars drawn (a negative one was not)
    assert negative.max() <= zero <= positive.min()
    assert positive.size > negative.size  # lengths follow the values (0.5 vs 0.2)
    from pdm_lightning.evaluation.report import METRIC_DIRECTIONS


    paths = write_subject_table(tmp_path, {"dog": {"clip_t": -0.03, "dino_i": 0.4}, "cat": {"clip_t": 0.01, "pres": 0.3}})
    with Image.open(tmp_path / "results.png") as png:
        directions = json.loads(png.text["directions"])
    assert directions == {"DINO-I": "higher is better", "CLIP-T": "higher is better", "PRES": "lower is better"}
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.splitlines()[0] == "| subject | DINO-I ↑ | CLIP-T ↑ | PRES ↓ |"
    assert "↑ higher is better, ↓ lower is better" in markdown and "| **mean** |" in markdown
    assert [p.name for p in paths] == ["results.csv", "results.md", "results.png"]
    assert set(METRIC_DIRECTIONS) == set(METRIC_NAMES)  # every metric has a direction


# ---- 4. training samples have grids on disk ---------------------------------------------------------


def test_training_samples_write_a_grid_per_prompt(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    from pdm_lightning.callbacks.export import ExportWeights

    run = tmp_path / "run"
    fit = build_cli(run, tiny_model_dir, instance_dir, "--trainer.max_steps", "1", "--samples.every_n_train_steps", "0",
                    "--samples.num_images", "2", "--samples.num_inference_steps", "2",
                    "--samples.prompts", '["a photo of sks dog", "a sks dog on the beach"]')
    fit.trainer.callbacks = [c for c in fit.trainer.callbacks if not isinstance(c, ExportWeights)]
    fit.trainer.fit(fit.model, datamodule=fit.datamodule)
    step = run / "samples" / "step_000001"
    grids = sorted((step / "grids").glob("*.png"))
    assert [g.name for g in grids] == ["00_a_photo_of_sks_dog.png", "01_a_sks_dog_on_the_beach.png"]
    images = [open_rgb(step / f"01_a_sks_dog_on_the_beach_{k:02d}.png") for k in range(2)]
    assert np.array_equal(pixels(grids[1]), np.asarray(make_grid(images)))  # the prompt's images side by side
    with Image.open(grids[0]) as grid:
        assert grid.text["prompt"] == "a photo of sks dog"
    events = EventAccumulator(str(run), size_guidance={IMAGES: 0}).Reload()
    assert sorted(events.Tags()[IMAGES]) == ["samples/00_a_photo_of_sks_dog", "samples/01_a_sks_dog_on_the_beach"]


# ---- 5. predict's last line and --help ---------------------------------------------------------------


def test_predict_says_where_it_wrote_with_correct_counts(capsys: pytest.CaptureFixture) -> None:
    script = load_predict_script()
    assert script.summary(4, 1, "outputs") == "Wrote 4 images and 1 grid to outputs/ (grids in outputs/grids/)"
    assert script.summary(1, 3, "runs/x/") == "Wrote 1 image and 3 grids to runs/x/ (grids in runs/x/grids/)"
    with pytest.raises(SystemExit):
        script.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default: outputs/ in the current directory" in help_text
