"""The non-finite guard: a NaN or infinite loss, gradient norm or weight stops the run (or drops the step)
and never reaches a checkpoint, a sample or an export.

Faults are simulated in process: a diverging learning rate (1e4), a NaN pixel put into one batch by a
callback (a corrupt input), an infinite gradient set by a callback before the optimizer step, and an
optimizer step post-hook that fills a weight with NaN (an update that overflows).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, build_cli, quickstart_args
from pdm_lightning.callbacks.samples import require_finite_weights
from pdm_lightning.training.nonfinite import (
    NonFiniteGuard,
    NonFiniteSettings,
    NonFiniteTrainingError,
    all_finite,
    describe_terms,
    first_nonfinite,
    nonfinite_terms,
)

TESTS_DIR = Path(__file__).resolve().parent
EVERY_STEP = ["--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "-1",
              "--export.every_n_train_steps", "1", "--samples.every_n_train_steps", "1", "--samples.num_images", "1"]


def tensors_in(value: object) -> list[torch.Tensor]:
    """Every tensor inside a (nested) checkpoint object."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors_in(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_in(item)]
    return []


def files_with_nonfinite_tensors(folder: Path) -> tuple[list[str], int]:
    """The weight files under ``folder`` holding a NaN or inf tensor, and how many weight files were read."""
    bad, read = [], 0
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".ckpt":
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # this test's own files
            # Every tensor but the callbacks' state, where ModelCheckpoint keeps a +-inf "no score yet" sentinel.
            tensors = tensors_in({key: value for key, value in checkpoint.items() if key != "callbacks"})
        elif path.suffix == ".safetensors":
            tensors = list(load_file(path).values())
        else:
            continue
        read += 1
        if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
            bad.append(str(path.relative_to(folder)))
    return bad, read


def trained_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


class NanPixelAt(L.Callback):
    """A corrupt input: puts a NaN into the first instance photo of the batches of the given steps."""

    def __init__(self, steps: set[int] | None) -> None:
        self.steps = steps  # None: every step from 1 on

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:  # noqa: ANN001
        step = trainer.global_step
        if (self.steps is None and step >= 1) or (self.steps is not None and step in self.steps):
            batch.pixel_values[0, 0, 0, 0] = float("nan")


class InfiniteGradientAt(L.Callback):
    """Gradients that overflowed while the loss stayed finite (callbacks run before the module's hook)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")


class NanUpdateAt(L.Callback):
    """An optimizer step that turns a weight into NaN although the loss and gradients were finite."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            weight = next(p for p in pl_module.parameters() if p.requires_grad)
            optimizer.register_step_post_hook(lambda *_: weight.data.view(-1).__setitem__(0, float("nan")))


def fit_with(run: Path, model_dir: Path, instance_dir: Path, callback: L.Callback | None, *overrides: str):  # noqa: ANN201
    # Per-step encoding, so that the callbacks can poison the pixels the step encodes.
    cli = build_cli(run, model_dir, instance_dir, "--model.learning_rate", "1e-3", "--model.cache_latents", "false", *overrides)
    if callback is not None:
        cli.trainer.callbacks.append(callback)
    return cli


def test_diverging_run_stops_at_the_first_nan_step_exits_nonzero_and_saves_no_nan(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path
) -> None:
    """Fault 2: lr 1e4 went NaN from step 1, trained on and saved NaN checkpoints, samples and exports."""
    run = tmp_path / "run"
    args = quickstart_args(run, tiny_model_dir, instance_dir, "--trainer.max_steps", "4",
                           "--model.learning_rate", "1e4", *EVERY_STEP)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)])}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "fit", *args],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    # One line for the user, not a traceback.
    assert "error: train/loss is nan" in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "at step 1:" in result.stderr and "lower --model.learning_rate (now 10000)" in result.stderr
    assert f"({run / 'checkpoints' / 'last.ckpt'}, step 1) holds the last finite weights" in result.stderr

    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 1
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == ["last.ckpt", "step=000001.ckpt"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000001"]  # no train-end sampling
    assert not (run / "export").exists()  # no final export
    assert sorted(p.name for p in (run / "export_steps").iterdir()) == ["step_000001"]
    bad, read = files_with_nonfinite_tensors(run)
    assert read == 6 and not bad  # 2 checkpoints; the step-1 pipeline's unet, vae and text encoder; its single file


def test_a_nan_input_names_the_term_and_stops_before_any_update(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    # With prior preservation: the instance term is NaN, the prior term is not and is not named.
    cli = fit_with(tmp_path / "run", tiny_model_dir, instance_dir, NanPixelAt({0}), "--trainer.max_steps", "3",
                   "--data.with_prior_preservation", "true", "--data.num_class_images", "2",
                   "--data.class_generation.num_inference_steps", "2", *EVERY_STEP)
    before = {k: v.detach().clone() for k, v in cli.model.named_parameters()} if cli.model.unet else None
    with pytest.raises(NonFiniteTrainingError) as raised:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    message = str(raised.value)
    assert message.startswith("train/loss is nan, train/loss_instance is nan at step 0:")
    assert "loss_prior" not in message
    assert "no update has been made yet" in message and "No checkpoint was written before this step." in message
    assert cli.trainer.global_step == 0
    assert before is None  # weights are loaded in configure_model, after this point
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))
    assert not (tmp_path / "run" / "export").exists() and not (tmp_path / "run" / "samples").exists()


def test_a_resumed_run_names_the_checkpoint_it_resumed_from(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    run = tmp_path / "run"
    first = fit_with(run, tiny_model_dir, instance_dir, None, "--trainer.max_steps", "2")
    first.trainer.fit(first.model, datamodule=first.datamodule)
    resumed = fit_with(run, tiny_model_dir, instance_dir, NanPixelAt({2}), "--trainer.max_steps", "4")
    with pytest.raises(NonFiniteTrainingError, match=r"at step 2: .*\(.*last\.ckpt, step 2\) holds the last finite weights"):
        resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path="last")


def test_skip_drops_that_optimizer_step_and_training_goes_on(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    run = tmp_path / "run"
    cli = fit_with(run, tiny_model_dir, instance_dir, NanPixelAt({2}), "--trainer.max_steps", "4",
                   "--model.nonfinite.action", "skip", "--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "-1")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 4
    assert cli.model.nonfinite_guard.skipped_steps == 1 and cli.model.nonfinite_guard.consecutive_skips == 0
    ckpt = {step: torch.load(run / "checkpoints" / f"step={step:06d}.ckpt", weights_only=False) for step in (2, 3, 4)}
    # Step 2 (the NaN batch) changed nothing: weights and the optimizer's state are those after step 2...
    # the checkpoint named step 3 is written after the dropped update.
    same = [k for k in ckpt[2]["state_dict"] if torch.equal(ckpt[2]["state_dict"][k], ckpt[3]["state_dict"][k])]
    assert len(same) == len(ckpt[2]["state_dict"])
    adam_steps = {int(state["step"]) for state in ckpt[3]["optimizer_states"][0]["state"].values()}
    assert adam_steps == {2}
    assert any(not torch.equal(ckpt[3]["state_dict"][k], ckpt[4]["state_dict"][k]) for k in same)  # training went on
    bad, read = files_with_nonfinite_tensors(run)
    assert read > 4 and not bad
    assert (run / "export" / "manifest.json").is_file()


def test_skip_stops_after_max_consecutive_skips(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    run = tmp_path / "run"
    cli = fit_with(run, tiny_model_dir, instance_dir, NanPixelAt(None), "--trainer.max_steps", "6",
                   "--model.nonfinite.action", "skip", "--model.nonfinite.max_consecutive_skips", "2",
                   "--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "-1",
                   "--samples.at_fit_end", "true")
    with pytest.raises(NonFiniteTrainingError, match=r"2 optimizer steps in a row were already dropped.* at step 3:"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 3 and cli.model.nonfinite_guard.skipped_steps == 2
    last = trained_state(run / "checkpoints" / "last.ckpt")
    after_step_1 = trained_state(run / "checkpoints" / "step=000001.ckpt")
    assert all(torch.equal(last[k], after_step_1[k]) for k in last)  # the dropped steps changed nothing
    assert not (run / "export").exists() and not (run / "samples").exists()


def test_an_infinite_gradient_norm_stops_before_the_update(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    run = tmp_path / "run"
    cli = fit_with(run, tiny_model_dir, instance_dir, InfiniteGradientAt(1), "--trainer.max_steps", "3",
                   "--checkpoint.every_n_train_steps", "1", "--trainer.gradient_clip_val", "null")
    with pytest.raises(NonFiniteTrainingError, match=r"^the gradient norm is inf at step 1: .*\(.*last\.ckpt, step 1\)"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    live = {k: v for k, v in cli.model.named_parameters() if v.requires_grad}
    saved = trained_state(run / "checkpoints" / "last.ckpt")
    assert all(torch.equal(live[k], saved[k]) for k in saved)  # the update of step 1 never happened


def test_weights_made_nonfinite_by_a_step_are_never_checkpointed(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    run = tmp_path / "run"
    cli = fit_with(run, tiny_model_dir, instance_dir, NanUpdateAt(1), "--trainer.max_steps", "3",
                   "--checkpoint.every_n_train_steps", "1", "--export.every_n_train_steps", "1")
    cli.trainer.checkpoint_callback.save_on_exception = True  # would save the weights in memory on the way out
    with pytest.raises(NonFiniteTrainingError, match="made weights NaN or infinite"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert not all_finite(p for p in cli.model.parameters())  # the simulated fault happened
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 1
    bad, read = files_with_nonfinite_tensors(run)
    assert read > 2 and not bad


class CountCalls:
    """Wraps a function and counts its calls."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function, self.calls = function, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.function(*args, **kwargs)


def test_clipping_reuses_the_guards_gradient_norm_with_the_same_result(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clipping by norm takes the norm the guard computed (one pass over the gradients, not two) and updates the
    weights bit for bit as Lightning's own clipping (``clip_grad_norm_``) does."""
    from pdm_lightning.training.module import DreamBoothModule

    clip_grad_norm = CountCalls(torch.nn.utils.clip_grad_norm_)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_grad_norm)
    trained = []
    for lightning_clipping in (False, True):
        if lightning_clipping:
            monkeypatch.setattr(DreamBoothModule, "configure_gradient_clipping", L.LightningModule.configure_gradient_clipping)
        # A clip value far below the norm: every step is clipped.
        cli = fit_with(tmp_path / f"run{int(lightning_clipping)}", tiny_model_dir, instance_dir, None, "--trainer.max_steps", "2",
                       "--trainer.gradient_clip_val", "1e-4", "--checkpoint.save_last", "false")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        assert clip_grad_norm.calls == (2 if lightning_clipping else 0)
        trained.append({k: v.detach().clone() for k, v in cli.model.named_parameters() if v.requires_grad})
    ours, lightnings = trained
    assert ours.keys() == lightnings.keys()
    assert all(torch.equal(ours[k], lightnings[k]) for k in ours)


def test_bf16_mixed_with_fused_adamw_clips_gradients(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    """The GPU recipes' combination (bf16-mixed, fused AdamW, gradient_clip_val 1.0): Lightning's own clipping refuses
    fused optimizers under any mixed precision (they unscale a GradScaler's gradients themselves; bf16 has no scaler)."""
    cli = fit_with(tmp_path / "run", tiny_model_dir, instance_dir, None, "--trainer.max_steps", "1",
                   "--trainer.precision", "bf16-mixed", "--model.optimizer.fused", "true",
                   "--trainer.gradient_clip_val", "1e-4", "--checkpoint.save_last", "false")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1


def test_samples_refuse_nonfinite_weights() -> None:
    module = torch.nn.Linear(2, 2)
    require_finite_weights(module, 3)
    with torch.no_grad():
        module.bias[1] = float("inf")
    with pytest.raises(NonFiniteTrainingError, match=r"step 3: .* first bias \(0 nan, 1 inf of 2 values\)"):
        require_finite_weights(module, 3)


def test_the_pure_checks() -> None:
    terms = {"train/loss": torch.tensor(float("nan")), "train/loss_instance": torch.tensor(0.5),
             "train/loss_prior": None, "train/loss_pdm": torch.tensor(float("-inf"))}
    bad = nonfinite_terms(terms)
    assert list(bad) == ["train/loss", "train/loss_pdm"]
    assert describe_terms(bad) == "train/loss is nan, train/loss_pdm is -inf"
    assert nonfinite_terms({"train/loss": torch.tensor(1.0), "train/loss_prior": None}) == {}
    assert all_finite([torch.full((3,), 3e38), torch.zeros(2, dtype=torch.int64)])  # huge but finite: no overflow
    assert not all_finite([torch.ones(3), torch.tensor([1.0, math.nan])])
    assert first_nonfinite([("a", torch.ones(2)), ("b", torch.tensor([math.nan, math.inf, 1.0]))]) == "b (1 nan, 1 inf of 3 values)"

    guard = NonFiniteGuard(NonFiniteSettings("skip", max_consecutive_skips=2))
    decisions = []
    for findings in ([], ["x"], ["x"], [], ["x"], ["x"], ["x"]):
        for finding in findings:
            guard.flag(finding)
        decisions.append(guard.decide())
    assert decisions == ["ok", "skip", "skip", "ok", "skip", "skip", "stop"]
    assert guard.skipped_steps == 4
    stop = NonFiniteGuard(NonFiniteSettings())
    stop.flag("train/loss is nan")
    assert stop.decide() == "stop"
    with pytest.raises(ValueError, match="max_consecutive_skips must be at least 1"):
        NonFiniteSettings("skip", 0)
    with pytest.raises(ValueError, match="'stop' or 'skip'"):
        NonFiniteSettings("ignore")
