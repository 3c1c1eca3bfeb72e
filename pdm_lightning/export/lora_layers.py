"""The trained LoRA adapters of a model, read as plain tensors (one entry per adapted layer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer

from pdm_lightning.training.lora import ADAPTER_NAME


@dataclass(frozen=True)
class LoraWeights:
    """One adapted linear layer: the update is ``scaling * up @ down``, scaling = alpha / rank."""

    down: torch.Tensor  # lora_A, shape (rank, in_features)
    up: torch.Tensor  # lora_B, shape (out_features, rank)
    alpha: float
    scaling: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """The change this adapter makes to the layer's weight."""
        return self.scaling * (self.up.float() @ self.down.float())


def lora_layers(model: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> dict[str, LoraWeights]:
    """Module path -> adapter weights, for every layer of ``model`` that carries ``adapter_name``."""
    layers = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            layers[path] = LoraWeights(
                down=module.lora_A[adapter_name].weight.detach(),
                up=module.lora_B[adapter_name].weight.detach(),
                alpha=float(module.lora_alpha[adapter_name]),
                scaling=float(module.scaling[adapter_name]),
            )
    return layers


def has_lora(model: torch.nn.Module | None, adapter_name: str = ADAPTER_NAME) -> bool:
    return model is not None and any(
        isinstance(module, LoraLayer) and adapter_name in module.lora_A for module in model.modules()
    )
