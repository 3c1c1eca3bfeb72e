"""The frozen teacher as a query function: recomputes the teacher's PDM queries on the fly from stored latents."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pdm_lightning.pdm.capture import DEFAULT_PDM_LAYER, QueryCapture, adapters_disabled

# (latents [B, 4, h, w], timesteps [B]) -> teacher queries [B, tokens, dim], both on the UNet's device
QueryFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def unet_query_fn(
    unet: torch.nn.Module, condition: torch.Tensor, layer: str = DEFAULT_PDM_LAYER, disable_adapters: bool = True
) -> QueryFunction:
    """The frozen teacher as a query function: ``unet`` conditioned on ``condition`` (the class prompt).

    ``condition`` is [1, 77, d] (expanded to the batch) or [B, 77, d]. The stored reconstruction
    latent at t is exactly what the extraction fed to the UNet at t, so ``query(latent_t, t)``
    reproduces the bank's query up to the dtype the UNet runs in. Under LoRA pass the student's
    own UNet: its adapters are switched off for the call (no second copy). Under full fine-tuning
    pass a frozen copy of the pretrained UNet. The capture hook lives only for the call; a
    student's QueryCapture on the same layer also sees this forward, so pop the student's query
    before asking for targets.
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
