"""The caption format's facts (SPEC 7), each named once, and the shipped JSON Schema document.

`caption_schema.json` states everything a JSON Schema can; `checker.py` adds the few rules it cannot (key order,
min <= max in a bbox, integers written without a fraction, the ensure_ascii escape check). The tests check that the
schema's numbers and property orders agree with the constants below.
"""

import copy
import functools
import json
import re
from pathlib import Path


CAPTION_SCHEMA_PATH = Path(__file__).with_name("caption_schema.json")

# bbox values are [y_min, x_min, y_max, x_max], each axis normalized by its own side to 0..BBOX_MAX.
BBOX_MAX = 1000
BBOX_FIELDS = ("y_min", "x_min", "y_max", "x_max")

MAX_STYLE_PALETTE = 16
MAX_ELEMENT_PALETTE = 5
# Only uppercase hex digits were seen in training.
COLOR_PATTERN = re.compile(r"#[0-9A-F]{6}")
# The same colour with lowercase digits: an error whose fix is `.upper()`.
LOOSE_COLOR_PATTERN = re.compile(r"#[0-9A-Fa-f]{6}")

OBJECT_TYPE = "obj"
TEXT_TYPE = "text"
ELEMENT_TYPES = (OBJECT_TYPE, TEXT_TYPE)

# Key orders the model was trained on. A caption's keys must appear in these orders.
TOP_LEVEL_KEY_ORDER = ("high_level_description", "style_description", "compositional_deconstruction")
PHOTO_STYLE_KEY_ORDER = ("aesthetics", "lighting", "photo", "medium", "color_palette")
ART_STYLE_KEY_ORDER = ("aesthetics", "lighting", "medium", "art_style", "color_palette")
COMPOSITION_KEY_ORDER = ("background", "elements")
OBJECT_ELEMENT_KEY_ORDER = ("type", "bbox", "desc", "color_palette")
TEXT_ELEMENT_KEY_ORDER = ("type", "bbox", "text", "desc", "color_palette")
# Orders that agree with both variants of an object, used when a caption does not say which variant it is
# (a style with both or neither of photo / art_style, an element with a bad type) and by `canonicalize`.
STYLE_KEY_ORDER = ("aesthetics", "lighting", "photo", "medium", "art_style", "color_palette")
ELEMENT_KEY_ORDER = TEXT_ELEMENT_KEY_ORDER

# Not rules of the format, only advice: past this many elements the layout tends to be followed loosely.
MAX_RECOMMENDED_ELEMENTS = 12
# A valid caption nests 5 levels deep (root > composition > elements > element > bbox); anything much deeper is
# junk or a self-referencing dict, and is reported instead of walked.
MAX_NESTING_DEPTH = 32


@functools.lru_cache(maxsize=1)
def _schema() -> dict:
    with open(CAPTION_SCHEMA_PATH, encoding="utf-8") as file:
        return json.load(file)


def load_caption_schema() -> dict:
    """The caption JSON Schema (Draft 2020-12) as a new dict, safe to modify.

    Use it with any JSON Schema validator, e.g. `jsonschema.Draft202012Validator(load_caption_schema())`; the
    schema cannot state key order, bbox min <= max or the ensure_ascii check, so prefer `check_caption`.
    """
    return copy.deepcopy(_schema())
