"""python -m pdm_lightning.features: one <stem>.safetensors per instance image, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import folder_snapshot
from pdm_lightning.features import main
from pdm_lightning.pdm import DEFAULT_PDM_LAYER, BankSettings, open_bank
from pdm_lightning.core.images import list_image_files


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def cli_args(model: Path, instance: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(instance),
            "--class_prompt", "a photo of dog", "--resolution", "64", "--out", str(out), "--no_progress", *extra]


def test_cli_writes_one_bank_file_per_image_and_reuses_them(
    tiny_model_dir: Path, instance_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = folder_snapshot(instance_dir)
    out = tmp_path / "features"
    assert main(cli_args(tiny_model_dir, instance_dir, out, "--inversion_steps", "4", "--batch_size", "5")) == 0
    images = list_image_files(instance_dir, "instance")
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}.safetensors" for p in images)
    with safe_open(str(out / f"{images[0].stem}.safetensors"), framework="pt") as handle:
        assert handle.get_slice("queries").get_shape() == [5, 64, 32]
        assert handle.get_tensor("queries").dtype == torch.float16
        assert handle.get_tensor("timesteps").tolist() == [0, 1, 334, 666, 999]
        metadata = handle.metadata()
    assert metadata["class_prompt"] == "a photo of dog" and metadata["layer"] == DEFAULT_PDM_LAYER
    assert metadata["inversion_steps"] == "4" and metadata["dtype"] == "float16" and metadata["image_name"] == images[0].name
    assert "5 images extracted (9 UNet calls" in capsys.readouterr().out
    settings = BankSettings(str(tiny_model_dir), "a photo of dog", 64, inversion_steps=4)
    assert len(open_bank(out, images, settings)) == 5  # training can point at the folder

    assert main(cli_args(tiny_model_dir, instance_dir, out, "--inversion_steps", "4")) == 0
    assert "0 images extracted (0 UNet calls" in capsys.readouterr().out
    assert folder_snapshot(instance_dir) == before  # the photos are never touched


def test_cli_latents_mode_stores_reconstruction_latents(tiny_model_dir: Path, instance_dir: Path, tmp_path: Path) -> None:
    for extra in list_image_files(instance_dir, "instance")[1:]:
        extra.unlink()
    out = tmp_path / "latents"
    assert main(cli_args(tiny_model_dir, instance_dir, out, "--inversion_steps", "2", "--mode", "latents",
                         "--dtype", "float32")) == 0
    (path,) = out.iterdir()
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == {"timesteps", "latents", "timesteps_crc32", "latents_crc32"}
        assert handle.get_slice("latents").get_shape() == [3, 4, 8, 8]


def test_cli_refuses_a_folder_built_with_other_settings(tiny_model_dir: Path, instance_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    for extra in list_image_files(instance_dir, "instance")[1:]:
        extra.unlink()
    out = tmp_path / "features"
    assert main(cli_args(tiny_model_dir, instance_dir, out, "--inversion_steps", "2")) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args(tiny_model_dir, instance_dir, out, "--inversion_steps", "3"))
    assert exit_info.value.code == 2
    assert "built with other settings" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["empty folder", "missing model", "out inside the photos"])
def test_cli_bad_inputs_give_one_clear_error(problem: str, tiny_model_dir: Path, instance_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    model, instance, out = tiny_model_dir, instance_dir, tmp_path / "out"
    before = folder_snapshot(instance_dir)
    if problem == "empty folder":
        instance = tmp_path / "empty"
        instance.mkdir()
    elif problem == "missing model":
        model = tmp_path / "no-such-model"
    else:
        out = instance_dir / "bank"
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args(model, instance, out))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    expected = {"empty folder": "holds no images", "missing model": "does not exist", "out inside the photos": "never written"}
    assert expected[problem] in error
    assert not out.exists()
    assert folder_snapshot(instance_dir) == before


def test_cli_refuses_a_damaged_file_in_its_folder_and_leaves_it(
    tiny_model_dir: Path, instance_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A finished file whose data bytes changed (4 bytes flipped in place, size unchanged) is named, not reused."""
    for extra in list_image_files(instance_dir, "instance")[1:]:
        extra.unlink()
    out = tmp_path / "features"
    assert main(cli_args(tiny_model_dir, instance_dir, out, "--inversion_steps", "2")) == 0
    (path,) = out.iterdir()
    with open(path, "r+b") as handle:  # the last bytes are the queries' last row
        handle.seek(-8, 2)
        tail = handle.read(4)
        handle.seek(-8, 2)
        handle.write(bytes(b ^ 0xFF for b in tail))
    damaged = path.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args(tiny_model_dir, instance_dir, out, "--inversion_steps", "2"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"{path} is damaged (row 2 of queries fails its checksum)" in error and error.count("\n") == 1
    assert path.read_bytes() == damaged  # the user's folder is never rewritten
