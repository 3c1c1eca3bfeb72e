"""A crafted pickle runs no code through any entry point that reads a file a user can pass.

The crafted files hold an object whose unpickling calls ``exec`` to create a marker file (the
control test shows it does so under ``weights_only=False``); every entry point must refuse them with
a clear error naming the file, and the marker must never appear. Our own checkpoints, whose
hyper-parameters may hold pdm_lightning's settings records, still load with ``weights_only=True``.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO_ROOT, build_cli, quickstart_args
from pdm_lightning.cli import cli_main
from pdm_lightning.core.loading import ModelSource
from pdm_lightning.data.masks import MaskSettings
from pdm_lightning.evaluation.settings import EvaluationSettings
from pdm_lightning.generation.settings import PredictSettings
from pdm_lightning.pdm.settings import PDMSettings
from pdm_lightning.prepare.class_images import ClassImageGeneration
from pdm_lightning.training.checkpoint_io import AtomicCheckpointIO, RefusedCheckpointError, load_checkpoint_file
from pdm_lightning.training.lora import LoraSettings
from pdm_lightning.training.optim import OptimizerConfig


class RunsCode:
    """Unpickling this calls ``exec``: any code could run; this code creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "code-ran"


def crafted_checkpoint(path: Path, marker: Path, model_dir: Path | str = "base") -> Path:
    """A Lightning-shaped checkpoint (so that an unsafe loader reads it to the end) carrying the payload."""
    torch.save({
        "state_dict": {}, "global_step": 3, "epoch": 0, "pytorch-lightning_version": L.__version__,
        "hyper_parameters": {"pretrained_model_name_or_path": str(model_dir), "payload": RunsCode(marker)},
    }, path)
    return path


def load_predict_script():
    spec = importlib.util.spec_from_file_location("predict_script", REPO_ROOT / "predict.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def predict_error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """predict.py's one-line error (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        load_predict_script().main([*args, "--prompt", "a photo", "--out", "unused-out"])
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip()


def test_the_crafted_file_does_run_code_when_unpickled_unsafely(tmp_path: Path, marker: Path) -> None:
    path = crafted_checkpoint(tmp_path / "crafted.ckpt", marker)
    torch.load(path, weights_only=False)  # the control: this is what the entry points must never do
    assert marker.exists()


def test_predict_checkpoint_refuses_a_crafted_pickle(
    tmp_path: Path, tiny_model_dir: Path, marker: Path, capsys: pytest.CaptureFixture
) -> None:
    path = crafted_checkpoint(tmp_path / "crafted.ckpt", marker, tiny_model_dir)
    error = predict_error(["--checkpoint", str(path)], capsys)
    # torch names the refused global "exec" or "builtins.exec" depending on how it was pickled.
    assert re.fullmatch(
        rf"error: --checkpoint {re.escape(str(path))} was refused: it holds (builtins\.)?exec, which is neither a tensor "
        r"nor a pdm_lightning setting, so it was not written by pdm_lightning and loading it could run code\. "
        r"Use a checkpoint written by train\.py\.", error), error
    assert not marker.exists()


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_train_py_ckpt_path_refuses_a_crafted_pickle(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, marker: Path, subcommand: str
) -> None:
    path = crafted_checkpoint(tmp_path / "crafted.ckpt", marker, tiny_model_dir)
    args = quickstart_args(tmp_path / "run", tiny_model_dir, instance_dir, "--ckpt_path", str(path))
    with pytest.raises(RefusedCheckpointError, match=rf"^{re.escape(str(path))} was refused: it holds (builtins\.)?exec,"):
        cli_main([subcommand, *args])
    assert not marker.exists()


def test_lightning_resume_path_loads_weights_only_whatever_it_is_asked(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, marker: Path
) -> None:
    path = crafted_checkpoint(tmp_path / "crafted.ckpt", marker)
    # The CheckpointIO train.py's trainer resumes through (trainer.fit(ckpt_path=...) reads with it).
    checkpoint_io = build_cli(tmp_path / "run", tiny_model_dir, instance_dir).trainer.strategy.checkpoint_io
    with pytest.raises(RefusedCheckpointError):
        checkpoint_io.load_checkpoint(path, weights_only=False)
    # And Lightning's own resume, even told weights_only=False.
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path)
    with pytest.raises(RefusedCheckpointError):
        trainer.fit(BoringModel(), ckpt_path=path, weights_only=False)
    assert not marker.exists()


def test_lora_bin_refuses_a_crafted_pickle(
    tmp_path: Path, tiny_model_dir: Path, marker: Path, capsys: pytest.CaptureFixture
) -> None:
    lora = tmp_path / "pytorch_lora_weights.bin"
    torch.save({"unet.down.lora_A.weight": torch.zeros(2, 2), "x": RunsCode(marker)}, lora)
    error = predict_error(["--pretrained_model_name_or_path", str(tiny_model_dir), "--lora", str(lora)], capsys)
    assert re.match(rf"error: --lora {re.escape(str(lora))} was refused \(it holds (builtins\.)?exec, which is not a "
                    r"tensor: loading it could run code\)", error), error
    assert not marker.exists()


def test_lora_safetensors_name_on_a_pickle_is_refused(
    tmp_path: Path, tiny_model_dir: Path, marker: Path, capsys: pytest.CaptureFixture
) -> None:
    # diffusers retries a .safetensors it cannot parse as a pickle (allow_pickle): never for predict.py.
    lora = tmp_path / "subject.safetensors"
    torch.save({"x": RunsCode(marker)}, lora)
    error = predict_error(["--pretrained_model_name_or_path", str(tiny_model_dir), "--lora", str(lora)], capsys)
    assert error.startswith(f"error: --lora {lora} is not a valid .safetensors file (")
    assert not marker.exists()


def test_bank_file_that_is_a_pickle_is_refused(tmp_path: Path, instance_dir: Path, marker: Path) -> None:
    from pdm_lightning.pdm.bank import QueryBank, open_bank

    image = min(instance_dir.iterdir())
    bank = tmp_path / "features"
    bank.mkdir()
    torch.save({"queries": RunsCode(marker)}, bank / f"{image.stem}.safetensors")  # a features_dir file, crafted
    with pytest.raises(Exception):  # noqa: B017 - the point is that it is refused and runs nothing
        open_bank(bank, [image])
    with pytest.raises(Exception):  # noqa: B017
        QueryBank([bank / f"{image.stem}.safetensors"])
    assert not marker.exists()


def test_a_lora_bin_of_tensors_still_loads(tmp_path: Path, tiny_model_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    from pdm_lightning.training.module import DreamBoothModule

    torch.manual_seed(0)
    module = DreamBoothModule(str(tiny_model_dir), lora=LoraSettings(init_lora_weights=False))
    module.configure_model()
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(module.unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=layers)
    torch.save(load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), tmp_path / "lora.bin")

    outputs = {}
    for name, lora in (("folder", tmp_path / "lora"), ("bin", tmp_path / "lora.bin")):
        load_predict_script().main(["--pretrained_model_name_or_path", str(tiny_model_dir), "--lora", str(lora),
                                    "--prompt", "a photo of sks dog", "--num_images", "1", "--steps", "2",
                                    "--out", str(tmp_path / name), "--device", "cpu"])
        with Image.open(min((tmp_path / name).glob("*.png"))) as image:
            outputs[name] = np.asarray(image)
    assert np.array_equal(outputs["bin"], outputs["folder"])  # the PNGs differ only in their "model" metadata


def test_checkpoints_holding_our_settings_records_load_weights_only(tmp_path: Path) -> None:
    # A module or data module built in Python (not through train.py) keeps its settings records in
    # its hyper-parameters; they are the only classes a checkpoint may hold besides tensors.
    hparams = {
        "lora": LoraSettings(rank=8), "pdm": PDMSettings(weight=0.1), "optimizer": OptimizerConfig(lr_warmup_steps=3),
        "masks": MaskSettings(mode="soft"), "base_model": ModelSource("x", revision="main"),
        "class_generation": ClassImageGeneration(sample_batch_size=2), "predict": PredictSettings(prompts=["a"]),
        "evaluation": EvaluationSettings(max_prompts=2),
    }
    path = tmp_path / "ours.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1, "hyper_parameters": hparams}, path)
    assert load_checkpoint_file(path)["hyper_parameters"] == hparams
    assert AtomicCheckpointIO().load_checkpoint(path)["hyper_parameters"] == hparams



def settings_records(cls: type) -> set[type]:
    """The dataclasses among ``cls.__init__``'s parameter types (``X | None`` included)."""
    import dataclasses
    import typing

    found = set()
    for hint in typing.get_type_hints(cls.__init__).values():
        for candidate in (hint, *typing.get_args(hint)):
            if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
                found.add(candidate)
    return found


def test_every_settings_record_of_the_hyper_parameters_is_allowed() -> None:
    # A settings record added to the module or data module must join CHECKPOINT_SAFE_GLOBALS, or a
    # module built in Python would write checkpoints that its own resume then refuses; and nothing
    # that is not one of them may be allowed.
    from pdm_lightning.training.checkpoint_io import CHECKPOINT_SAFE_GLOBALS
    from pdm_lightning.training.datamodule import DreamBoothDataModule
    from pdm_lightning.training.module import DreamBoothModule

    records = settings_records(DreamBoothModule) | settings_records(DreamBoothDataModule)
    assert records == set(CHECKPOINT_SAFE_GLOBALS)  # exactly those: nothing else is allowed
