"""LoRA starts as the reference's layers do: A ~ N(0, (1/rank)^2), B = 0, scale 1 (docs/method.md)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pdm_lightning.training.lora import LoraSettings
from pdm_lightning.training.module import DreamBoothModule


def adapter_matrices(model: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
    return {name: param.detach().float() for name, param in model.named_parameters() if f"lora_{kind}." in name}


@pytest.mark.parametrize("rank", [4, 8])
def test_default_init_is_the_reference_gaussian(tiny_model_dir: Path, rank: int) -> None:
    torch.manual_seed(0)
    module = DreamBoothModule(str(tiny_model_dir), train_text_encoder=True, lora=LoraSettings(rank=rank))
    module.configure_model()
    pooled = []
    for part in (module.unet, module.text_encoder):
        down, up = adapter_matrices(part, "A"), adapter_matrices(part, "B")
        assert down and down.keys() == {name.replace("lora_B", "lora_A") for name in up}
        for name, matrix in up.items():
            assert torch.count_nonzero(matrix) == 0, f"{name} must start at zero"
        for name, matrix in down.items():
            # The sample std of n normal draws has a relative standard error of about 1/sqrt(2n):
            # each matrix within 5 of those errors, all of them pooled within 5%.
            tolerance = 5 / math.sqrt(2 * matrix.numel())
            assert matrix.std().item() == pytest.approx(1 / rank, rel=tolerance), name
            assert matrix.mean().abs().item() < 5 * (1 / rank) / math.sqrt(matrix.numel()), name
        pooled += [m.flatten() for m in down.values()]
    pooled = torch.cat(pooled)
    assert pooled.numel() > 5000
    assert pooled.std().item() == pytest.approx(1 / rank, rel=0.05)
    # No alpha scaling: alpha defaults to the rank, so every adapter's scale is 1.
    scales = {s for m in module.unet.modules() if hasattr(m, "scaling") for s in m.scaling.values()}
    assert scales == {1.0}


def test_peft_default_init_stays_selectable(tiny_model_dir: Path) -> None:
    torch.manual_seed(0)
    module = DreamBoothModule(str(tiny_model_dir), lora=LoraSettings(rank=4, init_lora_weights=True))
    module.configure_model()
    pooled = torch.cat([m.flatten() for m in adapter_matrices(module.unet, "A").values()])
    # kaiming-uniform(a=sqrt(5)) on fan_in columns: std = 1/sqrt(3 fan_in), far below the reference's 1/rank.
    assert pooled.std().item() < 0.5 * (1 / 4)
    assert all(torch.count_nonzero(m) == 0 for m in adapter_matrices(module.unet, "B").values())
