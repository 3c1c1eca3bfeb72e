"""The sample-images callback: comparable images during fit, and a run that ends exactly as without it."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

from conftest import build_cli
from pdm_lightning.callbacks.export import ExportWeights
from pdm_lightning.callbacks.samples import SampleImages
from pdm_lightning.generation.sampling import preserved_training_state

# LoRA with dropout: training draws from the global RNG and depends on train mode, so a callback
# that consumed random numbers or left a module in eval mode would change the final weights.
LORA_FIT = ["--trainer.max_steps", "3", "--model.learning_rate", "1e-2", "--model.lora.rank", "4",
            "--model.lora.dropout", "0.3", "--model.lora.init_lora_weights", "gaussian",
            "--samples.every_n_train_steps", "0", "--samples.at_fit_end", "false"]


class TrainingState:
    """Modes, global RNG states and gradients of a module, to compare before and after a callback."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.modes = {name: sub.training for name, sub in module.named_modules()}
        self.torch_rng = torch.get_rng_state()
        self.numpy_rng = np.random.get_state()[1].copy()
        self.python_rng = random.getstate()
        self.grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    def assert_same(self, other: TrainingState) -> None:
        assert self.modes == other.modes
        assert torch.equal(self.torch_rng, other.torch_rng)
        assert np.array_equal(self.numpy_rng, other.numpy_rng)
        assert self.python_rng == other.python_rng
        assert self.grads.keys() == other.grads.keys() and self.grads  # the step's gradients are still there
        assert all(torch.equal(self.grads[k], other.grads[k]) for k in self.grads)


class RecordState(L.Callback):
    def __init__(self) -> None:
        self.states: list[TrainingState] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.states.append(TrainingState(pl_module))


def fit(run_dir: Path, model_dir: Path, instance_dir: Path, callbacks: list[L.Callback]) -> L.LightningModule:
    cli = build_cli(run_dir, model_dir, instance_dir, *LORA_FIT)
    others = [c for c in cli.trainer.callbacks if not isinstance(c, (ExportWeights, SampleImages))]
    cli.trainer.callbacks = others[:1] + callbacks + others[1:]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model


def trained_weights(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}


def test_sampling_leaves_training_exactly_as_it_was(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    plain = trained_weights(fit(tmp_path / "plain", tiny_model_dir, instance_dir, []))

    before, after = RecordState(), RecordState()
    sampler = SampleImages(prompts=["a photo of sks dog", "a sks dog on the beach"], every_n_train_steps=2,
                           num_images=2, num_inference_steps=2, batch_size=3)
    module = fit(tmp_path / "sampled", tiny_model_dir, instance_dir, [before, sampler, after])
    sampled = trained_weights(module)
    assert any("lora_" in k for k in sampled)
    mismatched = [k for k in plain if not torch.equal(plain[k], sampled[k])]
    assert not mismatched, f"{len(mismatched)} tensors differ, e.g. {mismatched[:3]}"
    # Step 2 sampled inside a batch: modes, RNGs and gradients were handed back untouched.
    assert len(before.states) == 3
    for index in range(3):
        before.states[index].assert_same(after.states[index])
    assert any(mode for mode in before.states[1].modes.values()) and not before.states[1].modes["vae"]

    samples = tmp_path / "sampled" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step_000002", "step_000003"]  # period + end of fit
    names = sorted(p.name for p in (samples / "step_000002").glob("*.png"))
    assert names == ["00_a_photo_of_sks_dog_00.png", "00_a_photo_of_sks_dog_01.png",
                     "01_a_sks_dog_on_the_beach_00.png", "01_a_sks_dog_on_the_beach_01.png"]
    early_path, late_path = samples / "step_000002" / names[0], samples / "step_000003" / names[0]
    with Image.open(early_path) as early, Image.open(late_path) as late:
        assert early.text["seed"] == late.text["seed"]  # the same noise at every step: only the weights differ
        assert np.asarray(early).tolist() != np.asarray(late).tolist()

    events = EventAccumulator(str(tmp_path / "sampled"), size_guidance={IMAGES: 0}).Reload()
    tags = events.Tags()[IMAGES]
    assert sorted(tags) == ["samples/00_a_photo_of_sks_dog", "samples/01_a_sks_dog_on_the_beach"]
    logged = events.Images("samples/00_a_photo_of_sks_dog")
    assert [e.step for e in logged] == [2, 3] and logged[0].width == 2 * logged[0].height  # 2 images per grid


def test_samples_match_the_weights_in_memory(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    """The end-of-fit samples are what the trained weights give (no reload, LoRA active)."""
    from pdm_lightning.generation.sampling import generate_images, inference_pipeline
    from pdm_lightning.generation.settings import GenerationSettings

    sampler = SampleImages(every_n_train_steps=0, num_images=1, num_inference_steps=2, seed=3)
    module = fit(tmp_path / "run", tiny_model_dir, instance_dir, [sampler])
    written = sorted((tmp_path / "run" / "samples" / "step_000003").glob("*.png"))
    # Default prompts: the instance prompt alone and in two contexts.
    assert [p.name for p in written] == ["00_a_photo_of_sks_dog_00.png", "01_a_photo_of_sks_dog_on_the_beach_00.png",
                                         "02_a_photo_of_sks_dog_in_the_snow_00.png"]
    module.eval()
    reference = generate_images(inference_pipeline(module), ["a photo of sks dog"], tmp_path / "ref", num_images=1,
                                seed=3, settings=GenerationSettings(num_inference_steps=2))
    with Image.open(written[0]) as ours, Image.open(reference[0]) as theirs:
        assert np.abs(np.asarray(ours).astype(int) - np.asarray(theirs).astype(int)).max() <= 1


def test_preserved_training_state_restores_rngs_and_each_mode() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Linear(2, 2))
    module[2].eval()  # mixed modes, like the module's frozen VAE next to its trained UNet
    modes = [m.training for m in module.modules()]
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    expected = (torch.rand(2), np.random.rand(), random.random())
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    with preserved_training_state(module):
        assert not any(m.training for m in module.modules()) and not torch.is_grad_enabled()
        torch.rand(5), np.random.rand(5), random.random()  # sampling draws from every global RNG
    assert [m.training for m in module.modules()] == modes
    assert torch.is_grad_enabled()
    after = (torch.rand(2), np.random.rand(), random.random())
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]


def test_rejects_a_negative_period() -> None:
    with pytest.raises(ValueError, match="every_n_train_steps"):
        SampleImages(every_n_train_steps=-1)


def test_bad_settings_fail_before_training_not_at_the_first_sampling() -> None:
    from types import SimpleNamespace

    from pdm_lightning.core.errors import InputDataError

    with pytest.raises(InputDataError, match="samples.num_images must be at least 1"):
        SampleImages(num_images=0)
    with pytest.raises(InputDataError, match="samples.batch_size must be at least 1"):
        SampleImages(batch_size=0)
    no_prompt = SimpleNamespace(datamodule=None)
    with pytest.raises(ValueError, match="SampleImages needs prompts"):
        SampleImages().on_fit_start(no_prompt, None)
    SampleImages(every_n_train_steps=0, at_fit_end=False).on_fit_start(no_prompt, None)  # never samples: no prompt needed
    SampleImages(prompts=["a photo of sks dog"]).on_fit_start(no_prompt, None)
