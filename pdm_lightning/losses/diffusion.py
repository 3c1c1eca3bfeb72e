"""Denoising (DreamBooth) loss math as pure tensor functions.

Everything here takes plain tensors (``alphas_cumprod`` rather than a scheduler object) so each
formula can be checked against a hand computation without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gathers ``values[t]`` and reshapes to broadcast over a ``ndim``-dimensional batch."""
    out = values.to(device=timesteps.device)[timesteps].float()
    return out.reshape(-1, *([1] * (ndim - 1)))


def add_noise(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """DDPM forward process: ``sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise``."""
    abar = _per_sample(alphas_cumprod, timesteps, latents.ndim)
    return abar.sqrt() * latents + (1 - abar).sqrt() * noise


def diffusion_target(
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """What the UNet is trained to predict: the noise (epsilon) or the velocity (v_prediction).

    v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0 (Salimans & Ho, 2022).
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        abar = _per_sample(alphas_cumprod, timesteps, latents.ndim)
        return abar.sqrt() * noise - (1 - abar).sqrt() * latents
    raise ValueError(f"Unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}.")


def sample_noise(
    shape: torch.Size | tuple[int, ...],
    generator: torch.Generator,
    device: torch.device | str,
    offset_noise: float = 0.0,
) -> torch.Tensor:
    """Gaussian noise, plus ``offset_noise`` times a per-(sample, channel) constant.

    The offset lets the model learn to shift an image's mean brightness, which plain noise
    almost never requires (Guttenberg, 2023). ``offset_noise=0`` draws exactly one randn, so
    runs without it see the same noise as plain DreamBooth.
    """
    noise = torch.randn(shape, generator=generator, device=device)
    if offset_noise:
        offset = torch.randn((shape[0], shape[1], 1, 1), generator=generator, device=device)
        noise = noise + offset_noise * offset
    return noise


def compute_snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` per timestep."""
    abar = alphas_cumprod.to(device=timesteps.device)[timesteps].float()
    return abar / (1 - abar)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023), per sample.

    The paper's weight is ``min(snr, gamma)`` on the x0 loss; expressed on the epsilon loss it is
    ``min(snr, gamma) / snr`` and on the v loss ``min(snr, gamma) / (snr + 1)``.
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"Unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}.")


def per_sample_mse(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error per sample (mean over all but the batch dim), in float32.

    With ``mask`` (broadcastable to the inputs, 1 = counts) the mean is over the masked elements only.
    """
    squared = F.mse_loss(prediction.float(), target.float(), reduction="none")
    dims = tuple(range(1, squared.ndim))
    if mask is None:
        return squared.mean(dim=dims)
    mask = mask.float().expand_as(squared)
    return (squared * mask).sum(dim=dims) / mask.sum(dim=dims).clamp_min(1.0)


@dataclass(frozen=True)
class DreamBoothLoss:
    """The total loss and its logged parts."""

    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor | None


def dreambooth_loss(
    per_sample_losses: torch.Tensor,
    num_instance: int,
    prior_loss_weight: float = 1.0,
    weights: torch.Tensor | None = None,
) -> DreamBoothLoss:
    """Combines per-sample losses of a batch laid out as [instance chunk, class chunk].

    total = mean(instance) + prior_loss_weight * mean(prior); ``weights`` (e.g. min-SNR) scale each
    sample before the chunk means. Without a class chunk the prior term is absent.
    """
    if weights is not None:
        per_sample_losses = per_sample_losses * weights
    instance = per_sample_losses[:num_instance].mean()
    if per_sample_losses.shape[0] == num_instance:
        return DreamBoothLoss(total=instance, instance=instance, prior=None)
    prior = per_sample_losses[num_instance:].mean()
    return DreamBoothLoss(total=instance + prior_loss_weight * prior, instance=instance, prior=prior)
