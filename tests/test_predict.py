"""predict.py: images from an exported pipeline, reproducible per seed, with prompt and seed in the PNG."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from conftest import REPO_ROOT


def run_predict(model_dir: Path, out: Path, seed: int) -> list[Path]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("predict_script", REPO_ROOT / "predict.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--pipeline", str(model_dir), "--prompt", "a photo of sks dog", "--prompt", "a dog on the beach",
                 "--num_images", "2", "--steps", "2", "--seed", str(seed), "--out", str(out), "--device", "cpu"])
    return sorted(out.glob("*.png"))


def test_predict_is_deterministic_and_records_metadata(tmp_path: Path, tiny_model_dir: Path) -> None:
    first = run_predict(tiny_model_dir, tmp_path / "a", seed=1)
    second = run_predict(tiny_model_dir, tmp_path / "b", seed=1)
    other = run_predict(tiny_model_dir, tmp_path / "c", seed=2)
    assert [p.name for p in first] == [
        "00_a_photo_of_sks_dog_00.png", "00_a_photo_of_sks_dog_01.png",
        "01_a_dog_on_the_beach_00.png", "01_a_dog_on_the_beach_01.png",
    ]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert [p.read_bytes() for p in first] != [p.read_bytes() for p in other]
    with Image.open(first[2]) as image:
        assert image.text["prompt"] == "a dog on the beach"
        assert int(image.text["seed"]) > 0
