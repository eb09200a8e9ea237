"""Sampler: schedule, presets and latent layout, checked against formulas written out here from SPEC 4-5."""

import math
from statistics import NormalDist

import pytest
import torch

from diffusers_ideogram4.constants import TAU_MAX, TAU_MIN
from diffusers_ideogram4.layout import pack_layout, patchify, unpatchify
from diffusers_ideogram4.sampler import PRESETS, model_times, shifted_mu


def spec_times(steps, mu, std, height, width):
    """tau(u) = clamp(1 - sigmoid(mu' + std * Phi^-1(u))), walked from noise (u = 1) to data (u = 0)."""
    mu_shifted = mu + 0.5 * math.log(height * width / 512**2)
    taus = []
    for k in range(steps + 1):
        u = k / steps
        z = -math.inf if u == 0 else math.inf if u == 1 else NormalDist().inv_cdf(u)
        logit = mu_shifted + std * z
        sigmoid = 1.0 if logit == math.inf else 0.0 if logit == -math.inf else 1 / (1 + math.exp(-logit))
        taus.append(min(max(1 - sigmoid, 1 / (1 + math.e**9)), 1 / (1 + math.e**-7.5)))
    return taus[::-1]


@pytest.mark.parametrize("preset", ["quality_48", "default_20", "turbo_12"])
@pytest.mark.parametrize("size", [(1024, 1024), (2048, 512), (256, 256)])
def test_schedule_matches_the_spec_formula(preset, size):
    settings = PRESETS[preset]
    ours = model_times(settings.num_inference_steps, settings.mu, settings.std, *size).tolist()
    expected = spec_times(settings.num_inference_steps, settings.mu, settings.std, *size)
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert ours[0] == TAU_MIN and ours[-1] == TAU_MAX  # ends at tau_max, not at 1
    assert all(a < b for a, b in zip(ours, ours[1:]))


def test_resolution_shift():
    assert shifted_mu(0.5, 512, 512) == 0.5
    assert shifted_mu(0.0, 1024, 1024) == pytest.approx(math.log(2))


def test_presets_first_step_first():
    assert PRESETS["quality_48"].guidance_schedule() == [7.0] * 45 + [3.0] * 3
    assert PRESETS["default_20"].guidance_schedule() == [7.0] * 18 + [3.0] * 2
    assert PRESETS["turbo_12"].guidance_schedule() == [7.0] * 11 + [3.0]
    assert PRESETS["quality_48"].guidance_schedule(30) == [7.0] * 27 + [3.0] * 3
    assert (PRESETS["turbo_12"].mu, PRESETS["turbo_12"].std) == (0.5, 1.75)
    assert PRESETS["distilled"].guidance_schedule() == [1.0] * 20
    # fewer steps than the preset's polish steps: every step is a polish step, and there are exactly that many
    assert PRESETS["quality_48"].guidance_schedule(2) == [3.0, 3.0]
    assert PRESETS["turbo_12"].guidance_schedule(1) == [3.0]


def test_initial_noise_is_a_plain_token_layout_draw():
    """Same seed, same noise as `torch.randn(B, N_img, 128)`: seeded images agree with other implementations."""
    from diffusers_ideogram4.layout import initial_noise

    noise = initial_noise(2, 256 // 16, 320 // 16, 128, generator=torch.Generator().manual_seed(1))
    assert torch.equal(noise, torch.randn(2, 16 * 20, 128, generator=torch.Generator().manual_seed(1)))


def test_unpatchify_follows_the_token_channel_order():
    height, width = 32, 48  # a 2 x 3 token grid
    tokens = torch.randn(1, 6, 128)
    latents = unpatchify(tokens, height // 16, width // 16)
    assert latents.shape == (1, 32, 4, 6)
    # token (gh=1, gw=2), channel (ph=1, pw=0, c=5) -> latent pixel (2*1+1, 2*2+0), channel 5
    assert latents[0, 5, 3, 4] == tokens[0, 1 * 3 + 2, (1 * 2 + 0) * 32 + 5]
    assert torch.equal(patchify(latents), tokens)


def test_pack_layout_of_a_mixed_length_batch():
    layout = pack_layout([3, 1], grid_h=1, grid_w=2)
    assert layout.indicator.tolist() == [[3, 3, 3, 2, 2], [3, 0, 0, 2, 2]]
    assert layout.segment_ids.tolist() == [[0, 0, 0, 0, 0], [0, -1, -1, 0, 0]]
    assert layout.position_ids[1, :, 0].tolist() == [0, 0, 0, 65536, 65536]
    assert layout.position_ids[0, 4].tolist() == [65536, 65536, 65537]
    assert pack_layout([2, 2], 1, 1).segment_ids is None  # equal lengths: no mask at all
