"""Where training gets the teacher's queries: read from the bank, or recomputed on the fly from stored latents."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from pdm_lightning.pdm.bank import QueryBank
from pdm_lightning.pdm.capture import DEFAULT_PDM_LAYER, QueryCapture, adapters_disabled

# (latents [B, 4, h, w], timesteps [B]) -> teacher queries [B, tokens, dim], both on the UNet's device
QueryFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Teacher(Protocol):
    timesteps: torch.Tensor

    def targets(
        self, image_indices: torch.Tensor, timesteps: torch.Tensor, device: torch.device | str, dtype: torch.dtype
    ) -> torch.Tensor: ...


class BankTeacher:
    """Targets read from the memory-mapped bank: only the B rows of this step move to ``device``."""

    def __init__(self, bank: QueryBank) -> None:
        if not bank.has_queries:
            raise ValueError("This bank stores latents only (mode 'latents'): use OnTheFlyTeacher with it.")
        self.bank = bank
        self.timesteps = bank.timesteps

    def targets(
        self, image_indices: torch.Tensor, timesteps: torch.Tensor, device: torch.device | str, dtype: torch.dtype
    ) -> torch.Tensor:
        """Teacher queries [B, tokens, dim] of instance images ``image_indices`` at ``timesteps``."""
        return self.bank.queries(image_indices, timesteps).to(device=device, dtype=dtype, non_blocking=True)


class OnTheFlyTeacher:
    """Targets recomputed by the frozen UNet from the reconstruction latents the bank stored.

    The stored latent at t is exactly what the extraction fed to the UNet at t, so
    ``query_fn(latent_t, t)`` reproduces the bank's query (to floating-point tolerance, and exactly
    up to the dtype the UNet runs in). Costs one extra no-grad UNet forward over the PDM chunk per step;
    disk and memory hold 4 x h x w floats per timestep instead of tokens x dim.
    """

    def __init__(self, bank: QueryBank, query_fn: QueryFunction) -> None:
        if not bank.has_latents:
            raise ValueError("This bank stores no latents: build it with mode 'latents' (or 'both') for on-the-fly targets.")
        self.bank = bank
        self.query_fn = query_fn
        self.timesteps = bank.timesteps

    def targets(
        self, image_indices: torch.Tensor, timesteps: torch.Tensor, device: torch.device | str, dtype: torch.dtype
    ) -> torch.Tensor:
        latents = self.bank.latents(image_indices, timesteps).to(device=device, non_blocking=True)
        with torch.no_grad():
            queries = self.query_fn(latents, torch.as_tensor(timesteps, device=device).long().reshape(-1))
        return queries.to(dtype=dtype)


def unet_query_fn(
    unet: torch.nn.Module, condition: torch.Tensor, layer: str = DEFAULT_PDM_LAYER, disable_adapters: bool = True
) -> QueryFunction:
    """The frozen teacher as a query function: ``unet`` conditioned on ``condition`` [1, 77, d] (the class prompt).

    Under LoRA pass the student's own UNet: its adapters are switched off for the call (no second
    copy). Under full fine-tuning pass a frozen copy (``load_frozen_unet``). The capture hook lives
    only for the call; a student's QueryCapture on the same layer also sees this forward, so pop
    the student's query before asking for targets.
    """

    def query(latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        dtype = next(unet.parameters()).dtype
        context = condition.to(device=latents.device, dtype=dtype).expand(len(latents), -1, -1)
        with torch.no_grad(), QueryCapture(unet, layer) as capture:
            if disable_adapters:
                with adapters_disabled(unet):
                    unet(latents.to(dtype), timesteps, context)
            else:
                unet(latents.to(dtype), timesteps, context)
            return capture.pop()

    return query


def load_frozen_unet(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
) -> torch.nn.Module:
    """The pretrained UNet, frozen, in ``dtype`` on ``device``: the teacher under full fine-tuning.

    Loaded from the base model rather than copied from the live UNet, so it is the pretrained
    teacher even when training resumed from a checkpoint.
    """
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(
        pretrained_model_name_or_path, subfolder="unet", revision=revision, variant=variant
    )
    return unet.requires_grad_(False).eval().to(device=device, dtype=dtype)

