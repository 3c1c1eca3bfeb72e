"""Prediction: predict.py from an exported pipeline, a LoRA or a checkpoint, and ``train.py predict``.

Images are reproducible per seed, independent of the batch size, carry prompt and seed in their PNG
metadata, and come with a grid per prompt.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, build_cli
from pdm_lightning.core.errors import InputDataError
from pdm_lightning.generation.files import make_grid
from pdm_lightning.generation.jobs import plan_jobs
from pdm_lightning.generation.prompts import collect_prompts, fill_prompt
from pdm_lightning.generation.settings import GenerationSettings


def load_predict_script():
    spec = importlib.util.spec_from_file_location("predict_script", REPO_ROOT / "predict.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def run_predict(out: Path, *source: str, seed: int = 1, batch_size: int = 4, prompts: tuple[str, ...] = (
        "a photo of sks dog", "a dog on the beach")) -> list[Path]:
    args = [*source, "--num_images", "2", "--steps", "2", "--seed", str(seed), "--out", str(out), "--device", "cpu",
            "--batch_size", str(batch_size)]
    for prompt in prompts:
        args += ["--prompt", prompt]
    load_predict_script().main(args)
    return sorted(out.glob("*.png"))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).astype(np.int16)


def test_predict_is_deterministic_and_records_metadata(tmp_path: Path, tiny_model_dir: Path) -> None:
    source = ("--pipeline", str(tiny_model_dir))
    first = run_predict(tmp_path / "a", *source, seed=1)
    second = run_predict(tmp_path / "b", *source, seed=1)
    other = run_predict(tmp_path / "c", *source, seed=2)
    assert [p.name for p in first] == [
        "00_a_photo_of_sks_dog_00.png", "00_a_photo_of_sks_dog_01.png",
        "01_a_dog_on_the_beach_00.png", "01_a_dog_on_the_beach_01.png",
    ]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert all(p.read_bytes() != q.read_bytes() for p, q in zip(first, other))
    with Image.open(first[2]) as image:
        assert image.text["prompt"] == "a dog on the beach"
        assert image.text["scheduler"] == "dpmsolver++" and image.text["steps"] == "2"
        assert int(image.text["seed"]) > 0 and image.text["run_seed"] == "1"
        size = image.size
    # Image k of every prompt shares its seed; the two images of a prompt do not.
    with Image.open(first[0]) as a, Image.open(first[1]) as b:
        assert a.text["seed"] == image.text["seed"] != b.text["seed"]
    grids = sorted((tmp_path / "a" / "grids").glob("*.png"))
    assert [g.name for g in grids] == ["00_a_photo_of_sks_dog.png", "01_a_dog_on_the_beach.png"]
    with Image.open(grids[1]) as grid:
        assert grid.size == (2 * size[0], size[1])  # 2 images side by side
        assert np.array_equal(np.asarray(grid)[:, size[0]:], pixels(first[3]))


def test_same_seed_same_images_whatever_the_batch_size(tmp_path: Path, tiny_model_dir: Path) -> None:
    source = ("--pipeline", str(tiny_model_dir))
    one_by_one = run_predict(tmp_path / "b1", *source, batch_size=1)
    batched = run_predict(tmp_path / "b3", *source, batch_size=3)  # batches straddle the two prompts
    assert [p.name for p in one_by_one] == [p.name for p in batched]
    for single, batch in zip(one_by_one, batched):
        # Same latents and noise; batched float math may round a pixel to the next of 256 levels.
        assert np.abs(pixels(single) - pixels(batch)).max() <= 1
    different = np.abs(pixels(one_by_one[0]) - pixels(one_by_one[1])).mean()
    assert different > 10  # another seed gives another image, not a near copy


def test_prompt_placeholders_and_prompts_file(tmp_path: Path) -> None:
    assert fill_prompt("a {identifier} {class_noun} in the snow", "sks", "dog") == "a sks dog in the snow"
    assert fill_prompt("a {0} {1}, {{literal}}", "sks", "dog") == "a sks dog, {literal}"
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# DreamBench style\na {0} {1} on the beach\n\n  a red {identifier} {class_noun}  \n")
    assert collect_prompts(["a photo of {0}"], prompts_file, "sks", "dog") == [
        "a photo of sks", "a sks dog on the beach", "a red sks dog",
    ]
    with pytest.raises(InputDataError, match=r"unknown placeholder \{subject\}"):
        fill_prompt("a {subject}", "sks", "dog")
    with pytest.raises(InputDataError, match="no class_noun is set"):
        fill_prompt("a {1}", "sks", None)
    with pytest.raises(InputDataError, match="missing.txt does not exist"):
        collect_prompts([], tmp_path / "missing.txt")
    with pytest.raises(InputDataError, match="Unknown scheduler"):
        GenerationSettings(scheduler="dpm")
    jobs = plan_jobs(["x", "y"], 3, seed=5)
    assert [(j.prompt_index, j.image_index) for j in jobs] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert [j.seed for j in jobs[:3]] == [j.seed for j in jobs[3:]]
    grid = make_grid([Image.new("RGB", (4, 2), c) for c in ("red", "green", "blue")])
    assert grid.size == (8, 4) and grid.getpixel((5, 1)) == (0, 128, 0) and grid.getpixel((1, 3)) == (0, 0, 255)


def test_predict_errors_name_the_fix(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("not a checkpoint")
    two_loras = tmp_path / "loras"
    two_loras.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (two_loras / name).write_bytes(b"")
    cases = [
        (["--pipeline", str(tmp_path / "nope"), "--prompt", "x"], "--pipeline .*nope does not exist"),
        (["--pretrained_model_name_or_path", str(tiny_model_dir), "--lora", str(tmp_path / "l"), "--prompt", "x"],
         "--lora .* does not exist"),
        (["--checkpoint", str(tmp_path / "a.ckpt"), "--prompt", "x"], "--checkpoint .*a.ckpt does not exist"),
        (["--lora", str(tmp_path), "--prompt", "x"], "--lora needs --pretrained_model_name_or_path"),
        (["--pipeline", str(tiny_model_dir), "--prompt", "a {sbj}"], r"unknown placeholder \{sbj\}"),
        (["--pipeline", str(tiny_model_dir)], "No prompt given"),
        (["--prompt", "x"], "exactly one model source"),
        # Counts and sizes are refused before the weights load, not after (or, for sizes, by diffusers).
        (["--pipeline", str(tiny_model_dir), "--prompt", "x", "--num_images", "0"], "images per prompt must be at least 1"),
        (["--pipeline", str(tiny_model_dir), "--prompt", "x", "--batch_size", "0"], "batch_size must be at least 1"),
        (["--pipeline", str(tiny_model_dir), "--prompt", "x", "--height", "100"], "height must be a positive multiple of 8"),
        (["--checkpoint", str(not_a_checkpoint), "--prompt", "x"], "not a pdm_lightning training checkpoint"),
        (["--pretrained_model_name_or_path", str(tiny_model_dir), "--lora", str(two_loras), "--prompt", "x"],
         r"holds several \(a\.safetensors, b\.safetensors\)"),
    ]
    script = load_predict_script()
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            script.main([*args, "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err), message
    assert not (tmp_path / "out").exists()


def live_lora_module(model_dir: Path):
    from pdm_lightning.training.lora import LoraSettings
    from pdm_lightning.training.module import DreamBoothModule

    torch.manual_seed(0)
    module = DreamBoothModule(str(model_dir), lora=LoraSettings(init_lora_weights=False))
    module.configure_model()
    return module.eval()


def test_lora_folder_and_kohya_file_give_the_live_modules_images(tmp_path: Path, tiny_model_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from pdm_lightning.generation.sampling import generate_images, inference_pipeline

    module = live_lora_module(tiny_model_dir)
    peft_state = get_peft_model_state_dict(module.unet)
    unet_lora_layers = convert_state_dict_to_diffusers(peft_state)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=unet_lora_layers)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state.items()})
    save_file({k: v.contiguous() for k, v in kohya.items()}, tmp_path / "subject_kohya.safetensors")

    live = generate_images(inference_pipeline(module), ["a photo of sks dog"], tmp_path / "live", num_images=2,
                           settings=GenerationSettings(num_inference_steps=2), seed=1)
    base = run_predict(tmp_path / "base", "--pipeline", str(tiny_model_dir), prompts=("a photo of sks dog",))
    for lora in (tmp_path / "lora", tmp_path / "subject_kohya.safetensors"):
        loaded = run_predict(tmp_path / lora.stem, "--pretrained_model_name_or_path", str(tiny_model_dir),
                             "--lora", str(lora), prompts=("a photo of sks dog",))
        assert [p.name for p in loaded] == [p.name for p in live]
        for ours, reference, plain in zip(loaded, live, base):
            assert np.abs(pixels(ours) - pixels(reference)).max() <= 1, lora.name
            assert np.abs(pixels(ours) - pixels(plain)).mean() > 1, "the LoRA changed nothing"


@pytest.mark.parametrize("lora", [False, True])
def test_train_predict_and_predict_checkpoint_agree(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, lora: bool
) -> None:
    from conftest import quickstart_args
    from pdm_lightning.callbacks.export import ExportWeights
    from pdm_lightning.cli import cli_main

    run_dir = tmp_path / "run"
    lora_args = ["--model.lora.rank", "4", "--model.learning_rate", "1e-2"] if lora else []
    fit = build_cli(run_dir, tiny_model_dir, instance_dir, "--trainer.max_steps", "2", "--samples.at_fit_end", "false",
                    "--samples.every_n_train_steps", "0", *lora_args)
    fit.trainer.callbacks = [c for c in fit.trainer.callbacks if not isinstance(c, ExportWeights)]  # not needed here
    fit.trainer.fit(fit.model, datamodule=fit.datamodule)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"

    prompts = '["a {identifier} {class_noun} in the snow", "a photo of {0}"]'
    args = quickstart_args(run_dir, tiny_model_dir, instance_dir, *lora_args, "--ckpt_path", str(checkpoint),
                           "--data.predict.prompts", prompts, "--data.predict.num_images_per_prompt", "2",
                           "--data.predict.num_inference_steps", "2", "--data.predict.batch_size", "3",
                           "--data.predict.seed", "1")
    cli_main(["predict", *args])
    predicted = sorted((run_dir / "predictions").glob("*.png"))
    # Identifier and class noun read off the prompts ("a photo of sks dog" vs "a photo of dog").
    assert [p.name for p in predicted] == [
        "00_a_sks_dog_in_the_snow_00.png", "00_a_sks_dog_in_the_snow_01.png",
        "01_a_photo_of_sks_00.png", "01_a_photo_of_sks_01.png",
    ]
    assert len(list((run_dir / "predictions" / "grids").glob("*.png"))) == 2
    with Image.open(predicted[1]) as image:
        assert image.text["prompt"] == "a sks dog in the snow" and str(checkpoint) in image.text["model"]

    standalone = run_predict(tmp_path / "ckpt", "--checkpoint", str(checkpoint), "--identifier", "sks", "--class_noun",
                             "dog", prompts=("a {identifier} {class_noun} in the snow", "a photo of {0}"))
    base = run_predict(tmp_path / "base", "--pipeline", str(tiny_model_dir),
                       prompts=("a sks dog in the snow", "a photo of sks"))
    for ours, reference, plain in zip(standalone, predicted, base):
        assert np.abs(pixels(ours) - pixels(reference)).max() <= 1
        assert np.abs(pixels(ours) - pixels(plain)).mean() > 1, "the checkpoint's weights were not used"


def test_settings_are_checked_when_made() -> None:
    from pdm_lightning.generation.settings import PredictSettings

    with pytest.raises(InputDataError, match="batch_size must be at least 1"):
        PredictSettings(batch_size=0)
    with pytest.raises(InputDataError, match="num_images_per_prompt must be at least 1"):
        PredictSettings(num_images_per_prompt=0)
    with pytest.raises(InputDataError, match="Unknown scheduler"):
        PredictSettings(scheduler="dpm")
    with pytest.raises(InputDataError, match="width must be a positive multiple of 8"):
        GenerationSettings(width=0)
    settings = PredictSettings(prompts=["x"], num_inference_steps=3, guidance_scale=2.0, scheduler="ddim", height=64)
    assert settings.generation() == GenerationSettings(3, 2.0, None, "ddim", 64, None)


def test_lora_folder_prefers_the_exported_weights_file(tmp_path: Path) -> None:
    from pdm_lightning.export.lora_diffusers import LORA_WEIGHT_NAME
    from pdm_lightning.predict_sources import lora_weights_file

    for name in ("a_other.safetensors", LORA_WEIGHT_NAME):
        (tmp_path / name).write_bytes(b"")
    assert lora_weights_file(tmp_path) == tmp_path / LORA_WEIGHT_NAME
    (tmp_path / LORA_WEIGHT_NAME).unlink()
    assert lora_weights_file(tmp_path) == tmp_path / "a_other.safetensors"  # the only one
    assert lora_weights_file(tmp_path / "a_other.safetensors") == tmp_path / "a_other.safetensors"
    (tmp_path / "a_other.safetensors").unlink()
    with pytest.raises(InputDataError, match="holds no .safetensors/.bin LoRA weights"):
        lora_weights_file(tmp_path)


def test_prediction_drops_the_training_only_teacher_and_query_hook(tiny_model_dir: Path) -> None:
    from pdm_lightning.training.module import DreamBoothModule
    from pdm_lightning.pdm.settings import PDMSettings
    from pdm_lightning.predict_sources import drop_training_parts

    module = DreamBoothModule(str(tiny_model_dir), pdm=PDMSettings(teacher="on_the_fly"))
    module.configure_model()
    layer = module.query_capture.module
    assert module.teacher_unet is not None and layer._forward_hooks
    drop_training_parts(module)
    assert module.teacher_unet is None and module.query_capture is None
    assert not layer._forward_hooks
    assert not any(name.startswith("teacher_unet.") for name, _ in module.named_parameters())
