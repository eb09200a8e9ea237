"""Structured JSON captions for Ideogram 4 (SPEC 7): schema, checker, builder, layout preview and CLI tools.

from diffusers_ideogram4.captions import Caption, TextElement, BBox, Style, check_caption

issues = check_caption(prompt)  # [] for a clean caption; each issue has path, message, hint, severity
"""

from .builder import BBox, Caption, ObjectElement, Style, TextElement, canonicalize, to_json
from .checker import (
    CAPTION_CHECK_MODES,
    CaptionError,
    CaptionIssue,
    CaptionWarning,
    check_caption,
    check_prompts,
    is_valid,
)
from .preview import render_layout
from .schema import (
    BBOX_MAX,
    CAPTION_SCHEMA_PATH,
    MAX_ELEMENT_PALETTE,
    MAX_STYLE_PALETTE,
    load_caption_schema,
)


__all__ = [
    "BBOX_MAX",
    "BBox",
    "CAPTION_CHECK_MODES",
    "CAPTION_SCHEMA_PATH",
    "Caption",
    "CaptionError",
    "CaptionIssue",
    "CaptionWarning",
    "MAX_ELEMENT_PALETTE",
    "MAX_STYLE_PALETTE",
    "ObjectElement",
    "Style",
    "TextElement",
    "canonicalize",
    "check_caption",
    "check_prompts",
    "is_valid",
    "load_caption_schema",
    "render_layout",
    "to_json",
]
