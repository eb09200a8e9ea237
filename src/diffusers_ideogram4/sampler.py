"""The Ideogram 4 sampler as small pure functions (SPEC 4): schedule, presets, guidance, Euler step.

Model time tau runs from ~0 (noise) to ~1 (data). The schedule is logit-normal with a resolution shift and is clamped
to [TAU_MIN, TAU_MAX]: the last step ends at TAU_MAX, like the reference (diffusers' built-in pipeline integrates on
to tau = 1 instead).
"""

import math
from dataclasses import dataclass

import torch

from .constants import SCHEDULE_BASE_PIXELS, TAU_MAX, TAU_MIN


@dataclass(frozen=True)
class SamplerPreset:
    """Steps, schedule shape and guidance of a named sampler setting.

    `polish_steps` final steps use `polish_guidance`, the others `guidance`; with a different `num_inference_steps`
    the same rule applies (e.g. quality_48 at 30 steps: 7.0 x 27, then 3.0 x 3).
    """

    num_inference_steps: int
    guidance: float
    polish_guidance: float
    polish_steps: int
    mu: float
    std: float

    def guidance_schedule(self, num_inference_steps: int | None = None) -> list[float]:
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        polish = min(self.polish_steps, steps)
        return [self.guidance] * (steps - polish) + [self.polish_guidance] * polish


PRESETS = {
    "quality_48": SamplerPreset(48, guidance=7.0, polish_guidance=3.0, polish_steps=3, mu=0.0, std=1.5),
    "default_20": SamplerPreset(20, guidance=7.0, polish_guidance=3.0, polish_steps=2, mu=0.0, std=1.75),
    "turbo_12": SamplerPreset(12, guidance=7.0, polish_guidance=3.0, polish_steps=1, mu=0.5, std=1.75),
    # CFG-distilled, single-branch checkpoints (no unconditional transformer).
    "distilled": SamplerPreset(20, guidance=1.0, polish_guidance=1.0, polish_steps=0, mu=0.0, std=1.75),
}
DEFAULT_PRESET = "quality_48"
DISTILLED_PRESET = "distilled"


def shifted_mu(mu: float, height: int, width: int) -> float:
    """Resolution shift: larger images spend more of the schedule near noise."""
    return mu + 0.5 * math.log(height * width / SCHEDULE_BASE_PIXELS)


def model_times(num_inference_steps: int, mu: float, std: float, height: int, width: int) -> torch.Tensor:
    """The N + 1 model times, float64, rising from TAU_MIN (noise) to TAU_MAX.

    tau(u) = clamp(1 - sigmoid(mu' + std * Phi^-1(u)), TAU_MIN, TAU_MAX) on u = linspace(0, 1, N + 1); tau falls
    as u rises, so the sampler walks the grid from u = 1 back to u = 0.
    """
    grid = torch.linspace(0.0, 1.0, num_inference_steps + 1, dtype=torch.float64)
    tau = 1.0 - torch.sigmoid(shifted_mu(mu, height, width) + std * torch.special.ndtri(grid))
    return tau.clamp(TAU_MIN, TAU_MAX).flip(0)


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """v = g * v_cond + (1 - g) * v_uncond, in float32; with g = 1 the unconditional pass is not needed."""
    if v_uncond is None:
        return v_cond
    return guidance * v_cond + (1.0 - guidance) * v_uncond


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, tau_now: float, tau_next: float) -> torch.Tensor:
    """z <- z + v * (tau_next - tau_now), the step size taken in float64 and applied in float32."""
    return latents + velocity * (tau_next - tau_now)
