"""Deterministic DDIM inversion and reconstruction (docs/method.md, "The teacher query bank"), batched over images.

The equations are pure functions of tensors; the loop takes the UNet as a callable, so it runs
with any model (and is testable against a plainly written loop without a scheduler class).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (latents at the UNet input [B, 4, h, w], timestep) -> (UNet output, captured query [B, tokens, dim])
Predict = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
# (row in the trajectory, query [B, tokens, dim], latents fed to the UNet [B, 4, h, w]) -> None
Record = Callable[[int, torch.Tensor, torch.Tensor], None]


def ddim_move(
    latents: torch.Tensor, epsilon: torch.Tensor, abar_from: torch.Tensor | float, abar_to: torch.Tensor | float
) -> torch.Tensor:
    """One deterministic DDIM move (eta 0) from noise level ``abar_from`` to ``abar_to``.

    x0 = (z - sqrt(1 - abar_from) * eps) / sqrt(abar_from); z' = sqrt(abar_to) * x0 + sqrt(1 - abar_to) * eps.
    The same equation inverts (abar_to < abar_from) and denoises (abar_to > abar_from).
    """
    abar_from = torch.as_tensor(abar_from, dtype=latents.dtype, device=latents.device)
    abar_to = torch.as_tensor(abar_to, dtype=latents.dtype, device=latents.device)
    x0 = (latents - (1 - abar_from).sqrt() * epsilon) / abar_from.sqrt()
    return abar_to.sqrt() * x0 + (1 - abar_to).sqrt() * epsilon


def epsilon_from_prediction(
    prediction: torch.Tensor, latents: torch.Tensor, abar: torch.Tensor | float, prediction_type: str
) -> torch.Tensor:
    """The noise estimate behind a UNet output: itself for epsilon models, converted for v_prediction."""
    if prediction_type == "epsilon":
        return prediction
    if prediction_type == "v_prediction":
        abar = torch.as_tensor(abar, dtype=latents.dtype, device=latents.device)
        return abar.sqrt() * prediction + (1 - abar).sqrt() * latents
    raise ValueError(f"Unsupported prediction_type {prediction_type!r}: PDM inversion needs epsilon or v_prediction.")


def trajectory_timesteps(num_train_timesteps: int = 1000, inversion_steps: int | None = None) -> torch.Tensor:
    """The timesteps the inversion visits, ascending: 0, then ``inversion_steps`` steps up to T - 1.

    Faithful (None, or T - 1 steps): 0, 1, ..., T - 1, i.e. the bank row of timestep t is t.
    Fewer steps: evenly spaced between 1 and T - 1 (rounded), so the trajectory still starts at
    the clean latent and reaches the noisiest timestep; the reconstruction ends with its extra step
    at t = 0. Training draws PDM timesteps from these values, so targets are never interpolated.
    """
    top = num_train_timesteps - 1
    steps = top if inversion_steps is None else int(inversion_steps)
    if not 1 <= steps <= top:
        raise ValueError(f"inversion_steps must be between 1 and {top} (the faithful schedule), got {inversion_steps}.")
    upper = torch.linspace(top, 1, steps, dtype=torch.float64).round().long().flip(0)
    return torch.cat([torch.zeros(1, dtype=torch.long), upper])


def invert_and_reconstruct(
    predict: Predict,
    clean_latents: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    trajectory: torch.Tensor,
    record: Record,
    prediction_type: str = "epsilon",
    on_call: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Inverts ``clean_latents`` along ``trajectory`` and reconstructs them, recording every reconstruction call.

    Inversion: for each k >= 1 the latent at s = trajectory[k-1] moves to t = trajectory[k] with
    eps = unet(z_s, t). Reconstruction: for k = K..0, eps = unet(z_t, t) with t = trajectory[k],
    ``record(k, query, z_t)``, then z moves to trajectory[k-1] (abar = 1 after the final step).
    That is len(trajectory) - 1 + len(trajectory) UNet calls (1999 for the faithful schedule).
    The latent arithmetic runs in float32 whatever dtype the UNet computes in. Returns the
    reconstructed clean latents.
    """
    abar = alphas_cumprod.to(device=clean_latents.device, dtype=torch.float32)
    steps = [int(t) for t in trajectory]
    latents = clean_latents.float()

    def call(z: torch.Tensor, timestep: int, abar_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output, query = predict(z, timestep)
        if on_call is not None:
            on_call()
        return epsilon_from_prediction(output.float(), z, abar_input, prediction_type), query

    for previous, timestep in zip(steps[:-1], steps[1:]):
        epsilon, _ = call(latents, timestep, abar[previous])
        latents = ddim_move(latents, epsilon, abar[previous], abar[timestep])

    for row in reversed(range(len(steps))):
        timestep = steps[row]
        epsilon, query = call(latents, timestep, abar[timestep])
        record(row, query, latents)
        abar_next = abar[steps[row - 1]] if row > 0 else torch.ones((), device=abar.device)
        latents = ddim_move(latents, epsilon, abar[timestep], abar_next)
    return latents
