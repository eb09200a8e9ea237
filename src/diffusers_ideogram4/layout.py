"""The token layout of Ideogram 4 (SPEC 2, 5): the image grid, initial noise, patchify / unpatchify, the latent
normalisation, and the packed `[text | image]` sequence with its positions, roles, segments and attention mask.

A `PackedLayout` is built once per pipeline call and passed to every step: it decides once whether the batch needs an
attention mask (only rows with padding do), packs the image tokens behind the text positions and unpacks the velocity.
"""

import dataclasses
import functools
import json
from pathlib import Path

import torch

from .constants import (
    IMAGE_INDICATOR,
    IMAGE_POSITION_OFFSET,
    LATENT_CHANNELS,
    PADDING_INDICATOR,
    PADDING_SEGMENT,
    PATCH_SIZE,
    PIXELS_PER_TOKEN,
    TEXT_INDICATOR,
    TOKEN_CHANNELS,
)


# The reference release's latent normalisation (SPEC 10): two 128-vectors in token order, shipped as data, byte for
# byte the numbers of the reference's `ideogram4/latent_norm.py`.
REFERENCE_LATENT_NORM_PATH = Path(__file__).with_name("reference_latent_norm.json")


def image_grid(height: int, width: int) -> tuple[int, int]:
    """Token rows and columns of an image: one token per 16 x 16 pixels."""
    return height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN


def initial_noise(batch_size: int, grid_h: int, grid_w: int, channels: int, generator=None, device=None):
    """(B, N_img, channels) float32 standard normal noise in token layout (128 channels for the released model)."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = (batch_size, grid_h * grid_w, channels)
    return randn_tensor(shape, generator=generator, device=torch.device(device or "cpu"), dtype=torch.float32)


def unpatchify(tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(B, N_img, 4C) tokens, channel = (ph * 2 + pw) * C + c -> (B, C, 2 gh, 2 gw) VAE latents."""
    batch, channels = tokens.shape[0], tokens.shape[-1] // (PATCH_SIZE * PATCH_SIZE)
    latents = tokens.view(batch, grid_h, grid_w, PATCH_SIZE, PATCH_SIZE, channels)
    latents = latents.permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, 2, gw, 2)
    return latents.reshape(batch, channels, grid_h * PATCH_SIZE, grid_w * PATCH_SIZE)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `unpatchify`: (B, C, H/8, W/8) -> (B, N_img, 4C)."""
    batch, channels, lat_h, lat_w = latents.shape
    grid_h, grid_w = lat_h // PATCH_SIZE, lat_w // PATCH_SIZE
    tokens = latents.view(batch, channels, grid_h, PATCH_SIZE, grid_w, PATCH_SIZE).permute(0, 2, 4, 3, 5, 1)
    return tokens.reshape(batch, grid_h * grid_w, PATCH_SIZE * PATCH_SIZE * channels)


@functools.cache
def reference_latent_norm() -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), float32 (128,) in token order: token latents z decode as `z * scale + shift`."""
    data = json.loads(REFERENCE_LATENT_NORM_PATH.read_text(encoding="utf-8"))
    return torch.tensor(data["latent_scale"]), torch.tensor(data["latent_shift"])


def variance_for_scale(scale: torch.Tensor, eps: float) -> torch.Tensor:
    """The float32 `running_var` whose `sqrt(running_var + eps)` is `scale` to the last bit where one exists (a `bn`
    that decodes exactly like the scale): scale^2 - eps, nudged an ulp at a time."""
    scale = scale.float()
    variance = (scale.double().square() - eps).float()
    for _ in range(8):
        got = torch.sqrt(variance + eps)
        step = torch.where(got > scale, -torch.inf, torch.inf)
        variance = torch.where(got == scale, variance, torch.nextafter(variance, step))
    return variance


def channel_major(vector: torch.Tensor) -> torch.Tensor:
    """A per-token-channel vector, index (ph * 2 + pw) * C + c, re-ordered to the VAE's own channel-major index
    c * 4 + ph * 2 + pw (diffusers' FLUX.2 `_patchify_latents` order, in which the FLUX.2 VAE stores `bn`)."""
    return vector.view(PATCH_SIZE * PATCH_SIZE, -1).t().reshape(-1)


def latent_statistics(vae, normalization: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(scale, shift) float32 in token order and where they come from: token latents z decode as `z * scale + shift`.

    "reference": the reference release's vectors for the released layout (32 latent channels, 128 token channels);
    "vae_bn" or any other layout: the VAE's `bn` statistics, sqrt(running_var + eps) and running_mean, read in token
    order (as diffusers' built-in pipeline reads them)."""
    bn = vae.bn
    released = vae.config.latent_channels == LATENT_CHANNELS and bn.num_features == TOKEN_CHANNELS
    if normalization == "reference" and released:
        return *reference_latent_norm(), "reference"
    return torch.sqrt(bn.running_var.float() + bn.eps), bn.running_mean.float(), "vae_bn"


def describe_vae_statistics(vae) -> str | None:
    """None when the VAE's `bn` holds the reference vectors in token order (or the layout is not the released one);
    otherwise what it holds, in words."""
    if vae.config.latent_channels != LATENT_CHANNELS or vae.bn.num_features != TOKEN_CHANNELS:
        return None
    bn_scale, bn_shift, _ = latent_statistics(vae, "vae_bn")
    scale, shift = reference_latent_norm()

    def same(a, b):
        return torch.allclose(a.to(b.device), b, rtol=1e-5, atol=1e-6)

    if same(scale, bn_scale) and same(shift, bn_shift):
        return None
    if same(channel_major(scale), bn_scale) and same(channel_major(shift), bn_shift):
        return "the reference vectors in the VAE's channel-major order"
    return "statistics that are not the reference vectors in any order (such as the FLUX.2 VAE's own)"


def image_position_ids(grid_h: int, grid_w: int) -> torch.Tensor:
    """(N_img, 3) positions (0, h, w) + offset, row-major over the grid."""
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    return torch.stack((torch.zeros_like(rows), rows, cols), dim=-1) + IMAGE_POSITION_OFFSET


def segment_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) segment ids -> (B, 1, L, L) boolean mask: a token attends only within its own segment."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :]).unsqueeze(1)


@dataclasses.dataclass
class PackedLayout:
    """Per-token roles of one branch's sequence, `[text, right-padded | image]` or image tokens only.

    position_ids (B, L, 3), indicator (B, L), segment_ids (B, L) or None when every row is one segment, and the
    matching attention_mask (B, 1, L, L) bool or None: without padding nothing is masked and SDPA keeps its fused
    kernels. The image tokens are the last N_img positions, after `num_text` text positions.
    """

    position_ids: torch.Tensor
    indicator: torch.Tensor
    segment_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    num_text: int = 0

    def to(self, device) -> "PackedLayout":
        tensors = {name: value.to(device) for name, value in vars(self).items() if isinstance(value, torch.Tensor)}
        return dataclasses.replace(self, **tensors)

    def pack(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N_img, C) -> (B, L, C): zeros at the text positions, the image tokens after them."""
        if not self.num_text:
            return image_tokens
        text = image_tokens.new_zeros(image_tokens.shape[0], self.num_text, image_tokens.shape[2])
        return torch.cat((text, image_tokens), dim=1)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> (B, N_img, C): the image positions."""
        return tokens[:, self.num_text :]


def padded_text_length(text_lengths: list[int], num_image_tokens: int, multiple: int = 1) -> int:
    """Text positions of a packed row: the longest prompt's, plus padding up to a sequence length divisible by
    `multiple` (context parallelism splits the sequence evenly over that many processes)."""
    longest = max(text_lengths)
    return longest + (-(longest + num_image_tokens)) % multiple


def needs_attention_mask(text_lengths: list[int], text_positions: int) -> bool:
    """Whether rows of these text lengths, padded to `text_positions`, hold padding (and so need the segment mask)."""
    return any(count != text_positions for count in text_lengths)


def pack_layout(text_lengths: list[int], grid_h: int, grid_w: int, multiple: int = 1) -> PackedLayout:
    """Layout of `[text | image]` rows: text positions restart at 0 for each prompt, padding sits after the text (up
    to the longest prompt, and further to a sequence length divisible by `multiple`)."""
    image = image_position_ids(grid_h, grid_w)
    longest = padded_text_length(text_lengths, image.shape[0], multiple)
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
    if not needs_attention_mask(text_lengths, longest):
        return PackedLayout(position_ids, indicator, num_text=longest)
    return PackedLayout(position_ids, indicator, segment_ids, segment_attention_mask(segment_ids), longest)


def image_only_layout(batch: int, grid_h: int, grid_w: int, multiple: int = 1) -> PackedLayout:
    """Layout of the unconditional branch: image tokens only, one segment (behind padding tokens when the image
    token count is not divisible by `multiple`): rows of no text."""
    return pack_layout([0] * batch, grid_h, grid_w, multiple)
