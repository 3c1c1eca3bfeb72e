"""python -m pdm_lightning.prepare: a run's inputs made from its train.py options, without training."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import pytest

from conftest import EXAMPLE_SUBJECT, REPO_ROOT, folder_snapshot
from pdm_lightning.prepare.__main__ import main


def prepare_args(model: Path, instance: Path, root: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO_ROOT / "configs" / "quickstart.yaml"),
        "--config", str(REPO_ROOT / "configs" / "quickstart" / "pdm.yaml"),
        "--model.pretrained_model_name_or_path", str(model),
        "--model.pdm.inversion_steps", "3",
        "--model.pdm.cache_dir", str(root / "bank-cache"),
        "--data.instance_data_dir", str(instance),
        "--data.class_data_dir", str(root / "class_images"),
        "--data.num_class_images", "3",
        "--data.class_generation.num_inference_steps", "2",
        "--trainer.logger.init_args.save_dir", str(root / "run"),
        *extra,
    ]


def test_prepare_makes_class_images_and_bank_then_finds_them_done(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    instance = Path(shutil.copytree(EXAMPLE_SUBJECT, tmp_path / "instance"))
    before = folder_snapshot(instance)
    main(prepare_args(tiny_model_dir, instance, tmp_path))
    assert len([p for p in (tmp_path / "class_images").iterdir() if p.suffix == ".png"]) == 3
    [bank] = [p for p in (tmp_path / "bank-cache").iterdir() if p.is_dir()]
    # One file per photo, named by the photo's content (docs/reliability.md).
    photos = {hashlib.sha256(p.read_bytes()).hexdigest() for p in instance.iterdir()}
    assert {p.stem for p in bank.glob("*.safetensors")} == photos and len(photos) == 5
    assert "5 image(s) built, 0 reused" in caplog.text
    caplog.clear()
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained

    main(prepare_args(tiny_model_dir, instance, tmp_path))  # a second call builds nothing
    assert "0 image(s) built, 5 reused" in caplog.text
    assert folder_snapshot(instance) == before  # the user's photos untouched


def test_prepare_reports_bad_input_as_one_line(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(prepare_args(tiny_model_dir, empty, tmp_path))
    assert exit_info.value.code == 2
    assert "instance_data_dir" in capsys.readouterr().err
