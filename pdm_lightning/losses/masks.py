"""Subject masks at the losses' resolutions: pixel mask -> latent grid -> the PDM layer's token grid.

A mask restricts the mean of a loss to the subject (docs/method.md): L_inst / L_prior over the
subject's latent elements, L_pdm over the subject's tokens. Pure tensor functions.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

MaskMode = Literal["binary", "soft"]



def mask_to_latent(mask: torch.Tensor, latent_hw: tuple[int, int], mode: MaskMode = "binary") -> torch.Tensor:
    """Pixel mask [B, 1, H, W] in [0, 1] -> latent mask [B, 1, h, w].

    ``binary`` (the reference's rule): every latent element that holds any subject counts as subject
    (1), the rest 0, which grows the subject by up to one latent cell at its border. ``soft``: the
    area average, so a boundary element is weighted by the fraction of subject it holds.
    """
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be [B, 1, H, W], got {tuple(mask.shape)}.")
    latent = F.interpolate(mask.float(), size=tuple(latent_hw), mode="area")
    return binarize(latent) if mode == "binary" else latent


def binarize(mask: torch.Tensor) -> torch.Tensor:
    """1 wherever the mask has any coverage, else 0."""
    return (mask > 0).to(mask.dtype)


def token_grid(num_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (rows, columns) of an attention layer's ``num_tokens`` tokens at a latent of ``latent_hw``.

    UNet levels halve both sides, so the grid is the latent grid divided by a power-of-two factor.
    """
    height, width = latent_hw
    rows, cols = height, width
    while rows * cols > num_tokens:
        rows, cols = -(-rows // 2), -(-cols // 2)  # a stride-2 convolution with padding 1 rounds up
    if rows * cols != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a grid of the {height}x{width} latent.")
    return rows, cols


def mask_to_tokens(mask_latent: torch.Tensor, tokens_hw: tuple[int, int] | int, mode: MaskMode = "binary") -> torch.Tensor:
    """Latent mask [B, 1, h, w] -> per-token weights [B, rows * cols], flattened row-major like diffusers' tokens.

    ``tokens_hw`` is the layer's token grid, or its number of tokens (grid inferred from the latent's
    shape). A coarser grid takes the area average (``binary``: then any coverage counts as subject),
    a finer one bilinear weights (``binary``: nearest, so it stays 0 / 1).
    """
    if mask_latent.ndim != 4 or mask_latent.shape[1] != 1:
        raise ValueError(f"mask_latent must be [B, 1, h, w], got {tuple(mask_latent.shape)}.")
    if isinstance(tokens_hw, int):
        tokens_hw = token_grid(tokens_hw, tuple(mask_latent.shape[-2:]))
    rows, cols = tokens_hw
    mask = mask_latent.float()
    if (rows, cols) != tuple(mask.shape[-2:]):
        finer = rows > mask.shape[-2] or cols > mask.shape[-1]
        if finer:
            resize = {"mode": "nearest"} if mode == "binary" else {"mode": "bilinear", "align_corners": False}
        else:
            resize = {"mode": "area"}
        mask = F.interpolate(mask, size=(rows, cols), **resize)
    if mode == "binary":
        mask = binarize(mask)
    return mask.flatten(1)
