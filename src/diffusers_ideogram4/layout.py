"""The token layout of Ideogram 4 (SPEC 2, 5): the image grid, initial noise, patchify / unpatchify, and the packed
`[text | image]` sequence with its positions, roles, segments and attention mask.

A `PackedLayout` is built once per pipeline call and passed to every step: it decides once whether the batch needs an
attention mask (only rows with padding do), packs the image tokens behind the text positions and unpacks the velocity.
"""

from dataclasses import dataclass

import torch

from .constants import (
    IMAGE_INDICATOR,
    IMAGE_POSITION_OFFSET,
    PADDING_INDICATOR,
    PADDING_SEGMENT,
    PATCH_SIZE,
    PIXELS_PER_TOKEN,
    TEXT_INDICATOR,
)


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


def image_position_ids(grid_h: int, grid_w: int) -> torch.Tensor:
    """(N_img, 3) positions (0, h, w) + offset, row-major over the grid."""
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    return torch.stack((torch.zeros_like(rows), rows, cols), dim=-1) + IMAGE_POSITION_OFFSET


def segment_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) segment ids -> (B, 1, L, L) boolean mask: a token attends only within its own segment."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :]).unsqueeze(1)


@dataclass
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
        def move(tensor):
            return None if tensor is None else tensor.to(device)

        return PackedLayout(
            move(self.position_ids),
            move(self.indicator),
            move(self.segment_ids),
            move(self.attention_mask),
            self.num_text,
        )

    def pack(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N_img, C) -> (B, L, C): zeros at the text positions, the image tokens after them."""
        if not self.num_text:
            return image_tokens
        text = image_tokens.new_zeros(image_tokens.shape[0], self.num_text, image_tokens.shape[2])
        return torch.cat((text, image_tokens), dim=1)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> (B, N_img, C): the image positions."""
        return tokens[:, self.num_text :]


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
    if all(count == longest for count in text_lengths):
        return PackedLayout(position_ids, indicator, num_text=longest)
    return PackedLayout(position_ids, indicator, segment_ids, segment_attention_mask(segment_ids), longest)


def image_only_layout(batch: int, grid_h: int, grid_w: int) -> PackedLayout:
    """Layout of the unconditional branch: image tokens only, one segment."""
    image = image_position_ids(grid_h, grid_w)
    indicator = torch.full((batch, image.shape[0]), IMAGE_INDICATOR, dtype=torch.long)
    return PackedLayout(image.expand(batch, -1, -1).clone(), indicator)
