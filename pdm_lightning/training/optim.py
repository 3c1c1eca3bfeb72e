"""Optimizer and learning-rate schedule construction."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.optimization import get_scheduler



@dataclass
class OptimizerConfig:
    """AdamW settings (the anchors' defaults: betas 0.9/0.999, weight decay 1e-2, eps 1e-8).

    Args:
        name: ``adamw`` (torch) or ``adamw8bit`` (bitsandbytes, saves optimizer memory on GPU).
        adam_beta1: first-moment decay.
        adam_beta2: second-moment decay.
        adam_weight_decay: decoupled weight decay.
        adam_epsilon: denominator epsilon.
        lr_scheduler: one of constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial.
        lr_warmup_steps: linear warm-up steps (optimizer steps).
        lr_num_cycles: hard restarts for cosine_with_restarts.
        lr_power: power of the polynomial schedule.
        fused: torch's fused AdamW kernel (one kernel for all parameters instead of a dozen small operations per
            tensor; equal to the default implementation up to float rounding): None (default) uses it wherever
            torch has it (CUDA; the CPU since torch 2.4), except with gradient clipping under 16-mixed (Lightning
            refuses that pair); true or false forces it. Ignored by ``adamw8bit``.
    """

    name: Literal["adamw", "adamw8bit"] = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    fused: bool | None = None


def fused_adamw_devices() -> tuple[str, ...]:
    """Device types with torch's fused AdamW kernel: CUDA, and the CPU since torch 2.4."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without the helper has the CUDA kernel only
        return ("cuda",)
    return tuple(_get_fused_kernels_supported_devices())


def use_fused_adamw(
    parameters: Sequence[torch.nn.Parameter], fused: bool | None, clipped_with_grad_scaler: bool = False
) -> bool:
    """``fused`` when set; otherwise (auto) whether every parameter is a floating-point tensor on a device with the
    fused kernel, unless the gradients are clipped under a GradScaler (16-mixed): a fused AdamW unscales them inside
    its own step, after clipping would have read them still scaled, so Lightning refuses that pair."""
    if fused is not None:
        if fused and clipped_with_grad_scaler:
            raise ValueError(
                "--model.optimizer.fused true cannot be combined with gradient clipping under --trainer.precision "
                "16-mixed (the fused kernel unscales the gradients after clipping has read them): set "
                "--model.optimizer.fused null (auto), use bf16-mixed, or --trainer.gradient_clip_val null."
            )
        return fused
    if clipped_with_grad_scaler or not parameters:
        return False
    devices = fused_adamw_devices()
    return all(p.is_floating_point() and p.device.type in devices for p in parameters)


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter],
    learning_rate: float,
    config: OptimizerConfig,
    clipped_with_grad_scaler: bool = False,
) -> torch.optim.Optimizer:
    parameters = list(parameters)
    kwargs = dict(
        lr=learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    if config.name == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError(
                "optimizer name 'adamw8bit' needs bitsandbytes: `pip install -e .[bnb]` (CUDA only), "
                "or use --model.optimizer.name adamw."
            )
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, **kwargs)
    return torch.optim.AdamW(parameters, fused=use_fused_adamw(parameters, config.fused, clipped_with_grad_scaler) or None, **kwargs)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimizerConfig, num_training_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=num_training_steps,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )
