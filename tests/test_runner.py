"""The multi-subject runner: two DreamBench subjects on the tiny models, interrupted and resumed."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from pdm_lightning import runner
from pdm_lightning.evaluation.prompts import BUNDLED_PROMPTS_FILE
from pdm_lightning.evaluation.tiny_models import save_tiny_evaluation_models

REPO_ROOT = Path(__file__).resolve().parents[1]
DREAMBENCH = REPO_ROOT / "examples"  # the bundled subjects dog and backpack; classes from the bundled table


def tiny_overrides(model: Path, clip: Path, dino: Path) -> list[str]:
    return [
        "--model.pretrained_model_name_or_path", str(model),
        "--trainer.max_steps", "1", "--checkpoint.every_n_train_steps", "1",
        "--data.with_prior_preservation", "false", "--data.resolution", "64",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--evaluation.dino_model", str(dino), "--evaluation.clip_model", str(clip),
        "--data.evaluation.max_prompts", "1", "--data.evaluation.num_images_per_prompt", "1",
        "--data.evaluation.num_inference_steps", "2", "--data.evaluation.pres_num_images", "1",
    ]


def test_subject_arguments_name_the_subject_class_and_run(tmp_path: Path) -> None:
    dreambench = tmp_path / "dreambench"  # a subject folder, no prompts_and_classes.txt: the bundled table
    (dreambench / "bear_plushie").mkdir(parents=True)
    shutil.copy(DREAMBENCH / "backpack" / "00.jpg", dreambench / "bear_plushie" / "00.jpg")
    subjects, prompts_file = runner.find_subjects(dreambench, ["bear_plushie"])
    assert prompts_file == BUNDLED_PROMPTS_FILE and subjects[0].folder == dreambench / "bear_plushie"
    args = runner.subject_arguments(subjects[0], "cfg.yaml", tmp_path, "sks", prompts_file, ["--trainer.max_steps", "5"])
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["--data.instance_prompt"] == "a photo of sks stuffed animal"
    assert pairs["--data.class_prompt"] == "a photo of stuffed animal"
    assert pairs["--data.class_data_dir"] == str(tmp_path / "class_images" / "stuffed_animal")
    assert pairs["--trainer.logger.init_args.save_dir"] == str(tmp_path / "bear_plushie")
    assert args[:2] == ["--config", "cfg.yaml"] and args[-2:] == ["--trainer.max_steps", "5"]
    with pytest.raises(runner.InputDataError, match="not_a_subject"):
        runner.find_subjects(DREAMBENCH, ["not_a_subject"])
    # Without --subjects: the folders named in the classes table, in name order (examples/dog_masks is not one).
    assert [s.name for s in runner.find_subjects(DREAMBENCH)[0]] == ["backpack", "dog"]


def test_a_folders_own_prompts_file_takes_precedence_over_the_bundled_one(tmp_path: Path) -> None:
    (tmp_path / "bear_plushie").mkdir()
    own = tmp_path / runner.PROMPTS_FILE
    own.write_text(BUNDLED_PROMPTS_FILE.read_text().replace("bear_plushie,stuffed animal", "bear_plushie,teddy bear"))
    subjects, prompts_file = runner.find_subjects(tmp_path)
    assert prompts_file == own and [(s.name, s.class_noun) for s in subjects] == [("bear_plushie", "teddy bear")]
    with pytest.raises(runner.InputDataError, match="not a folder"):
        runner.find_subjects(tmp_path / "missing")
    with pytest.raises(runner.InputDataError, match="No folder"):
        runner.find_subjects(tmp_path / "bear_plushie")


def test_two_subjects_interrupted_then_resumed_without_redoing_the_first(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip, dino = save_tiny_evaluation_models(tmp_path / "eval-models")
    out = tmp_path / "bench"
    commands: list[tuple[str, str]] = []

    def recording(args: list[str]) -> None:
        subject = Path(args[args.index("--trainer.logger.init_args.save_dir") + 1]).name
        commands.append((subject, args[0]))
        if subject == "backpack" and crash["on"]:
            raise KeyboardInterrupt("simulated interruption during the second subject")
        runner.in_process_command(args)

    crash = {"on": True}
    run = dict(dreambench=DREAMBENCH, out=out, subjects=["dog", "backpack"], extra=tiny_overrides(tiny_model_dir, clip, dino),
               command=recording)
    with pytest.raises(KeyboardInterrupt):
        runner.run_benchmark(**run)
    assert (out / "dog" / runner.DONE_MARKER).is_file() and not (out / "backpack" / runner.DONE_MARKER).exists()
    assert commands == [("dog", "fit"), ("dog", "test"), ("backpack", "fit")]

    crash["on"] = False
    commands.clear()
    results = runner.run_benchmark(**run)
    assert commands == [("backpack", "fit"), ("backpack", "test")]  # dog not redone
    assert list(results) == ["dog", "backpack"]
    # Objects get the object prompts, live subjects the live-subject ones.
    backpack = json.loads((out / "backpack" / "eval" / "test" / "metrics.json").read_text())
    assert backpack["per_prompt"][0]["prompt"] == "a sks backpack in the jungle" and backpack["class_prompt"] == "a backpack"
    table = list(csv.reader((out / "results.csv").open()))
    assert [row[0] for row in table] == ["subject", "dog", "backpack", "mean"]
    assert table[0][1:] == ["dino_i", "clip_i", "clip_t", "pres"]
    dino_column = [float(row[1]) for row in table[1:]]
    assert dino_column[2] == pytest.approx((dino_column[0] + dino_column[1]) / 2, abs=1e-6)
    assert "| **mean** |" in (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 0


def test_best_checkpoint_is_the_highest_score_not_the_latest_step(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for step, score in ((2, 0.9), (4, 0.5), (6, 0.7)):
        (checkpoints / f"best-step={step:06d}.ckpt").write_bytes(b"weights")
        (checkpoints / f"best-step={step:06d}.json").write_text(json.dumps({"step": step, "score": score}))
    (checkpoints / "last.ckpt").write_bytes(b"weights")
    assert runner.checkpoint_to_test(tmp_path, "best").name == "best-step=000002.ckpt"
    assert runner.checkpoint_to_test(tmp_path, "last").name == "last.ckpt"
    for scored in checkpoints.glob("best-*"):
        scored.unlink()
    assert runner.checkpoint_to_test(tmp_path, "best").name == "last.ckpt"  # no quality checkpoint: last
