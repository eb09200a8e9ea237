"""Facts about the released model, each named once (../shared/SPEC.md)."""

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

# Attention Linears whose keys differ between the original release (fused) and the diffusers layout (SPEC 2.1).
FUSED_QKV, FUSED_OUT = "attention.qkv", "attention.o"
SPLIT_QKV = ("attention.to_q", "attention.to_k", "attention.to_v")
SPLIT_OUT = "attention.to_out.0"

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
