"""Facts about the released model, each named once (../shared/SPEC.md), and the table of named model sizes."""

import math


# Per-token roles in the packed sequence (SPEC 2). Anything else is padding.
TEXT_INDICATOR = 3
IMAGE_INDICATOR = 2
PADDING_INDICATOR = 0
# Segment id of padding tokens: they attend only among themselves, never to a prompt or an image.
PADDING_SEGMENT = -1

# Image tokens sit at (0, h, w) + this offset on every MRoPE axis, far from any text position.
IMAGE_POSITION_OFFSET = 65536

# VAE downsamples 8x and the transformer patchifies 2x2: one token per 16x16 pixels.
VAE_SCALE_FACTOR = 8
PATCH_SIZE = 2
PIXELS_PER_TOKEN = VAE_SCALE_FACTOR * PATCH_SIZE
LATENT_CHANNELS = 32
TOKEN_CHANNELS = LATENT_CHANNELS * PATCH_SIZE * PATCH_SIZE  # 128

# The one rename table between the original release's fused attention and the diffusers layout (SPEC 2.1): each
# fused module and the split modules its rows go to, in row order (qkv rows are [q; k; v], contiguous thirds).
FUSED_TO_SPLIT = {
    "attention.qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
    "attention.o": ("attention.to_out.0",),
}

# model_index.json entries of the hub repos for this package's classes: saved folders and converted repos name these,
# so that each component folder loads with diffusers' and transformers' own classes too.
OFFICIAL_ENTRIES = {
    "Ideogram4Transformer2DModel": ("diffusers", "Ideogram4Transformer2DModel"),
    "Ideogram4TextEncoder": ("transformers", "Qwen3VLModel"),
    "Ideogram4PromptEnhancerHead": ("diffusers", "Ideogram4PromptEnhancerHead"),
}

# Documented resolution range per side.
MIN_IMAGE_SIDE = 256
MAX_IMAGE_SIDE = 2048
DEFAULT_IMAGE_SIDE = 1024

# Text conditioning (SPEC 3): raw outputs of these Qwen3-VL decoder layers, interleaved feature-wise.
TEXT_ENCODER_TAP_LAYERS = (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 35)
MAX_TEXT_TOKENS = 2048  # including the chat template

# Sampler clamps (SPEC 4): model time tau in [TAU_MIN, TAU_MAX], 0 = noise, 1 = data.
LOGSNR_MIN = -15.0
LOGSNR_MAX = 18.0
TAU_MIN = 1.0 / (1.0 + math.exp(0.5 * LOGSNR_MAX))  # 1 / (1 + e^9)
TAU_MAX = 1.0 / (1.0 + math.exp(0.5 * LOGSNR_MIN))  # 1 / (1 + e^-7.5)
SCHEDULE_BASE_PIXELS = 512 * 512


# --------------------------------------------------------------------------------------------------------------------
# Named sizes: the released model and a tiny one for tests, conversion checks, benchmarks and `--model tiny-random`.

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

# The FLUX.2 VAE (diffusers' `AutoencoderKLFlux2` config); the tiny one is a few thousand parameters wide.
VAE_SIZES = {
    "tiny": dict(
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
    ),
}
