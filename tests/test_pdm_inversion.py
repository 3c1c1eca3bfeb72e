"""The DDIM equations and trajectory schedules of the PDM teacher bank, without a model."""

from __future__ import annotations

import math

import pytest
import torch

from pdm_lightning.pdm.inversion import (
    ddim_move,
    epsilon_from_prediction,
    invert_and_reconstruct,
    trajectory_timesteps,
)


def test_ddim_move_matches_the_written_equation() -> None:
    generator = torch.Generator().manual_seed(0)
    z, eps = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 4, 3, 3, generator=generator)
    a_from, a_to = 0.7, 0.2
    x0 = (z - math.sqrt(1 - a_from) * eps) / math.sqrt(a_from)
    expected = math.sqrt(a_to) * x0 + math.sqrt(1 - a_to) * eps
    torch.testing.assert_close(ddim_move(z, eps, a_from, a_to), expected)


def test_ddim_move_back_and_forth_with_the_same_noise_is_the_identity() -> None:
    z, eps = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    there = ddim_move(z, eps, 0.9, 0.05)
    torch.testing.assert_close(ddim_move(there, eps, 0.05, 0.9), z, rtol=1e-5, atol=1e-5)


def test_final_step_to_abar_one_returns_the_predicted_clean_latent() -> None:
    z, eps = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    expected_x0 = (z - math.sqrt(1 - 0.99) * eps) / math.sqrt(0.99)
    torch.testing.assert_close(ddim_move(z, eps, 0.99, 1.0), expected_x0)


def test_v_prediction_is_converted_to_the_noise_it_implies() -> None:
    x0, eps = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    abar = 0.3
    z = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
    velocity = math.sqrt(abar) * eps - math.sqrt(1 - abar) * x0
    torch.testing.assert_close(epsilon_from_prediction(velocity, z, abar, "v_prediction"), eps, rtol=1e-5, atol=1e-5)
    assert epsilon_from_prediction(eps, z, abar, "epsilon") is eps
    with pytest.raises(ValueError, match="sample"):
        epsilon_from_prediction(eps, z, abar, "sample")


def test_faithful_trajectory_is_every_timestep() -> None:
    assert torch.equal(trajectory_timesteps(1000), torch.arange(1000))
    assert torch.equal(trajectory_timesteps(1000, 999), torch.arange(1000))


@pytest.mark.parametrize("steps", [1, 2, 50, 250, 998])
def test_reduced_trajectory_is_evenly_spaced_from_zero_to_the_top(steps: int) -> None:
    timesteps = trajectory_timesteps(1000, steps)
    assert len(timesteps) == steps + 1
    assert timesteps[0] == 0 and timesteps[-1] == 999
    assert bool((timesteps[1:] > timesteps[:-1]).all())
    if steps > 1:
        assert timesteps[1] == 1
        gaps = timesteps[2:] - timesteps[1:-1]
        assert int(gaps.max() - gaps.min()) <= 1


@pytest.mark.parametrize("steps", [0, 1000])
def test_out_of_range_step_counts_are_refused(steps: int) -> None:
    with pytest.raises(ValueError, match="inversion_steps"):
        trajectory_timesteps(1000, steps)


def test_loop_calls_and_records_in_the_documented_order() -> None:
    """Inversion visits t = 1..K with the latent of the previous step; reconstruction records K..0."""
    trajectory = trajectory_timesteps(1000, 4)
    alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
    calls: list[int] = []
    recorded: list[tuple[int, int]] = []

    def predict(latents: torch.Tensor, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(timestep)
        return torch.zeros_like(latents), torch.full((len(latents), 3, 2), float(timestep))

    def record(row: int, query: torch.Tensor, latents: torch.Tensor) -> None:
        recorded.append((row, int(query[0, 0, 0])))

    z0 = torch.randn(2, 4, 2, 2)
    final = invert_and_reconstruct(predict, z0, alphas_cumprod, trajectory, record)
    steps = trajectory.tolist()
    assert calls == steps[1:] + steps[::-1]
    assert recorded == [(row, steps[row]) for row in reversed(range(len(steps)))]
    # With eps = 0 the trajectory only rescales: z0 * sqrt(abar_K / abar_0), then back to abar = 1.
    torch.testing.assert_close(final, z0 / math.sqrt(float(alphas_cumprod[0])), rtol=1e-4, atol=1e-5)
