"""Ideogram 4 for Hugging Face diffusers."""

from .loading import CheckpointMismatchError
from .pipeline_ideogram4 import Ideogram4Pipeline, Ideogram4PipelineOutput
from .sampler import PRESETS, SamplerPreset, model_times
from .text_encoder import Ideogram4TextEncoder, count_caption_tokens
from .transformer_ideogram4 import Ideogram4Transformer2DModel


__version__ = "0.1.0"

__all__ = [
    "CheckpointMismatchError",
    "Ideogram4Pipeline",
    "Ideogram4PipelineOutput",
    "Ideogram4TextEncoder",
    "Ideogram4Transformer2DModel",
    "PRESETS",
    "SamplerPreset",
    "count_caption_tokens",
    "model_times",
]
