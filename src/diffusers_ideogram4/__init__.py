"""Ideogram 4 for Hugging Face diffusers."""

from .captions import (
    CAPTION_SCHEMA_PATH,
    BBox,
    Caption,
    CaptionError,
    CaptionIssue,
    CaptionWarning,
    ObjectElement,
    Style,
    TextElement,
    canonicalize,
    check_caption,
    check_prompts,
    load_caption_schema,
    render_layout,
)
from .loading import CheckpointMismatchError
from .pipeline_ideogram4 import Ideogram4Pipeline, Ideogram4PipelineOutput
from .sampler import PRESETS, SamplerPreset, model_times
from .text_encoder import Ideogram4TextEncoder, count_caption_tokens
from .transformer_ideogram4 import Ideogram4Transformer2DModel


__version__ = "0.1.0"

__all__ = [
    "BBox",
    "CAPTION_SCHEMA_PATH",
    "Caption",
    "CaptionError",
    "CaptionIssue",
    "CaptionWarning",
    "CheckpointMismatchError",
    "Ideogram4Pipeline",
    "Ideogram4PipelineOutput",
    "Ideogram4TextEncoder",
    "Ideogram4Transformer2DModel",
    "ObjectElement",
    "PRESETS",
    "SamplerPreset",
    "Style",
    "TextElement",
    "canonicalize",
    "check_caption",
    "check_prompts",
    "count_caption_tokens",
    "load_caption_schema",
    "model_times",
    "render_layout",
]
