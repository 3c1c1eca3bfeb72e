"""Training steps through the real CLI: what changes, what stays frozen, what is logged and checkpointed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from conftest import build_cli


def changed(module: torch.nn.Module, reference: torch.nn.Module) -> bool:
    reference_state = reference.state_dict()
    return any(not torch.equal(value.float(), reference_state[key].float()) for key, value in module.state_dict().items())


def fit(cli) -> None:
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_one_step_changes_unet_and_text_encoder_only_when_asked(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, train_text_encoder: bool
) -> None:
    cli = build_cli(
        tmp_path / "run", tiny_model_dir, instance_dir,
        "--trainer.max_steps", "1", "--model.learning_rate", "1e-3",
        "--model.train_text_encoder", str(train_text_encoder).lower(),
    )
    fit(cli)
    module = cli.model
    assert changed(module.unet, UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"))
    assert changed(module.text_encoder, CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder")) is train_text_encoder
    assert not changed(module.vae, AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae"))
    assert not module.vae.training and module.unet.training


def test_checkpoint_holds_only_trainable_weights(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    cli = build_cli(tmp_path / "run", tiny_model_dir, instance_dir, "--trainer.max_steps", "2", "--checkpoint.every_n_train_steps", "1")
    fit(cli)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step=000001.ckpt", "step=000002.ckpt"]
    state = torch.load(checkpoints / "last.ckpt", weights_only=False)
    keys = set(state["state_dict"])
    # The quickstart trains the text encoder: UNet and text encoder weights, never the VAE.
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    assert not any(k.startswith("vae.") for k in keys)
    assert keys == {name for name, p in cli.model.named_parameters() if p.requires_grad}
    assert state["global_step"] == 2


def test_keeps_only_the_newest_step_checkpoints(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    cli = build_cli(
        tmp_path / "run", tiny_model_dir, instance_dir,
        "--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "2",
    )
    fit(cli)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step=000003.ckpt", "step=000004.ckpt"]


def test_v_prediction_model_trains(tmp_path: Path, tiny_v_model_dir: Path, instance_dir: Path) -> None:
    cli = build_cli(tmp_path / "run", tiny_v_model_dir, instance_dir, "--trainer.max_steps", "2", "--model.snr_gamma", "5.0", "--model.offset_noise", "0.1")
    fit(cli)
    assert cli.model.prediction_type == "v_prediction"
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_resume_with_other_settings_is_refused(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    first = build_cli(tmp_path / "run", tiny_model_dir, instance_dir, "--trainer.max_steps", "1", "--model.train_text_encoder", "false")
    fit(first)
    second = build_cli(tmp_path / "run", tiny_model_dir, instance_dir, "--trainer.max_steps", "2", "--model.train_text_encoder", "true")
    with pytest.raises(RuntimeError, match="train_text_encoder"):
        second.trainer.fit(second.model, datamodule=second.datamodule, ckpt_path="last")


def test_xformers_missing_gives_a_clear_error(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    pytest.importorskip("torch")
    import importlib.util

    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed here")
    cli = build_cli(tmp_path / "run", tiny_model_dir, instance_dir, "--trainer.max_steps", "1", "--model.attention_backend", "xformers")
    with pytest.raises(ImportError, match=r"pip install -e \.\[xformers\]"):
        fit(cli)


def test_bf16_mixed_keeps_frozen_parts_in_bf16_and_exports_float32(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path
) -> None:
    """The GPU recipe's precision on CPU: frozen VAE / text encoder stored in bf16, trained UNet in fp32."""
    cli = build_cli(
        tmp_path / "run", tiny_model_dir, instance_dir,
        "--trainer.max_steps", "1", "--trainer.precision", "bf16-mixed", "--model.train_text_encoder", "false",
    )
    fit(cli)
    module = cli.model
    assert module.vae.dtype == torch.bfloat16 and module.text_encoder.dtype == torch.bfloat16
    assert module.unet.dtype == torch.float32
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "run" / "export" / "pipeline", subfolder="unet")
    assert exported.dtype == torch.float32
    vae = AutoencoderKL.from_pretrained(tmp_path / "run" / "export" / "pipeline", subfolder="vae")
    assert not changed(vae, AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae"))  # full-precision VAE


def test_last_checkpoint_holds_the_final_step_between_save_steps(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path
) -> None:
    cli = build_cli(tmp_path / "run", tiny_model_dir, instance_dir, "--trainer.max_steps", "5", "--checkpoint.every_n_train_steps", "2")
    fit(cli)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step=000002.ckpt", "step=000004.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 5


def test_lora_checkpoint_holds_only_the_adapters(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    """A rank-4 LoRA checkpoint holds adapter weights only: a small fraction of a full fine-tune's."""
    sizes = {}
    for name, extra in (("full", []), ("lora", ["--model.lora.rank", "4"])):
        cli = build_cli(tmp_path / name, tiny_model_dir, instance_dir, "--trainer.max_steps", "1",
                        "--samples.at_fit_end", "false", *extra)
        fit(cli)
        checkpoint = tmp_path / name / "checkpoints" / "last.ckpt"
        sizes[name] = checkpoint.stat().st_size
        state = torch.load(checkpoint, weights_only=False)["state_dict"]
        if name == "lora":
            assert state and all("lora_" in key for key in state)
            assert len(state) == len(cli.model.trainable_state_keys())
    assert sizes["lora"] < sizes["full"] / 10
