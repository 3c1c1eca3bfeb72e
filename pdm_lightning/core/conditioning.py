"""What the UNet is conditioned on: prompts encoded for SD (one text encoder) and SDXL (two), and SDXL's size ids.

SD 1.x/2.x: the prompt's tokens through the one CLIP text encoder; the UNet attends to its last
hidden state. SDXL (diffusers' ``StableDiffusionXLPipeline.encode_prompt`` and its DreamBooth LoRA
script): the prompt through both text encoders, the two PENULTIMATE hidden states concatenated along
the features (768 + 1280 = 2048 for SDXL base), plus the second encoder's pooled, projected embedding
and six numbers: the image's original size, the top-left corner of the crop taken from it, and the
target size (``add_time_ids``), which the UNet embeds with the pooled text (``added_cond_kwargs``).

The family is the number of text encoders (one: SD, two: SDXL), so every caller handles both the same way::

    ids = tokenize(tokenizers, prompts)                  # one id tensor per tokenizer
    embeddings = encode_prompts(text_encoders, ids)      # PromptEmbeddings
    unet(noisy, t, **unet_conditioning(embeddings, time_ids)).sample   # time_ids: SDXL only (batch x 6)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

SDXL_TIME_IDS = 6  # original (height, width), crop (top, left), target (height, width)


@dataclass(frozen=True)
class PromptEmbeddings:
    """A batch of encoded prompts: what the UNet's cross-attention reads, and SDXL's pooled embedding."""

    encoder_hidden_states: torch.Tensor  # (batch, tokens, features)
    pooled: torch.Tensor | None = None  # (batch, projection) for SDXL; None for SD

    @property
    def is_sdxl(self) -> bool:
        return self.pooled is not None

    def __getitem__(self, index: slice | torch.Tensor) -> PromptEmbeddings:
        """The embeddings of some prompts of the batch (a slice, or an index tensor)."""
        pooled = None if self.pooled is None else self.pooled[index]
        return PromptEmbeddings(self.encoder_hidden_states[index], pooled)

    def repeat(self, times: int) -> PromptEmbeddings:
        """Each prompt ``times`` times in a row (one prompt for several images)."""
        pooled = None if self.pooled is None else self.pooled.repeat_interleave(times, dim=0)
        return PromptEmbeddings(self.encoder_hidden_states.repeat_interleave(times, dim=0), pooled)


def tokenize(tokenizers: Sequence[Any], prompts: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """Each tokenizer's ids of ``prompts``, padded to its maximum length (77) and truncated there.

    Padding is the tokenizer's own (SDXL's ``tokenizer_2`` pads with ``!``, its first tokenizer with
    the end token), as in the pipelines' ``encode_prompt``.
    """
    return tuple(
        tokenizer(
            list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        for tokenizer in tokenizers
    )


def encode_prompts(text_encoders: Sequence[torch.nn.Module], input_ids: Sequence[torch.Tensor]) -> PromptEmbeddings:
    """The prompts' embeddings: SD's last hidden state (one encoder), or SDXL's conditioning (two).

    Gradients flow where the encoders' parameters require them (the caller chooses ``no_grad``).
    """
    if len(text_encoders) != len(input_ids):
        raise ValueError(f"{len(text_encoders)} text encoders but {len(input_ids)} id tensors: give one per tokenizer.")
    if len(text_encoders) == 1:
        encoder = text_encoders[0]
        return PromptEmbeddings(encoder(input_ids[0].to(_device_of(encoder)))[0])
    if len(text_encoders) != 2:
        raise ValueError(f"Expected 1 (SD) or 2 (SDXL) text encoders, got {len(text_encoders)}.")
    states, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids):
        output = encoder(ids.to(_device_of(encoder)), output_hidden_states=True)
        if output[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds: the pooled, projected prompt
            pooled = output[0]
        states.append(output.hidden_states[-2])  # SDXL conditions on the penultimate layer of both encoders
    if pooled is None:
        raise ValueError("SDXL's second text encoder must have a projection (CLIPTextModelWithProjection): no pooled output.")
    return PromptEmbeddings(torch.cat(states, dim=-1), pooled)


def sdxl_time_ids(
    original_size: Sequence[int], crop_top_left: Sequence[int], target_size: Sequence[int]
) -> torch.Tensor:
    """SDXL's ``add_time_ids`` of one image: (original height, width, crop top, left, target height, width).

    ``original_size`` is the photo's size before resizing, ``crop_top_left`` the corner of the crop taken
    from the resized photo, ``target_size`` the training (or generated) image size: the same numbers
    diffusers' SDXL training scripts and pipelines use.
    """
    values = [*original_size, *crop_top_left, *target_size]
    if len(values) != SDXL_TIME_IDS:
        raise ValueError(f"sizes and crop are (height, width) / (top, left) pairs; got {original_size}, {crop_top_left}, {target_size}.")
    return torch.tensor([float(value) for value in values])


def added_cond_kwargs(pooled: torch.Tensor, time_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The UNet's ``added_cond_kwargs`` for SDXL: the pooled text embedding and the batch's time ids (batch x 6)."""
    if time_ids.ndim == 1:
        time_ids = time_ids.unsqueeze(0)
    if time_ids.shape[0] == 1 and pooled.shape[0] > 1:  # one set of sizes for the whole batch
        time_ids = time_ids.expand(pooled.shape[0], -1)
    if time_ids.shape != (pooled.shape[0], SDXL_TIME_IDS):
        raise ValueError(f"time_ids must be (batch, {SDXL_TIME_IDS}) for {pooled.shape[0]} prompts, got {tuple(time_ids.shape)}.")
    return {"text_embeds": pooled, "time_ids": time_ids.to(device=pooled.device, dtype=pooled.dtype)}


def unet_conditioning(embeddings: PromptEmbeddings, time_ids: torch.Tensor | None = None) -> dict[str, Any]:
    """The UNet's conditioning keyword arguments: ``encoder_hidden_states``, and SDXL's ``added_cond_kwargs``.

    ``time_ids`` (batch x 6, or 6 for the whole batch) are required with SDXL embeddings and ignored for SD.
    """
    kwargs: dict[str, Any] = {"encoder_hidden_states": embeddings.encoder_hidden_states}
    if embeddings.pooled is not None:
        if time_ids is None:
            raise ValueError("SDXL's UNet needs time_ids (original size, crop top-left, target size) with its prompts.")
        kwargs["added_cond_kwargs"] = added_cond_kwargs(embeddings.pooled, time_ids)
    return kwargs


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
