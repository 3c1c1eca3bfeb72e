"""configs/own_photos.yaml: the tiny CPU recipe for a user's own folder, with three settings to give."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_ROOT, folder_snapshot

from pdm_lightning.cli import cli_main

CONFIG = REPO_ROOT / "configs" / "own_photos.yaml"
# The three settings the user gives, as config keys; the header's command sets each of them.
SETTINGS = ("data.instance_data_dir", "data.instance_prompt", "data.class_prompt", "trainer.logger.init_args.save_dir")
CLASS_DIR = Path("runs/own_photos-class-images")  # the header says the class images go here (relative to the cwd)


def config_value(config: dict, key: str) -> object:
    for part in key.split("."):
        config = config[part]
    return config


def header_command(text: str) -> str:
    """The ``python train.py fit ...`` command of the header comment, its continuation lines joined."""
    lines = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith("python train.py fit"))
    command = []
    for line in lines[start:]:
        command.append(line.removesuffix("\\").strip())
        if not line.endswith("\\"):
            break
    return " ".join(command)


def test_the_config_names_its_settings_with_placeholders_and_has_no_masks() -> None:
    text = CONFIG.read_text()
    config = yaml.safe_load(text)
    command = header_command(text)
    for key in SETTINGS:
        assert "your" in str(config_value(config, key)), f"{key} should hold an obvious placeholder"
        assert f"--{key} " in command, f"the header's command should set --{key}"
        assert f"# SET: --{key}" in text  # marked where it is set
    # Masks off: no mask option at all, so no bundled mask can be matched to the user's photos.
    assert "masks" not in config["data"] and "mask" not in text.split("seed_everything:")[1]
    assert config["model"]["pdm"]["inversion_steps"] == 50 and config["model"]["pretrained_model_name_or_path"] == "runs/tiny-sd"
    assert config["data"]["with_prior_preservation"] and config["data"]["class_data_dir"] == str(CLASS_DIR)
    assert str(CLASS_DIR) in text.split("seed_everything:")[0]  # where the class images go is said in the header


def test_placeholders_left_as_they_are_stop_the_run_at_once_naming_the_option(tmp_path: Path, tiny_model_dir: Path) -> None:
    # train.py as a user runs it (the one-line error is printed by its entry point), from an empty folder.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PDM_LIGHTNING_CACHE": str(tmp_path / "bank-cache")}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "fit", "--config", str(CONFIG),
         "--model.pretrained_model_name_or_path", str(tiny_model_dir)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.search(r"^error: instance_data_dir path/to/your/photos does not exist: ", result.stderr, re.MULTILINE), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    # Stopped before anything was made: no run folder, no class images, no bank.
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_recipe_trains_on_a_folder_of_photos(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the class folder is relative to where the command runs
    monkeypatch.setenv("PDM_LIGHTNING_CACHE", str(tmp_path / "bank-cache"))
    photos = Path(shutil.copytree(REPO_ROOT / "examples" / "backpack", tmp_path / "photos"))
    before = folder_snapshot(photos)
    run = tmp_path / "runs" / "my_backpack"
    cli = cli_main([
        "fit", "--config", str(CONFIG), "--model.pretrained_model_name_or_path", str(tiny_model_dir),
        "--data.instance_data_dir", str(photos), "--data.instance_prompt", "a photo of sks backpack",
        "--data.class_prompt", "a photo of backpack", "--trainer.logger.init_args.save_dir", str(run),
        "--data.num_class_images", "2", "--model.pdm.inversion_steps", "3", "--trainer.max_steps", "2",
    ])
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert (run / "export" / "manifest.json").is_file() and (run / "config.yaml").is_file()
    # The PDM loss with prior preservation, and no mask anywhere.
    assert cli.model.pdm is not None and cli.model.pdm.inversion_steps == 3 and cli.datamodule.hparams.with_prior_preservation
    assert not cli.datamodule.masks.enabled and cli.datamodule.instance_mask_files is None
    assert not (run / "masks").exists()
    assert len(list((tmp_path / CLASS_DIR).glob("*.png"))) == 2  # where the header says
    assert folder_snapshot(photos) == before  # the user's folder is read only


def test_a_prompt_left_as_its_placeholder_stops_the_run_naming_the_option(tmp_path: Path) -> None:
    from pdm_lightning.core.errors import InputDataError
    from pdm_lightning.prepare import check_no_placeholders

    with pytest.raises(InputDataError, match=r"--data.instance_prompt .a photo of sks <your subject's class>. still holds a placeholder"):
        check_no_placeholders({"instance_prompt": "a photo of sks <your subject's class>", "class_prompt": "a photo of cat"})
    with pytest.raises(InputDataError, match=r"--data.class_prompt"):
        check_no_placeholders({"instance_prompt": "a photo of sks cat", "class_prompt": "a photo of <class>"})
    check_no_placeholders({"instance_prompt": "a photo of sks cat", "class_prompt": None})  # real prompts pass
