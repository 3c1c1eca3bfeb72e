"""Speed options: torch.compile of the UNet (blocks or whole), channels-last memory format, fused AdamW."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from diffusers import UNet2DConditionModel

from conftest import build_cli
from pdm_lightning.pdm.capture import DEFAULT_PDM_LAYER, QueryCapture
from pdm_lightning.training import optim
from pdm_lightning.training.compilation import compile_unet, transformer_blocks
from pdm_lightning.training.optim import OptimizerConfig, build_optimizer, fused_adamw_devices, use_fused_adamw

PDM = ("--model.pdm", "{}", "--model.pdm.inversion_steps", "4", "--samples.at_fit_end", "false")


@pytest.fixture
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PDM_LIGHTNING_CACHE", str(tmp_path / "bank-cache"))
    return tmp_path


def compiled_blocks(unet: torch.nn.Module) -> list[str]:
    return [name for name, block in transformer_blocks(unet) if block._compiled_call_impl is not None]


def checkpoint_keys(run: Path) -> set[str]:
    return set(torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"])


def test_compiled_blocks_train_with_lora_and_the_pdm_hook(cache_env: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    """Regional compilation with inductor (the real path; about a minute on a busy 2-core CPU, most of it
    inductor's C++ code generation): the PDM hook sees the student's queries, the LoRA adapters train,
    and checkpoints keep their keys."""
    run = cache_env / "run"
    cli = build_cli(run, tiny_model_dir, instance_dir, *PDM, "--model.lora.rank", "4", "--model.compile", "true",
                    "--trainer.max_steps", "1")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    module = cli.model
    # A missing query would have raised in the step ("No forward pass went through ..."); the loss is real.
    assert 0.0 < float(cli.trainer.callback_metrics["train/loss_pdm"]) < float("inf")
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    pdm_block = module.query_capture.layer.rsplit(".attn1.", 1)[0]
    compiled = compiled_blocks(module.unet)
    assert len(compiled) == len(transformer_blocks(module.unet)) - 1 and pdm_block not in compiled
    keys = checkpoint_keys(run)
    assert keys == module.trainable_state_keys() and all("lora_" in key and "_orig_mod" not in key for key in keys)


@pytest.mark.parametrize("scope", ["blocks", "unet"])
def test_hooks_on_the_pdm_layer_fire_in_a_compiled_unet(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, scope: str) -> None:
    """The student's hook (taken before compiling) and a teacher's hook taken afterwards (the on-the-fly
    teacher hooks the layer for each call) both see the layer's output. Dynamo with the eager backend: the
    same tracing and guards as inductor, without its code generation. (With the PDM block compiled, the
    blocks scope misses even the student's hook: see training/compilation.py.)"""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compile_module(self, *a, **{**k, "backend": "eager"}))
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    keys = set(unet.state_dict())
    student = QueryCapture(unet, DEFAULT_PDM_LAYER)
    compile_unet(unet, scope, [DEFAULT_PDM_LAYER])
    assert set(unet.state_dict()) == keys
    inputs = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    expected = {}
    unet.get_submodule(DEFAULT_PDM_LAYER).register_forward_hook(lambda _m, _a, out: expected.__setitem__("q", out))
    for _ in range(2):  # the second round runs the code compiled in the first, with a new teacher hook
        unet(*inputs)
        assert torch.equal(student.pop(), expected["q"]) and expected["q"].requires_grad
        with torch.no_grad(), QueryCapture(unet, DEFAULT_PDM_LAYER) as teacher:
            unet(*inputs)
            assert torch.equal(teacher.pop(), expected["q"])


def test_channels_last_trains_checkpoints_and_exports(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    run = tmp_path / "run"
    cli = build_cli(run, tiny_model_dir, instance_dir, "--model.channels_last", "true", "--trainer.max_steps", "2")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    module = cli.model
    for conv in (module.unet.conv_in, module.vae.encoder.conv_in):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert checkpoint_keys(run) == module.trainable_state_keys()
    assert (run / "export" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def _fake_parameters(device_type: str) -> list[types.SimpleNamespace]:
    return [types.SimpleNamespace(device=torch.device(device_type), is_floating_point=lambda: True)]


def test_fused_adamw_is_automatic_where_torch_has_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = [torch.nn.Parameter(torch.zeros(2))]
    assert use_fused_adamw(_fake_parameters("cuda"), None)
    assert use_fused_adamw(cpu, None) is ("cpu" in fused_adamw_devices())
    assert build_optimizer(cpu, 1e-3, OptimizerConfig()).defaults["fused"] is ("cpu" in fused_adamw_devices())
    assert not use_fused_adamw(_fake_parameters("cuda"), False) and use_fused_adamw(cpu, True)
    assert not use_fused_adamw([], None)
    assert not use_fused_adamw([torch.zeros(2, dtype=torch.long)], None)
    monkeypatch.setattr(optim, "fused_adamw_devices", lambda: ("cuda",))  # a torch before 2.4: CUDA only
    assert not use_fused_adamw(cpu, None) and not build_optimizer(cpu, 1e-3, OptimizerConfig()).defaults["fused"]


def test_fused_adamw_is_not_chosen_when_clipping_under_a_grad_scaler() -> None:
    assert not use_fused_adamw(_fake_parameters("cuda"), None, clipped_with_grad_scaler=True)
    assert not use_fused_adamw(_fake_parameters("cuda"), False, clipped_with_grad_scaler=True)
    with pytest.raises(ValueError, match="16-mixed"):
        use_fused_adamw(_fake_parameters("cuda"), True, clipped_with_grad_scaler=True)


def test_fused_adamw_matches_the_unfused_implementation_on_cpu() -> None:
    """The fused CPU kernel takes the same steps as torch's default (for-loop) AdamW, up to float rounding."""
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7)]
    results = []
    for fused in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = build_optimizer(params, 1e-2, OptimizerConfig(fused=fused))
        assert bool(optimizer.defaults["fused"]) is fused
        for step in range(3):
            for index, param in enumerate(params):
                param.grad = torch.sin(torch.arange(param.numel(), dtype=torch.float32) + step + index).view_as(param)
            optimizer.step()
        results.append(params)
    for default, fused in zip(*results):
        torch.testing.assert_close(fused, default, rtol=1e-6, atol=1e-7)
