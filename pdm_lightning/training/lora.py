"""LoRA adapters (peft) on the UNet and, optionally, the text encoder: a setting of the one module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from diffusers import ModelMixin
from peft import LoraConfig, inject_adapter_in_model

ADAPTER_NAME = "default"


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (the PDMBooth / diffusers DreamBooth-LoRA anchor: rank 4, lr 1e-4).

    Args:
        rank: adapter rank r.
        alpha: scale numerator (the update is scaled by alpha / rank); None means alpha = rank (scale 1).
        dropout: dropout on the adapter's input.
        init_lora_weights: peft's initialisation of the adapters. "gaussian" (default) is the reference's:
            down matrix A ~ N(0, (1/rank)^2), up matrix B = 0, so training starts at the base model and
            lr 1e-4 means what it means in the reference (docs/method.md). True is peft's default
            (kaiming-uniform A, B = 0; about an order of magnitude smaller updates at the same lr);
            "orthogonal" is peft's orthogonal init (even ranks; B A = 0 at the start). peft's inits that
            rewrite the base weights (pissa, olora) are not offered: the exports assume an untouched base.
            False draws B at random too (the adapters then change the model from step 0: for tests only).
        unet_target_modules: UNet linear layers that get adapters.
        text_encoder_target_modules: CLIP text encoder layers that get adapters (with train_text_encoder).
    """

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    init_lora_weights: bool | Literal["gaussian", "orthogonal"] = "gaussian"
    unet_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])

    def peft_config(self, target_modules: list[str]) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            lora_dropout=self.dropout,
            init_lora_weights=self.init_lora_weights,
            target_modules=list(target_modules),
        )


def add_lora_adapters(model: torch.nn.Module, settings: LoraSettings, target_modules: list[str]) -> None:
    """Injects a trainable adapter named ``default``; every base weight of ``model`` is frozen.

    The model keeps its own class, so its adapters save and load in the layouts diffusers' LoRA
    loaders expect. diffusers models get ``add_adapter`` (which also gives ``disable_adapters``);
    the text encoder gets peft's injection directly, because transformers' ``add_adapter`` demands
    a newer peft than the one released.
    """
    config = settings.peft_config(target_modules)
    if isinstance(model, ModelMixin):
        model.add_adapter(config, adapter_name=ADAPTER_NAME)
    else:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():
        is_adapter = "lora_" in name
        param.requires_grad_(is_adapter)
        # Adapters train in float32 even when the base is stored in half precision.
        if is_adapter and param.dtype != torch.float32:
            param.data = param.data.float()
