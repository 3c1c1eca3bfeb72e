"""Bad inputs end to end: the data module and the CLI stop early, name the culprit and touch nothing."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO_ROOT, folder_snapshot
from PIL import Image

from pdm_lightning.training.datamodule import DreamBoothDataModule
from pdm_lightning.core.errors import InputDataError
from pdm_lightning.core.loading import ModelSource

INSTANCE_PROMPT = "a photo of sks dog"


def make_datamodule(instance_data_dir, tiny_model_dir, **kwargs):
    return DreamBoothDataModule(
        instance_data_dir=str(instance_data_dir),
        instance_prompt=kwargs.pop("instance_prompt", INSTANCE_PROMPT),
        base_model=ModelSource(str(tiny_model_dir)),
        resolution=kwargs.pop("resolution", 64),
        **kwargs,
    )


def _unreadable_image(instance_dir, tmp_path):
    bad = instance_dir / "05.jpg"
    bad.write_text("not a jpeg, just text")
    return instance_dir, bad


def _truncated_image(instance_dir, tmp_path):
    bad = instance_dir / "02.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return instance_dir, bad


def _empty_folder(instance_dir, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder, folder


def _missing_folder(instance_dir, tmp_path):
    folder = tmp_path / "no_such_folder"
    return folder, folder


def _folder_is_a_file(instance_dir, tmp_path):
    path = instance_dir / "00.jpg"
    return path, path


def _far_too_small_image(instance_dir, tmp_path):
    bad = instance_dir / "thumb.png"
    Image.new("RGB", (16, 16), (200, 100, 50)).save(bad)
    return instance_dir, bad


def _heic_photo(instance_dir, tmp_path):
    bad = instance_dir / "IMG_1234.HEIC"
    bad.write_bytes(b"\x00\x00\x00\x18ftypheic")
    return instance_dir, bad


@pytest.mark.parametrize(
    "make_bad_input",
    [
        _unreadable_image,
        _truncated_image,
        _empty_folder,
        _missing_folder,
        _folder_is_a_file,
        _far_too_small_image,
        _heic_photo,
    ],
)
def test_prepare_data_rejects_bad_instance_input(instance_dir, tmp_path, tiny_model_dir, make_bad_input):
    """prepare_data raises InputDataError naming the bad file or folder and leaves the folder byte-identical."""
    folder, culprit = make_bad_input(instance_dir, tmp_path)
    before = folder_snapshot(instance_dir)
    datamodule = make_datamodule(folder, tiny_model_dir)
    with pytest.raises(InputDataError) as excinfo:
        datamodule.prepare_data()
    assert str(culprit) in str(excinfo.value)
    assert folder_snapshot(instance_dir) == before
    if make_bad_input is _missing_folder:
        assert not folder.exists()


def test_prepare_data_rejects_unreadable_user_class_image(instance_dir, tmp_path, tiny_model_dir):
    """With prior preservation an unreadable image the user put in class_data_dir is named; nothing is generated."""
    class_dir = tmp_path / "class_images"
    class_dir.mkdir()
    Image.new("RGB", (64, 64), (90, 90, 90)).save(class_dir / "a.png")
    bad = class_dir / "b.jpg"
    bad.write_text("corrupt download")
    instance_before, class_before = folder_snapshot(instance_dir), folder_snapshot(class_dir)
    datamodule = make_datamodule(
        instance_dir,
        tiny_model_dir,
        with_prior_preservation=True,
        class_data_dir=str(class_dir),
        class_prompt="a photo of dog",
        num_class_images=3,
    )
    with pytest.raises(InputDataError) as excinfo:
        datamodule.prepare_data()
    assert str(bad) in str(excinfo.value)
    assert folder_snapshot(class_dir) == class_before
    assert folder_snapshot(instance_dir) == instance_before


def test_prepare_data_rejects_class_data_dir_that_is_a_file(instance_dir, tmp_path, tiny_model_dir):
    """class_data_dir pointing at a file is an InputDataError naming it (like instance_data_dir)."""
    not_a_folder = tmp_path / "class_images.txt"
    not_a_folder.write_text("a list of files, not a folder")
    datamodule = make_datamodule(
        instance_dir,
        tiny_model_dir,
        with_prior_preservation=True,
        class_data_dir=str(not_a_folder),
        class_prompt="a photo of dog",
        num_class_images=2,
    )
    with pytest.raises(InputDataError) as excinfo:
        datamodule.prepare_data()
    assert str(not_a_folder) in str(excinfo.value)
    assert not_a_folder.read_text() == "a list of files, not a folder"


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_instance_prompt_is_refused_at_construction(instance_dir, tiny_model_dir, prompt):
    """An empty or blank instance prompt fails when the data module is built."""
    with pytest.raises(InputDataError, match="instance_prompt"):
        make_datamodule(instance_dir, tiny_model_dir, instance_prompt=prompt)


def test_prior_preservation_without_class_prompt_is_refused(instance_dir, tmp_path, tiny_model_dir):
    """Prior preservation needs class_prompt (and class_data_dir); the message names what is missing."""
    with pytest.raises(InputDataError, match="class_prompt") as excinfo:
        make_datamodule(instance_dir, tiny_model_dir, with_prior_preservation=True, class_data_dir=str(tmp_path / "c"))
    assert "class_data_dir" not in str(excinfo.value).split("needs")[1].split(":")[0]
    with pytest.raises(InputDataError, match="class_data_dir and class_prompt"):
        make_datamodule(instance_dir, tiny_model_dir, with_prior_preservation=True)


@pytest.mark.parametrize("resolution", [60, 4, 0, -64])
def test_resolution_must_be_a_positive_multiple_of_8(instance_dir, tiny_model_dir, resolution):
    """A resolution the VAE cannot divide by 8 is refused at construction."""
    with pytest.raises(InputDataError, match="multiple of 8"):
        make_datamodule(instance_dir, tiny_model_dir, resolution=resolution)


def test_good_arguments_construct(instance_dir, tmp_path, tiny_model_dir):
    """The checks above are not over-eager: valid settings build a data module."""
    datamodule = make_datamodule(
        instance_dir, tiny_model_dir, with_prior_preservation=True, class_data_dir=str(tmp_path / "c"),
        class_prompt="a photo of dog", resolution=72,
    )
    assert datamodule.hparams.resolution == 72


def test_hidden_files_and_readme_are_skipped_with_a_warning(instance_dir, tiny_model_dir):
    """.DS_Store, AppleDouble ._ files and a README.txt are skipped with a warning; training data is the 5 photos."""
    (instance_dir / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (instance_dir / "._00.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    (instance_dir / "README.txt").write_text("photos of my dog")
    before = folder_snapshot(instance_dir)
    datamodule = make_datamodule(instance_dir, tiny_model_dir)
    with pytest.warns(UserWarning, match="Skipping 3") as record:
        datamodule.prepare_data()
    message = " ".join(str(w.message) for w in record)
    for name in (".DS_Store", "._00.jpg", "README.txt"):
        assert name in message
    with pytest.warns(UserWarning, match="Skipping 3"):
        datamodule.setup("fit")
    assert [p.name for p in datamodule.train_dataset.instance_images] == [f"0{i}.jpg" for i in range(5)]
    assert folder_snapshot(instance_dir) == before


def test_cli_reports_bad_image_and_exits_2_without_training(instance_dir, tmp_path, tiny_model_dir, monkeypatch, capsys):
    """train.py fit with an unreadable photo: exit code 2, the file named on stderr, no checkpoint, folder intact."""
    from pdm_lightning.cli import main

    bad = instance_dir / "broken.jpg"
    bad.write_text("<html>download failed</html>")
    before = folder_snapshot(instance_dir)
    run_dir = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "train.py",
            "fit",
            "--config",
            str(REPO_ROOT / "configs" / "quickstart.yaml"),
            "--model.pretrained_model_name_or_path",
            str(tiny_model_dir),
            "--data.instance_data_dir",
            str(instance_dir),
            "--data.with_prior_preservation",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(run_dir),
        ],
    )
    with pytest.raises(SystemExit) as excinfo:
        main()
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert str(bad) in err
    assert "Traceback" not in err
    checkpoints = run_dir / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.rglob("*"))
    assert not list(tmp_path.rglob("*.ckpt"))
    assert not (run_dir / "export").exists()
    # Prior preservation is off: the quickstart's class folder was not created or filled.
    assert not (tmp_path / "runs").exists()
    assert folder_snapshot(instance_dir) == before


def test_prompt_longer_than_the_text_encoder_reads_is_reported(instance_dir, tiny_model_dir):
    """A prompt past 77 tokens is truncated by CLIP; the user is told instead of silently losing its end."""
    long_prompt = "a photo of sks dog " + "on the beach " * 30
    datamodule = make_datamodule(instance_dir, tiny_model_dir, instance_prompt=long_prompt)
    with pytest.warns(UserWarning, match="only the first 77"):
        datamodule.setup("fit")
    assert datamodule.train_dataset.instance_input_ids.shape == (77,)
