"""The Ideogram 4 sampler as small pure functions (SPEC 4): schedule, presets, guidance, Euler step, latent layout.

Model time tau runs from ~0 (noise) to ~1 (data). The schedule is logit-normal with a resolution shift and is clamped
to [TAU_MIN, TAU_MAX]: the last step ends at TAU_MAX, like the reference (diffusers' built-in pipeline integrates on
to tau = 1 instead).
"""

import math
import numbers
from dataclasses import dataclass

import torch

from .constants import (
    IMAGE_INDICATOR,
    IMAGE_POSITION_OFFSET,
    LATENT_CHANNELS,
    PADDING_INDICATOR,
    PADDING_SEGMENT,
    PATCH_SIZE,
    PIXELS_PER_TOKEN,
    SCHEDULE_BASE_PIXELS,
    TAU_MAX,
    TAU_MIN,
    TEXT_INDICATOR,
    TOKEN_CHANNELS,
)


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


# --------------------------------------------------------------------------------------------------------------------
# Latent layout (SPEC 5)


def image_grid(height: int, width: int) -> tuple[int, int]:
    return height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN


def finite_float(name: str, value) -> float:
    """A real, finite number (a Python or numpy number, or a one-element tensor) as a float, or a ValueError that
    names the argument. Strings and bools are refused rather than read."""
    number = math.nan
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        number = float(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    return number


def initial_noise(batch_size: int, height: int, width: int, generator=None, device=None) -> torch.Tensor:
    """(B, N_img, 128) float32 standard normal noise in token layout."""
    from diffusers.utils.torch_utils import randn_tensor

    grid_h, grid_w = image_grid(height, width)
    shape = (batch_size, grid_h * grid_w, TOKEN_CHANNELS)
    return randn_tensor(shape, generator=generator, device=torch.device(device or "cpu"), dtype=torch.float32)


def unpatchify(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N_img, 128) tokens, channel = (ph * 2 + pw) * 32 + c -> (B, 32, H/8, W/8) latents."""
    grid_h, grid_w = image_grid(height, width)
    batch = tokens.shape[0]
    latents = tokens.view(batch, grid_h, grid_w, PATCH_SIZE, PATCH_SIZE, LATENT_CHANNELS)
    latents = latents.permute(0, 5, 1, 3, 2, 4)  # (B, 32, gh, 2, gw, 2)
    return latents.reshape(batch, LATENT_CHANNELS, grid_h * PATCH_SIZE, grid_w * PATCH_SIZE)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `unpatchify`: (B, 32, H/8, W/8) -> (B, N_img, 128)."""
    batch, channels, lat_h, lat_w = latents.shape
    grid_h, grid_w = lat_h // PATCH_SIZE, lat_w // PATCH_SIZE
    tokens = latents.view(batch, channels, grid_h, PATCH_SIZE, grid_w, PATCH_SIZE).permute(0, 2, 4, 3, 5, 1)
    return tokens.reshape(batch, grid_h * grid_w, PATCH_SIZE * PATCH_SIZE * channels)


def image_position_ids(grid_h: int, grid_w: int) -> torch.Tensor:
    """(N_img, 3) positions (0, h, w) + offset, row-major over the grid."""
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    return torch.stack((torch.zeros_like(rows), rows, cols), dim=-1) + IMAGE_POSITION_OFFSET


@dataclass
class PackedLayout:
    """Per-token roles of the conditional sequence `[text, right-padded | image]`, each (B, L[, 3])."""

    position_ids: torch.Tensor
    segment_ids: torch.Tensor | None  # None: no padding, one segment per row (SDPA needs no mask)
    indicator: torch.Tensor

    def to(self, device) -> "PackedLayout":
        segment_ids = None if self.segment_ids is None else self.segment_ids.to(device)
        return PackedLayout(self.position_ids.to(device), segment_ids, self.indicator.to(device))


def pack_layout(text_lengths: list[int], grid_h: int, grid_w: int) -> PackedLayout:
    """Layout of `[text | image]` rows: text positions restart at 0 for each prompt, padding sits after the text."""
    longest = max(text_lengths)
    image = image_position_ids(grid_h, grid_w)
    length = longest + image.shape[0]
    batch = len(text_lengths)
    position_ids = torch.zeros(batch, length, 3, dtype=torch.long)
    indicator = torch.full((batch, length), PADDING_INDICATOR, dtype=torch.long)
    segment_ids = torch.full((batch, length), PADDING_SEGMENT, dtype=torch.long)
    for row, count in enumerate(text_lengths):
        position_ids[row, :count] = torch.arange(count)[:, None]
        indicator[row, :count] = TEXT_INDICATOR
        segment_ids[row, :count] = 0
    position_ids[:, longest:] = image
    indicator[:, longest:] = IMAGE_INDICATOR
    segment_ids[:, longest:] = 0
    padded = any(count != longest for count in text_lengths)
    return PackedLayout(position_ids, segment_ids if padded else None, indicator)


def image_only_layout(batch: int, grid_h: int, grid_w: int) -> PackedLayout:
    """Layout of the unconditional branch: image tokens only, one segment."""
    image = image_position_ids(grid_h, grid_w)
    indicator = torch.full((batch, image.shape[0]), IMAGE_INDICATOR, dtype=torch.long)
    return PackedLayout(image.expand(batch, -1, -1).clone(), None, indicator)
