"""The denoising-loss math of pdm_lightning.losses.diffusion against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from pdm_lightning.losses.diffusion import (
    add_noise,
    compute_snr,
    diffusion_target,
    dreambooth_loss,
    min_snr_weights,
    per_sample_mse,
    sample_noise,
)
from pdm_lightning.losses.pdm import pdm_loss

# abar_t for t = 0..3: chosen so that the square roots are easy to write down by hand.
ALPHAS_CUMPROD = torch.tensor([0.9, 0.64, 0.25, 0.5], dtype=torch.float64)
TIMESTEPS = torch.tensor([1, 2])  # abar = 0.64 (sqrt 0.8, sqrt(1 - abar) 0.6) and 0.25 (sqrt 0.5)
# Two samples of shape (C=1, H=1, W=2).
X0 = torch.tensor([[[[1.0, 2.0]]], [[[3.0, -1.0]]]])
NOISE = torch.tensor([[[[0.5, -1.0]]], [[[2.0, 4.0]]]])


def test_add_noise_is_the_ddpm_forward_process():
    """add_noise = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise, with each sample's own timestep."""
    noisy = add_noise(X0, NOISE, TIMESTEPS, ALPHAS_CUMPROD)
    expected = torch.tensor(
        [
            [[[0.8 * 1.0 + 0.6 * 0.5, 0.8 * 2.0 + 0.6 * -1.0]]],
            [[[0.5 * 3.0 + math.sqrt(0.75) * 2.0, 0.5 * -1.0 + math.sqrt(0.75) * 4.0]]],
        ]
    )
    assert noisy.shape == X0.shape
    torch.testing.assert_close(noisy, expected, rtol=0, atol=1e-6)


def test_add_noise_at_abar_one_returns_the_clean_latents():
    """With abar_t = 1 there is no noise at all; with abar_t = 0 there is only noise."""
    alphas = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(add_noise(X0, NOISE, torch.tensor([0, 0]), alphas), X0)
    torch.testing.assert_close(add_noise(X0, NOISE, torch.tensor([1, 1]), alphas), NOISE)


def test_epsilon_target_is_the_noise():
    """For epsilon prediction the target is exactly the noise that was added."""
    target = diffusion_target(X0, NOISE, TIMESTEPS, ALPHAS_CUMPROD, "epsilon")
    assert torch.equal(target, NOISE)


def test_v_prediction_target_is_the_velocity():
    """v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0, per sample."""
    target = diffusion_target(X0, NOISE, TIMESTEPS, ALPHAS_CUMPROD, "v_prediction")
    expected = torch.tensor(
        [
            [[[0.8 * 0.5 - 0.6 * 1.0, 0.8 * -1.0 - 0.6 * 2.0]]],
            [[[0.5 * 2.0 - math.sqrt(0.75) * 3.0, 0.5 * 4.0 - math.sqrt(0.75) * -1.0]]],
        ]
    )
    torch.testing.assert_close(target, expected, rtol=0, atol=1e-6)


def test_v_target_and_noisy_latents_recover_x0():
    """x0 = sqrt(abar) * x_t - sqrt(1 - abar) * v (the identity a v-model's sampler relies on)."""
    noisy = add_noise(X0, NOISE, TIMESTEPS, ALPHAS_CUMPROD)
    v = diffusion_target(X0, NOISE, TIMESTEPS, ALPHAS_CUMPROD, "v_prediction")
    sqrt_abar = torch.tensor([0.8, 0.5]).reshape(-1, 1, 1, 1)
    sqrt_one_minus = torch.tensor([0.6, math.sqrt(0.75)]).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(sqrt_abar * noisy - sqrt_one_minus * v, X0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["sample", "v-prediction", ""])
def test_unknown_prediction_type_raises(prediction_type):
    """A prediction type other than epsilon / v_prediction is refused, by the target and by min-SNR."""
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_target(X0, NOISE, TIMESTEPS, ALPHAS_CUMPROD, prediction_type)
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weights(torch.tensor([1.0]), 5.0, prediction_type)


def test_sample_noise_without_offset_is_one_plain_randn():
    """offset_noise=0 gives exactly torch.randn with the same seed, and draws nothing more."""
    shape = (2, 3, 4, 4)
    generator = torch.Generator().manual_seed(123)
    noise = sample_noise(shape, generator, "cpu", offset_noise=0.0)
    reference = torch.Generator().manual_seed(123)
    assert torch.equal(noise, torch.randn(shape, generator=reference))
    # Both generators are at the same position afterwards: only one randn was drawn.
    assert torch.equal(torch.randn(5, generator=generator), torch.randn(5, generator=reference))


def test_sample_noise_with_offset_adds_a_per_sample_channel_constant():
    """offset>0: randn + offset * randn((B, C, 1, 1)) drawn next from the same generator."""
    shape = (2, 3, 4, 4)
    noise = sample_noise(shape, torch.Generator().manual_seed(7), "cpu", offset_noise=0.1)
    reference = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=reference)
    offset = torch.randn((2, 3, 1, 1), generator=reference)
    torch.testing.assert_close(noise, base + 0.1 * offset, rtol=0, atol=1e-6)
    shift = noise - base
    # Constant over the spatial dims of each (sample, channel) ...
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift), rtol=0, atol=1e-6)
    # ... and different between channels and samples.
    assert shift[:, :, 0, 0].unique().numel() == 6


def test_compute_snr():
    """SNR_t = abar_t / (1 - abar_t), gathered at each timestep."""
    snr = compute_snr(ALPHAS_CUMPROD, torch.tensor([0, 1, 2, 3, 1]))
    expected = torch.tensor([0.9 / 0.1, 0.64 / 0.36, 0.25 / 0.75, 0.5 / 0.5, 0.64 / 0.36], dtype=torch.float32)
    assert snr.dtype == torch.float32
    torch.testing.assert_close(snr, expected, rtol=1e-5, atol=0)


def test_min_snr_weights_epsilon():
    """Epsilon loss weight = min(snr, gamma) / snr: below gamma it is 1, above it is gamma / snr."""
    weights = min_snr_weights(torch.tensor([9.0, 1.0 / 3.0, 5.0, 20.0]), gamma=5.0, prediction_type="epsilon")
    torch.testing.assert_close(weights, torch.tensor([5.0 / 9.0, 1.0, 1.0, 5.0 / 20.0]), rtol=1e-6, atol=0)


def test_min_snr_weights_v_prediction():
    """v loss weight = min(snr, gamma) / (snr + 1)."""
    weights = min_snr_weights(torch.tensor([9.0, 1.0 / 3.0, 5.0, 20.0]), gamma=5.0, prediction_type="v_prediction")
    expected = torch.tensor([5.0 / 10.0, (1.0 / 3.0) / (4.0 / 3.0), 5.0 / 6.0, 5.0 / 21.0])
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)


# Two samples of shape (C=1, H=2, W=2).
PRED = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
TARGET = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]], [[[2.0, 3.0], [1.0, -1.0]]]])


def test_per_sample_mse_without_mask():
    """One mean squared error per sample, over all its elements."""
    loss = per_sample_mse(PRED, TARGET)
    expected = torch.tensor([(1 + 4 + 9 + 16) / 4, (1 + 4 + 0 + 4) / 4])
    torch.testing.assert_close(loss, expected)


def test_per_sample_mse_with_mask_averages_over_masked_elements_only():
    """With a mask the mean is over the elements where the mask is 1 (not over all elements)."""
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]], [[[0.0, 1.0], [1.0, 1.0]]]])
    loss = per_sample_mse(PRED, TARGET, mask)
    expected = torch.tensor([(1 + 16) / 2, (4 + 0 + 4) / 3])
    torch.testing.assert_close(loss, expected)


def test_per_sample_mse_mask_broadcasts_over_channels():
    """A (B, 1, H, W) mask applies to every channel; the count is over channels too."""
    pred = torch.tensor([[[[2.0, 5.0]], [[4.0, 7.0]]]])  # (1, 2, 1, 2)
    target = torch.zeros_like(pred)
    mask = torch.tensor([[[[1.0, 0.0]]]])  # (1, 1, 1, 2): first column only
    loss = per_sample_mse(pred, target, mask)
    torch.testing.assert_close(loss, torch.tensor([(4.0 + 16.0) / 2]))


def test_per_sample_mse_is_float32_for_half_inputs():
    """The loss is computed in float32 even when prediction and target are float16."""
    loss = per_sample_mse(PRED.half(), TARGET.half())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor([7.5, 2.25]))


def test_per_sample_mse_empty_mask_gives_zero_not_nan():
    """A sample whose mask is all zero contributes 0 instead of NaN."""
    mask = torch.zeros(2, 1, 2, 2)
    mask[1] = 1.0
    loss = per_sample_mse(PRED, TARGET, mask)
    torch.testing.assert_close(loss, torch.tensor([0.0, 2.25]))


PER_SAMPLE = torch.tensor([1.0, 3.0, 2.0, 6.0])  # instance chunk [1, 3], class chunk [2, 6]


@pytest.mark.parametrize(
    ("prior_loss_weight", "expected_total"),
    [(1.0, 2.0 + 4.0), (0.5, 2.0 + 0.5 * 4.0), (0.0, 2.0), (2.5, 2.0 + 2.5 * 4.0)],
)
def test_dreambooth_loss_total_is_instance_plus_weighted_prior(prior_loss_weight, expected_total):
    """total = mean(instance chunk) + prior_loss_weight * mean(class chunk)."""
    loss = dreambooth_loss(PER_SAMPLE, num_instance=2, prior_loss_weight=prior_loss_weight)
    assert loss.instance.item() == pytest.approx(2.0)
    assert loss.prior.item() == pytest.approx(4.0)
    assert loss.total.item() == pytest.approx(expected_total)


def test_dreambooth_loss_unequal_chunks():
    """The chunk means are taken over each chunk's own size."""
    loss = dreambooth_loss(torch.tensor([4.0, 2.0, 6.0, 10.0]), num_instance=1, prior_loss_weight=0.5)
    assert loss.instance.item() == pytest.approx(4.0)
    assert loss.prior.item() == pytest.approx((2.0 + 6.0 + 10.0) / 3)
    assert loss.total.item() == pytest.approx(4.0 + 0.5 * 6.0)


def test_dreambooth_loss_applies_weights_before_the_chunk_means():
    """Per-sample weights scale each loss first: mean(w * l), not mean(w) * mean(l)."""
    weights = torch.tensor([2.0, 0.5, 1.0, 0.25])
    loss = dreambooth_loss(PER_SAMPLE, num_instance=2, prior_loss_weight=2.0, weights=weights)
    # Weighted losses: [2.0, 1.5, 2.0, 1.5].
    assert loss.instance.item() == pytest.approx((2.0 + 1.5) / 2)
    assert loss.prior.item() == pytest.approx((2.0 + 1.5) / 2)
    assert loss.total.item() == pytest.approx(1.75 + 2.0 * 1.75)


def test_dreambooth_loss_without_class_chunk_has_no_prior():
    """A batch of instance samples only: prior is None and total is the instance mean."""
    loss = dreambooth_loss(torch.tensor([1.0, 3.0]), num_instance=2, prior_loss_weight=0.5)
    assert loss.prior is None
    assert loss.instance.item() == pytest.approx(2.0)
    assert loss.total.item() == pytest.approx(2.0)
    weighted = dreambooth_loss(torch.tensor([1.0, 3.0]), num_instance=2, weights=torch.tensor([1.0, 3.0]))
    assert weighted.prior is None
    assert weighted.total.item() == pytest.approx((1.0 + 9.0) / 2)


def test_dreambooth_loss_is_differentiable():
    """Gradients flow to each sample with the weights 1/n_instance and prior_loss_weight/n_class."""
    losses = PER_SAMPLE.clone().requires_grad_(True)
    dreambooth_loss(losses, num_instance=2, prior_loss_weight=0.5).total.backward()
    torch.testing.assert_close(losses.grad, torch.tensor([0.5, 0.5, 0.25, 0.25]))


# --- PDM loss -------------------------------------------------------------------------------------

def test_pdm_loss_is_the_mean_of_per_element_query_mses():
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [3.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]])
    # element 0: squared errors (0, 4, 0, 0) -> 1; element 1: all 1 -> 1; mean 1
    assert pdm_loss(student, teacher).item() == pytest.approx(1.0)
    teacher[1] = 3.0  # element 1: all 9
    assert pdm_loss(student, teacher).item() == pytest.approx((1.0 + 9.0) / 2)


def test_pdm_loss_with_token_mask_averages_each_element_over_its_subject_tokens():
    student = torch.zeros(2, 3, 2)
    teacher = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], [[4.0, 4.0], [5.0, 5.0], [6.0, 6.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    # element 0: tokens 0 and 2 -> (1 + 9) / 2 = 5; element 1: token 1 -> 25; mean 15
    assert pdm_loss(student, teacher, mask).item() == pytest.approx(15.0)


def test_pdm_loss_refuses_queries_of_other_shapes():
    with pytest.raises(ValueError, match="another layer or resolution"):
        pdm_loss(torch.zeros(1, 4, 2), torch.zeros(1, 16, 2))
