"""Loss and noise maths on hand-made tensors: masks, weights, timesteps, targets."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler

from likeness.settings import LossSettings, MaskedTrainingSettings, NoiseSettings
from likeness.trainer.loss import diffusion_losses, element_losses, log_cosh, mask_weights, timestep_weights
from likeness.trainer.noise import (
    add_noise, sample_noise, sample_timesteps, snr, step_generator, timestep_range, training_scheduler,
)


def sdxl_scheduler(**overrides) -> DDPMScheduler:
    euler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1, **overrides,
    )
    return training_scheduler(euler.config)


def half_mask() -> torch.Tensor:
    """(1, 1, 2, 4): left half inside the mask (1), right half outside (0)."""
    return torch.tensor([[[[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]]])


def unit_error() -> tuple[torch.Tensor, torch.Tensor]:
    """Prediction and target differing by exactly 1 everywhere: MSE = MAE = 1 per element."""
    return torch.ones(1, 4, 2, 4), torch.zeros(1, 4, 2, 4)


def loss_of(masked: MaskedTrainingSettings, mask=None, **kwargs) -> torch.Tensor:
    predicted, target = unit_error()
    timesteps = torch.tensor([500])
    return diffusion_losses(predicted, target, timesteps, sdxl_scheduler().alphas_cumprod, LossSettings(), masked, mask=mask, **kwargs)


def test_masked_loss_weighs_one_inside_and_unmasked_weight_outside():
    masked = MaskedTrainingSettings(unmasked_weight=0.6, unmasked_probability=0.0)
    assert loss_of(masked, half_mask()).item() == pytest.approx(0.5 * 1.0 + 0.5 * 0.6)
    normalized = masked.model_copy(update={"normalize_masked_area_loss": True})
    assert loss_of(normalized, half_mask()).item() == pytest.approx(1.0)  # 0.8 / mean weight 0.8


def test_unmasked_probability_is_really_applied():
    always = MaskedTrainingSettings(unmasked_weight=0.6, unmasked_probability=1.0)
    assert loss_of(always, half_mask(), generator=torch.Generator().manual_seed(0)).item() == pytest.approx(1.0)
    never = MaskedTrainingSettings(unmasked_weight=0.6, unmasked_probability=0.0)
    assert loss_of(never, half_mask(), generator=torch.Generator().manual_seed(0)).item() == pytest.approx(0.8)


def test_unmasked_probability_drops_about_that_share_of_masks():
    masked = MaskedTrainingSettings(unmasked_weight=0.0, unmasked_probability=0.1)
    masks = torch.zeros(20_000, 1, 1, 1)
    weights = mask_weights(masks, masked, torch.Generator().manual_seed(1))
    assert set(weights.unique().tolist()) == {0.0, 1.0}
    assert weights.mean().item() == pytest.approx(0.1, abs=0.01)


def test_soft_masks_are_clamped_and_masking_can_be_off():
    masked = MaskedTrainingSettings(unmasked_weight=0.6, unmasked_probability=0.0)
    soft = torch.tensor([0.0, 0.3, 0.8, 1.0]).view(1, 1, 1, 4)
    assert mask_weights(soft, masked).flatten().tolist() == pytest.approx([0.6, 0.6, 0.8, 1.0])
    off = masked.model_copy(update={"enabled": False})
    assert loss_of(off, half_mask()).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mask of shape"):
        loss_of(masked, torch.ones(1, 1, 4, 4))


def test_loss_strengths_are_summed_and_concept_weight_multiplies():
    predicted, target = torch.full((2, 4, 1, 1), 2.0), torch.zeros(2, 4, 1, 1)
    loss = LossSettings(mse_strength=1.0, mae_strength=0.5, log_cosh_strength=2.0)
    expected = 4.0 + 0.5 * 2.0 + 2.0 * math.log(math.cosh(2.0))
    assert element_losses(predicted, target, loss).flatten().tolist() == pytest.approx([expected] * 8)
    assert log_cosh(torch.tensor([100.0])).item() == pytest.approx(100.0 - math.log(2.0))  # no overflow
    masked = MaskedTrainingSettings(enabled=False)
    losses = diffusion_losses(
        predicted, target, torch.tensor([10, 10]), sdxl_scheduler().alphas_cumprod, loss, masked,
        loss_weight=torch.tensor([1.0, 0.25]),
    )
    assert losses.tolist() == pytest.approx([expected, expected / 4])


@pytest.mark.parametrize("v_prediction", [False, True])
def test_timestep_weight_functions_against_hand_computation(v_prediction):
    alphas_cumprod = sdxl_scheduler().alphas_cumprod
    timesteps = torch.tensor([0, 100, 500, 999])
    a = alphas_cumprod[timesteps].double()
    ratio = a / (1 - a)
    extra = 1.0 if v_prediction else 0.0
    expected = {
        "CONSTANT": [1.0] * 4,
        "MIN_SNR_GAMMA": [min(s, 5.0) / (s + extra) for s in ratio.tolist()],
        "DEBIASED_ESTIMATION": [1 / math.sqrt(min(s, 1000.0) + extra) for s in ratio.tolist()],
        "P2": [(1 + s + extra) ** -5.0 for s in ratio.tolist()],
    }
    for fn, values in expected.items():
        got = timestep_weights(timesteps, alphas_cumprod, LossSettings(weight_fn=fn, weight_strength=5.0), v_prediction)
        assert got.tolist() == pytest.approx(values, rel=1e-5), fn
    assert ratio[0] > 1000  # timestep 0 is where debiased estimation's clip matters


def test_snr_from_alphas_cumprod():
    alphas_cumprod = torch.tensor([0.9, 0.5, 0.2])
    assert snr(alphas_cumprod, torch.tensor([0, 1, 2])).tolist() == pytest.approx([9.0, 1.0, 0.25])


def test_timesteps_stay_in_the_noising_range():
    noise = NoiseSettings(min_noising_strength=0.25, max_noising_strength=0.5)
    assert timestep_range(noise, 1000) == (250, 500)
    for kind in ("UNIFORM", "LOGIT_NORMAL", "HEAVY_TAIL", "SIGMOID", "COS_MAP"):
        settings = noise.model_copy(update={"timestep_distribution": kind, "noising_weight": 1.0})
        t = sample_timesteps(4000, settings, 1000, torch.Generator().manual_seed(0))
        assert t.dtype == torch.long and t.min() >= 250 and t.max() <= 499, kind
    uniform = sample_timesteps(4000, noise, 1000, torch.Generator().manual_seed(0))
    assert uniform.min() == 250 and uniform.max() == 499 and uniform.float().mean().item() == pytest.approx(374.5, abs=5)


def test_generator_per_step_is_deterministic_and_distinct():
    latents = torch.zeros(2, 4, 8, 8)
    noise = NoiseSettings()
    first = sample_noise(latents, noise, step_generator(7, world_size=2, rank=1))
    assert torch.equal(first, sample_noise(latents, noise, step_generator(7, world_size=2, rank=1)))
    assert not torch.equal(first, sample_noise(latents, noise, step_generator(7, world_size=2, rank=0)))
    assert step_generator(7, 2, 1).initial_seed() == 15


def test_offset_noise_is_constant_per_batch_and_channel():
    latents = torch.zeros(3, 4, 16, 16)
    plain = sample_noise(latents, NoiseSettings(), torch.Generator().manual_seed(3))
    offset = sample_noise(latents, NoiseSettings(offset_noise_weight=0.1), torch.Generator().manual_seed(3))
    shift = offset - plain  # the same eps is drawn first, then the offset
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift))
    assert shift[:, :, 0, 0].abs().max() > 0
    perturbed = sample_noise(latents, NoiseSettings(perturbation_noise_weight=0.1), torch.Generator().manual_seed(3))
    assert (perturbed - plain).std().item() == pytest.approx(0.1, rel=0.1)


def test_noisy_latents_and_targets_for_epsilon_and_v_prediction():
    scheduler = sdxl_scheduler()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = add_noise(latents, scheduler, NoiseSettings(), step_generator(3))
    eps = sample_noise(latents, NoiseSettings(), step_generator(3))  # same generator order: noise first
    a = scheduler.alphas_cumprod[batch.timesteps].view(-1, 1, 1, 1)
    assert batch.prediction_type == "epsilon" and torch.allclose(batch.target, eps)
    assert torch.allclose(batch.noisy_latents, a.sqrt() * latents + (1 - a).sqrt() * eps, atol=1e-6)

    v = add_noise(latents, scheduler, NoiseSettings(prediction_type="v_prediction"), step_generator(3))
    assert v.prediction_type == "v_prediction"
    assert torch.allclose(v.target, a.sqrt() * eps - (1 - a).sqrt() * latents, atol=1e-6)
    auto_v = add_noise(latents, sdxl_scheduler(prediction_type="v_prediction"), NoiseSettings(), step_generator(3))
    assert auto_v.prediction_type == "v_prediction"
