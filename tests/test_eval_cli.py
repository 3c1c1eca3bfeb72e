"""`train.py test` / `validate` run the DreamBench evaluation end to end on the tiny models, and
QualityCheckpoint scores checkpoints during fit without changing the training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import quickstart_args
from pdm_lightning.callbacks.quality_checkpoint import best_scored_checkpoint, score_file
from pdm_lightning.cli import cli_main
from pdm_lightning.core.images import list_image_files, load_rgb_image
from pdm_lightning.evaluation.embedders import ClipEmbedder, DinoEmbedder
from pdm_lightning.evaluation.metrics import all_pairs_mean, matched_pairs_mean
from pdm_lightning.evaluation.tiny_models import save_tiny_evaluation_models


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return save_tiny_evaluation_models(tmp_path_factory.mktemp("eval-models"))


def eval_args(run: Path, model: Path, instance: Path, eval_models: tuple[Path, Path], *extra: str) -> list[str]:
    clip, dino = eval_models
    return quickstart_args(
        run, model, instance,
        "--evaluation.dino_model", str(dino), "--evaluation.clip_model", str(clip),
        "--data.evaluation.max_prompts", "2", "--data.evaluation.num_images_per_prompt", "2",
        "--data.evaluation.num_inference_steps", "2", "--data.evaluation.pres_num_images", "2",
        *extra,
    )


def scalars(run: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(run))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {}


def test_test_subcommand_writes_reports_that_match_a_recomputation(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, eval_models: tuple[Path, Path]
) -> None:
    run = tmp_path / "run"
    cli = cli_main(["test", *eval_args(run, tiny_model_dir, instance_dir, eval_models)])
    out = run / "eval" / "test"
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["metrics"]) == {"dino_i", "clip_i", "clip_t", "dino_d", "clip_d", "pres"}
    assert "torchvision" in report["left_out"]["lpips_i"]  # LPIPS named as missing, not reported as 0
    assert report["subject"]["identifier"] == "sks" and report["class_prompt"] == "a dog"
    assert report["num_generated"] == 4 and report["num_class_prompt_images"] == 2
    assert (out / "metrics.csv").read_text().splitlines()[0] == "prompt,dino_i,clip_i,clip_t,dino_d,clip_d,pres"
    assert sorted(p.name for p in (out / "grids").iterdir()) == [
        "00_a_sks_dog_in_the_jungle.png", "01_a_cube_shaped_sks_dog.png", "class_prompt.png"]
    assert len(list((out / "images").glob("*.png"))) == 6
    assert scalars(run, "eval/dino_i")  # TensorBoard
    assert cli.trainer.callback_metrics["eval/clip_t"].item() == pytest.approx(report["metrics"]["clip_t"], rel=1e-5)

    # Recompute DINO-I, CLIP-T and PRES from the written images with independently loaded embedders.
    clip, dino = ClipEmbedder(str(eval_models[0])), DinoEmbedder(str(eval_models[1]))
    real = [load_rgb_image(p) for p in list_image_files(instance_dir, role="instance_data_dir")]
    generated = sorted((out / "images").glob("0*.png"))
    images = [load_rgb_image(p) for p in generated]
    prompts = ["a sks dog in the jungle"] * 2 + ["a cube shaped sks dog"] * 2
    assert all_pairs_mean(dino.images(images), dino.images(real)) == pytest.approx(report["metrics"]["dino_i"], abs=1e-6)
    assert matched_pairs_mean(clip.images(images), clip.texts(prompts)) == pytest.approx(report["metrics"]["clip_t"], abs=1e-6)
    class_images = [load_rgb_image(p) for p in sorted((out / "images").glob("class_*.png"))]
    assert all_pairs_mean(dino.images(class_images), dino.images(real)) == pytest.approx(report["metrics"]["pres"], abs=1e-6)


def test_validate_subcommand_leaves_out_what_it_cannot_compute(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, eval_models: tuple[Path, Path]
) -> None:
    run = tmp_path / "run"
    cli_main(["validate", *eval_args(run, tiny_model_dir, instance_dir, eval_models,
                                     "--data.evaluation.max_prompts", "1", "--data.evaluation.num_images_per_prompt", "1",
                                     "--data.evaluation.pres_num_images", "0")])
    report = json.loads((run / "eval" / "validate" / "metrics.json").read_text())
    assert set(report["metrics"]) == {"dino_i", "clip_i", "clip_t"}
    assert set(report["left_out"]) >= {"dino_d", "clip_d", "pres", "lpips_i"}


def test_checkpoint_weights_are_applied_in_test(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, eval_models: tuple[Path, Path]
) -> None:
    trained = tmp_path / "trained"
    cli_main(["fit", *eval_args(trained, tiny_model_dir, instance_dir, eval_models,
                                "--trainer.max_steps", "2", "--model.learning_rate", "1e-2")])
    few = ("--data.evaluation.max_prompts", "1", "--data.evaluation.pres_num_images", "0")
    cli_main(["test", *eval_args(trained, tiny_model_dir, instance_dir, eval_models, *few,
                                 "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"))])
    cli_main(["test", *eval_args(tmp_path / "exported", trained / "export" / "pipeline", instance_dir, eval_models, *few)])
    cli_main(["test", *eval_args(tmp_path / "base", tiny_model_dir, instance_dir, eval_models, *few)])

    def image_bytes(run: Path) -> list[bytes]:
        return [load_rgb_image(p).tobytes() for p in sorted((run / "eval" / "test" / "images").glob("*.png"))]

    from_checkpoint = image_bytes(trained)
    assert len(from_checkpoint) == 2
    assert from_checkpoint == image_bytes(tmp_path / "exported")  # checkpoint and export agree
    assert from_checkpoint != image_bytes(tmp_path / "base")  # and both differ from the base model


def test_quality_checkpoint_keeps_the_best_step_and_leaves_training_unchanged(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, eval_models: tuple[Path, Path]
) -> None:
    clip, dino = eval_models
    common = ("--trainer.max_steps", "4", "--model.learning_rate", "1e-3", "--checkpoint.every_n_train_steps", "4")
    cli_main(["fit", *eval_args(tmp_path / "plain", tiny_model_dir, instance_dir, eval_models, *common)])
    cli = cli_main(["fit", *eval_args(
        tmp_path / "scored", tiny_model_dir, instance_dir, eval_models, *common,
        "--quality_checkpoint.every_n_train_steps", "2", "--quality_checkpoint.num_prompts", "2",
        "--quality_checkpoint.num_images_per_prompt", "1", "--quality_checkpoint.num_inference_steps", "2",
        "--quality_checkpoint.dino_model", str(dino), "--quality_checkpoint.clip_model", str(clip),
        "--quality_checkpoint.clip_t_weight", "2.0",
    )])
    score, dino_i, clip_t = (scalars(tmp_path / "scored", f"eval/{k}") for k in ("score", "dino_i", "clip_t"))
    assert sorted(score) == [2, 4]
    assert all(score[s] == pytest.approx(dino_i[s] + 2.0 * clip_t[s], abs=1e-5) for s in score)
    best_step = max(score, key=score.get)
    best = list((tmp_path / "scored" / "checkpoints").glob("best-*.ckpt"))
    assert [p.name for p in best] == [f"best-step={best_step:06d}.ckpt"]
    callback = next(c for c in cli.trainer.callbacks if type(c).__name__ == "QualityCheckpoint")
    assert callback.best_model_score.item() == pytest.approx(score[best_step], abs=1e-5)
    scores = json.loads(score_file(best[0]).read_text())  # what the runner's --checkpoint best ranks by
    assert scores["step"] == best_step and scores["score"] == pytest.approx(score[best_step], abs=1e-5)
    assert best_scored_checkpoint(best[0].parent) == best[0]
    assert sorted(p.name for p in best[0].parent.glob("best-*.json")) == [score_file(best[0]).name]  # removed with its checkpoint
    assert cli.model.training and cli.model.unet.training  # train mode restored

    plain = load_file(tmp_path / "plain" / "export" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    scored = load_file(tmp_path / "scored" / "export" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(plain[k], scored[k]) for k in plain)
    assert scalars(tmp_path / "plain", "train/loss") == scalars(tmp_path / "scored", "train/loss")
