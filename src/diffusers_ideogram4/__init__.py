"""Ideogram 4 for Hugging Face diffusers.

The caption tools import eagerly (they need neither torch nor diffusers, so `ideogram4 caption ...` starts fast);
the models and the pipeline load on first use. Importing the package points diffusers' AutoPipelines at this
package's pipelines for Ideogram 4 (`autopipeline.py`).
"""

import importlib

from .autopipeline import install_auto_pipelines
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


__version__ = "0.1.0"

install_auto_pipelines()

_LAZY = {
    "CheckpointMismatchError": ".loading",
    "Ideogram4Pipeline": ".pipeline_ideogram4",
    "Ideogram4PipelineOutput": ".pipeline_ideogram4",
    "Ideogram4PromptEnhancerHead": ".prompt_expansion",
    "CaptionLimits": ".captions.grammar",
    "Ideogram4Img2ImgPipeline": ".pipeline_ideogram4_edit",
    "Ideogram4InpaintPipeline": ".pipeline_ideogram4_edit",
    "expand_canvas": ".canvas",
    "expand_caption": ".canvas",
    "mask_from_caption": ".canvas",
    "overlay_mask": ".canvas",
    "repainted_area": ".canvas",
    "PRESETS": ".sampler",
    "SamplerPreset": ".sampler",
    "model_times": ".sampler",
    "Ideogram4LoraLoaderMixin": ".lora",
    "Ideogram4UnconditionalLoraMixin": ".unconditional_lora",
    "extract_unconditional_lora": ".lora_extraction",
    "convert_lora_state_dict": ".lora_formats",
    "Ideogram4TextEncoder": ".text_encoder",
    "count_caption_tokens": ".text_encoder",
    "Ideogram4Transformer2DModel": ".transformer_ideogram4",
    "generate_batch": ".batch",
    "ModelSpec": ".recipe",
    "read_recipe": ".recipe",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BBox",
    "CAPTION_SCHEMA_PATH",
    "Caption",
    "CaptionError",
    "CaptionIssue",
    "CaptionWarning",
    "ObjectElement",
    "Style",
    "TextElement",
    "canonicalize",
    "check_caption",
    "check_prompts",
    "load_caption_schema",
    "render_layout",
    *_LAZY,
]
