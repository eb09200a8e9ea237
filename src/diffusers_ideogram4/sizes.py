"""Named model sizes: the released model and a tiny one for tests, conversion checks and benchmarks."""

import math

import torch

from .constants import TEXT_ENCODER_TAP_LAYERS, TOKEN_CHANNELS
from .fp8 import linear_weight_keys


# Transformer configs, in the hub `transformer/config.json` field names.
TRANSFORMER_SIZES = {
    "ideogram4": dict(
        in_channels=TOKEN_CHANNELS,
        num_layers=34,
        attention_head_dim=256,
        num_attention_heads=18,
        intermediate_size=12288,
        adaln_dim=512,
        llm_features_dim=4096 * len(TEXT_ENCODER_TAP_LAYERS),
        rope_theta=5_000_000,
        mrope_section=(24, 20, 20),
        norm_eps=1e-5,
    ),
    "tiny": dict(
        in_channels=TOKEN_CHANNELS,
        num_layers=2,
        attention_head_dim=64,
        num_attention_heads=2,
        intermediate_size=256,
        adaln_dim=32,
        llm_features_dim=16 * len(TEXT_ENCODER_TAP_LAYERS),
        rope_theta=5_000_000,
        mrope_section=(12, 10, 10),
        norm_eps=1e-5,
    ),
}

# Qwen3-VL text-model sizes (the vision tower is never run; the tiny one keeps it minimal).
TEXT_ENCODER_SIZES = {
    "ideogram4": dict(
        hidden_size=4096,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=12288,
        vocab_size=151936,
    ),
    # 36 layers so that every tapped layer (up to 35) exists, each of width 16.
    "tiny": dict(
        hidden_size=16,
        num_hidden_layers=36,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=32,
        vocab_size=512,
    ),
}


# nf4 as released (SPEC 2.2): bitsandbytes blocks of 64 weights, one float32 absmax each (compress_statistics=False).
NF4_BLOCK = 64


def weight_bytes(model: torch.nn.Module, weights: str) -> int:
    """Bytes of `model`'s weights stored as `weights` ("bf16", "fp8", "nf4"), from parameter shapes alone (a model on
    the meta device will do). fp8: one byte per Linear weight plus a float32 scale per row; nf4: half a byte plus a
    float32 absmax per block; everything else bf16."""
    if weights not in ("bf16", "fp8", "nf4"):
        raise ValueError(f"`weights` must be 'bf16', 'fp8' or 'nf4', got {weights!r}.")
    quantized = set(linear_weight_keys(model)) if weights != "bf16" else set()
    total = 0
    for name, parameter in model.named_parameters():
        count = parameter.numel()
        if name not in quantized:
            total += 2 * count
        elif weights == "fp8":
            total += count + 4 * parameter.shape[0]
        else:
            total += count // 2 + 4 * math.ceil(count / NF4_BLOCK)
    return total
