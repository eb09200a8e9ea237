"""Structured JSON captions (SPEC 7): schema, checker, pipeline helpers, builder, canonical form, preview, CLI."""

import argparse
import copy
import dataclasses
import io
import json
import pickle
import random
import warnings

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffusers_ideogram4.captions import (
    BBOX_MAX,
    CAPTION_SCHEMA_PATH,
    MAX_ELEMENT_PALETTE,
    MAX_STYLE_PALETTE,
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
    is_valid,
    load_caption_schema,
    render_layout,
    to_json,
)
from diffusers_ideogram4.captions.cli import add_caption_commands
from diffusers_ideogram4.captions.preview import (
    LABEL_MAX_CHARS,
    LEGEND_BACKGROUND,
    OUTLINE_COLORS,
    _font,
    _label_text,
    bbox_to_pixels,
)
from diffusers_ideogram4.captions.schema import (
    ART_STYLE_KEY_ORDER,
    COMPOSITION_KEY_ORDER,
    ELEMENT_KEY_ORDER,
    MAX_RECOMMENDED_ELEMENTS,
    OBJECT_ELEMENT_KEY_ORDER,
    PHOTO_STYLE_KEY_ORDER,
    STYLE_KEY_ORDER,
    TEXT_ELEMENT_KEY_ORDER,
    TOP_LEVEL_KEY_ORDER,
)


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A realistic caption: a festival poster, photographic style, two text elements with boxes and palettes, one object.
VALID = {
    "high_level_description": "A summer music festival poster: a photo of a crowd at sunset, the festival name at the "
    "top and the dates at the bottom.",
    "style_description": {
        "aesthetics": "energetic, warm, high contrast",
        "lighting": "golden hour backlight with a soft lens flare",
        "photo": "wide angle 24mm, shallow depth of field, light film grain",
        "medium": "photograph",
        "color_palette": ["#FF7A00", "#FFD23F", "#1B1B3A", "#FFFFFF"],
    },
    "compositional_deconstruction": {
        "background": "a festival crowd with raised hands, silhouetted against an orange sunset sky",
        "elements": [
            {
                "type": "text",
                "bbox": [60, 80, 220, 920],
                "text": "SUNSET SOUNDS",
                "desc": "huge bold condensed sans-serif title, white with a soft orange glow",
                "color_palette": ["#FFFFFF", "#FF7A00"],
            },
            {
                "type": "text",
                "bbox": [840, 200, 930, 800],
                "text": "JULY 12–14 · RIVERSIDE PARK",
                "desc": "small uppercase sans-serif, evenly spaced",
                "color_palette": ["#FFD23F"],
            },
            {"type": "obj", "bbox": [300, 350, 780, 650], "desc": "a singer on stage with a microphone, backlit"},
        ],
    },
}
VALID_TEXT = json.dumps(VALID, ensure_ascii=False, separators=(",", ":"))

COMPOSITION = ("compositional_deconstruction",)
ELEMENTS = COMPOSITION + ("elements",)
DELETE = object()


def mutated(*changes) -> dict:
    """A deep copy of VALID with (path, value) changes applied; value DELETE removes the key."""
    caption = copy.deepcopy(VALID)
    for path, value in changes:
        parent = caption
        for part in path[:-1]:
            parent = parent[part]
        if value is DELETE:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    return caption


def reordered(obj: dict, keys: list) -> dict:
    return {key: obj[key] for key in keys}


def error_paths(caption) -> list[str]:
    return [issue.path for issue in check_caption(caption) if issue.is_error]


def warning_paths(caption) -> list[str]:
    return [issue.path for issue in check_caption(caption) if not issue.is_error]


# ---------------------------------------------------------------------------------------------------------------------
# The schema document
# ---------------------------------------------------------------------------------------------------------------------


def test_schema_is_a_valid_draft_2020_12_document_with_metadata():
    schema = load_caption_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] and schema["title"] and schema["description"]
    assert CAPTION_SCHEMA_PATH.is_file() and json.loads(CAPTION_SCHEMA_PATH.read_text(encoding="utf-8")) == schema


def test_schema_agrees_with_the_constants():
    schema = load_caption_schema()
    defs = schema["$defs"]
    assert tuple(schema["properties"]) == TOP_LEVEL_KEY_ORDER
    assert tuple(defs["style_description"]["properties"]) == STYLE_KEY_ORDER
    assert tuple(defs["compositional_deconstruction"]["properties"]) == COMPOSITION_KEY_ORDER
    assert tuple(defs["element"]["properties"]) == ELEMENT_KEY_ORDER == TEXT_ELEMENT_KEY_ORDER
    assert defs["style_description"]["properties"]["color_palette"]["maxItems"] == MAX_STYLE_PALETTE == 16
    assert defs["element"]["properties"]["color_palette"]["maxItems"] == MAX_ELEMENT_PALETTE == 5
    assert (defs["coordinate"]["minimum"], defs["coordinate"]["maximum"]) == (0, BBOX_MAX) == (0, 1000)
    assert defs["bbox"]["minItems"] == defs["bbox"]["maxItems"] == 4
    # The merged orders agree with each variant's own order.
    for merged, variant in (
        (STYLE_KEY_ORDER, PHOTO_STYLE_KEY_ORDER),
        (STYLE_KEY_ORDER, ART_STYLE_KEY_ORDER),
        (ELEMENT_KEY_ORDER, OBJECT_ELEMENT_KEY_ORDER),
    ):
        assert [key for key in merged if key in variant] == list(variant)


def test_load_caption_schema_returns_a_fresh_copy():
    schema = load_caption_schema()
    schema["title"] = "changed"
    assert load_caption_schema()["title"] != "changed"


def test_valid_example_passes_the_schema_and_the_checker():
    assert list(jsonschema.Draft202012Validator(load_caption_schema()).iter_errors(VALID)) == []
    assert check_caption(VALID_TEXT) == []
    assert check_caption(VALID) == []
    assert is_valid(VALID_TEXT)


def test_schema_alone_rejects_what_it_can_state():
    validator = jsonschema.Draft202012Validator(load_caption_schema())
    both = mutated((("style_description", "art_style"), "x"))
    text_on_obj = mutated((ELEMENTS + (2, "text"), "x"))
    lowercase = mutated((ELEMENTS + (0, "color_palette"), ["#ff7a00"]))
    for caption in (both, text_on_obj, lowercase, mutated((ELEMENTS + (0, "bbox"), [0, 0, 1001, 5]))):
        assert not validator.is_valid(caption)
        assert not is_valid(caption)


# ---------------------------------------------------------------------------------------------------------------------
# Each rule: a valid and an invalid case, with the exact paths
# ---------------------------------------------------------------------------------------------------------------------

E0, E1, E2 = (ELEMENTS + (index,) for index in range(3))


def el(index: int, rest: str = "") -> str:
    """The path string of element `index`, e.g. el(0, ".bbox[1]")."""
    return f"compositional_deconstruction.elements[{index}]{rest}"


STYLE = ("style_description",)
ART_STYLE = {"aesthetics": "flat", "lighting": "even", "medium": "screen print", "art_style": "art deco poster"}

VALID_CASES = {
    "empty elements": mutated((ELEMENTS, [])),
    "no style_description": mutated((STYLE, DELETE)),
    "art style": mutated((STYLE, ART_STYLE)),
    "style without palette": mutated((STYLE + ("color_palette",), DELETE)),
    "style palette of 16": mutated((STYLE + ("color_palette",), ["#000000"] * 16)),
    "element palette of 5": mutated((E0 + ("color_palette",), ["#ABCDEF"] * 5)),
    "empty palette": mutated((E0 + ("color_palette",), [])),
    "element without bbox and palette": mutated((E0 + ("bbox",), DELETE), (E0 + ("color_palette",), DELETE)),
    "zero-size bbox": mutated((E2 + ("bbox",), [500, 500, 500, 500])),
    "full bbox": mutated((E2 + ("bbox",), [0, 0, 1000, 1000])),
    "line break in text": mutated((E0 + ("text",), "SUNSET\nSOUNDS")),
    "minimal": {"compositional_deconstruction": {"background": "a cat on a mat", "elements": []}},
}


@pytest.mark.parametrize("caption", VALID_CASES.values(), ids=VALID_CASES.keys())
def test_valid_variants_have_no_errors(caption):
    assert error_paths(caption) == []
    assert list(jsonschema.Draft202012Validator(load_caption_schema()).iter_errors(caption)) == []


INVALID_CASES = {
    # structure
    "missing compositional_deconstruction": (mutated((ELEMENTS[:1], DELETE)), ["compositional_deconstruction"]),
    "composition not an object": (mutated((ELEMENTS[:1], [])), ["compositional_deconstruction"]),
    "missing background": (mutated((COMPOSITION + ("background",), DELETE)), [f"{COMPOSITION[0]}.background"]),
    "missing elements": (mutated((ELEMENTS, DELETE)), ["compositional_deconstruction.elements"]),
    "elements not a list": (mutated((ELEMENTS, {})), ["compositional_deconstruction.elements"]),
    "element not an object": (mutated((E1, "a title")), [el(1)]),
    "style not an object": (mutated((STYLE, "moody")), ["style_description"]),
    "style null": (mutated((STYLE, None)), ["style_description"]),
    # unknown keys
    "unknown top-level key": (mutated((("negative_prompt",), "blurry")), ["negative_prompt"]),
    "unknown style key": (mutated((STYLE + ("mood",), "calm")), ["style_description.mood"]),
    "unknown element key": (mutated((E2 + ("colour_palette",), [])), [el(2, ".colour_palette")]),
    "key with a space": (mutated((E2 + ("font size",), 3)), [el(2, '["font size"]')]),
    # element types and their keys
    "unknown element type": (mutated((E2 + ("type",), "image")), [el(2, ".type")]),
    "missing type": (mutated((E2 + ("type",), DELETE)), [el(2, ".type")]),
    "text on an obj element": (mutated((E2 + ("text",), "HI")), [el(2, ".text")]),
    "text element without text": (mutated((E0 + ("text",), DELETE)), [el(0, ".text")]),
    "missing desc": (mutated((E2 + ("desc",), DELETE)), [el(2, ".desc")]),
    # strings (the reference does not check these types, we do)
    "desc not a string": (mutated((E2 + ("desc",), 5)), [el(2, ".desc")]),
    "text not a string": (mutated((E0 + ("text",), ["SUNSET"])), [el(0, ".text")]),
    "background not a string": (mutated((COMPOSITION + ("background",), None)), [f"{COMPOSITION[0]}.background"]),
    "high_level_description not a string": (mutated((("high_level_description",), 1)), ["high_level_description"]),
    "aesthetics not a string": (mutated((STYLE + ("aesthetics",), ["warm"])), ["style_description.aesthetics"]),
    "photo not a string": (mutated((STYLE + ("photo",), {"lens": "24mm"})), ["style_description.photo"]),
    "art_style not a string": (mutated((STYLE, {**ART_STYLE, "art_style": 3})), ["style_description.art_style"]),
    # style
    "missing medium": (mutated((STYLE + ("medium",), DELETE)), ["style_description.medium"]),
    "photo and art_style": (
        mutated((STYLE, {"aesthetics": "a", "lighting": "b", "photo": "c", "medium": "d", "art_style": "e"})),
        ["style_description"],
    ),
    "neither photo nor art_style": (mutated((STYLE + ("photo",), DELETE)), ["style_description"]),
    # bbox
    "bbox of 3": (mutated((E0 + ("bbox",), [60, 80, 220])), [el(0, ".bbox")]),
    "bbox of 5": (mutated((E0 + ("bbox",), [60, 80, 220, 920, 1])), [el(0, ".bbox")]),
    "bbox float 10.0": (mutated((E0 + ("bbox",), [60, 10.0, 220, 920])), [el(0, ".bbox[1]")]),
    "bbox float 10.5": (mutated((E0 + ("bbox",), [60, 10.5, 220, 920])), [el(0, ".bbox[1]")]),
    "bbox bool": (mutated((E0 + ("bbox",), [60, 80, 220, True])), [el(0, ".bbox[3]")]),
    "bbox string value": (mutated((E0 + ("bbox",), ["60", 80, 220, 920])), [el(0, ".bbox[0]")]),
    "bbox below 0": (mutated((E0 + ("bbox",), [-1, 80, 220, 920])), [el(0, ".bbox[0]")]),
    "bbox above 1000": (mutated((E0 + ("bbox",), [60, 80, 1001, 920])), [el(0, ".bbox[2]")]),
    "bbox y_min > y_max": (mutated((E0 + ("bbox",), [220, 80, 60, 920])), [el(0, ".bbox")]),
    "bbox x_min > x_max": (mutated((E0 + ("bbox",), [60, 920, 220, 80])), [el(0, ".bbox")]),
    "bbox both inverted": (
        mutated((E0 + ("bbox",), [220, 920, 60, 80])),
        [el(0, ".bbox")] * 2,
    ),
    "bbox inverted next to a float": (
        mutated((E0 + ("bbox",), [220, 80.5, 60, 920])),
        [el(0, ".bbox"), el(0, ".bbox[1]")],
    ),
    "bbox null": (mutated((E0 + ("bbox",), None)), [el(0, ".bbox")]),
    "bbox an object": (mutated((E0 + ("bbox",), {"x": 1})), [el(0, ".bbox")]),
    # palettes
    "lowercase colour": (
        mutated((E0 + ("color_palette",), ["#FFFFFF", "#ff7a00"])),
        [el(0, ".color_palette[1]")],
    ),
    "named colour": (mutated((STYLE + ("color_palette",), ["orange"])), ["style_description.color_palette[0]"]),
    # JSON Schema's `$` is ECMA's (end of string), not Python's (also before a final newline)
    "colour with a trailing newline": (
        mutated((E0 + ("color_palette",), ["#FFFFFF\n"])),
        [el(0, ".color_palette[0]")],
    ),
    "short hex": (mutated((STYLE + ("color_palette",), ["#FFF"])), ["style_description.color_palette[0]"]),
    "colour not a string": (mutated((STYLE + ("color_palette",), [16777215])), ["style_description.color_palette[0]"]),
    "palette a string": (mutated((STYLE + ("color_palette",), "#FFFFFF")), ["style_description.color_palette"]),
    "style palette of 17": (
        mutated((STYLE + ("color_palette",), ["#000000"] * 17)),
        ["style_description.color_palette"],
    ),
    "element palette of 6": (
        mutated((E1 + ("color_palette",), ["#000000"] * 6)),
        [el(1, ".color_palette")],
    ),
    # key order
    "style order": (
        mutated(
            (
                STYLE,
                reordered(VALID["style_description"], ["aesthetics", "lighting", "medium", "photo", "color_palette"]),
            )
        ),
        ["style_description"],
    ),
    "art style order": (
        mutated((STYLE, reordered(ART_STYLE, ["aesthetics", "lighting", "art_style", "medium"]))),
        ["style_description"],
    ),
    "composition order": (
        mutated((ELEMENTS[:1], reordered(VALID["compositional_deconstruction"], ["elements", "background"]))),
        ["compositional_deconstruction"],
    ),
    "element order": (
        mutated(
            (
                E0,
                reordered(
                    VALID["compositional_deconstruction"]["elements"][0],
                    ["type", "text", "bbox", "desc", "color_palette"],
                ),
            )
        ),
        [el(0)],
    ),
    "palette before desc": (
        mutated((E2, {"type": "obj", "color_palette": ["#000000"], "desc": "x"})),
        [el(2)],
    ),
}


@pytest.mark.parametrize("caption, expected", INVALID_CASES.values(), ids=INVALID_CASES.keys())
def test_invalid_variants_report_exact_paths(caption, expected):
    assert error_paths(caption) == expected
    assert not is_valid(caption)
    # The same caption as text gives the same errors.
    assert error_paths(json.dumps(caption, ensure_ascii=False, separators=(",", ":"))) == expected


def test_messages_and_hints_name_the_fix():
    lowercase = check_caption(mutated((E0 + ("color_palette",), ["#ff7a00"])))
    assert [str(issue) for issue in lowercase] == [
        "compositional_deconstruction.elements[0].color_palette[0]: colour '#ff7a00' has lowercase hex digits "
        "(write '#FF7A00')"
    ]
    [misspelt] = check_caption(mutated((E2 + ("colour_palette",), [])))
    assert misspelt.message == "unknown key 'colour_palette'" and misspelt.hint == "did you mean 'color_palette'?"
    [unknown] = check_caption(mutated((("negative_prompt",), "blurry")))
    assert "allowed keys here: high_level_description, style_description, compositional_deconstruction" in unknown.hint
    [order] = check_caption(
        reordered(VALID, ["compositional_deconstruction", "high_level_description", "style_description"])
    )
    assert order.path == "$"
    assert "high_level_description, style_description, compositional_deconstruction" in order.hint
    assert "canonicalize" in order.hint
    [floaty] = check_caption(mutated((E0 + ("bbox",), [60, 10.0, 220, 920])))
    assert floaty.message == "expected an integer, got number 10.0" and floaty.hint.startswith("write 10, not 10.0")
    [inverted] = check_caption(mutated((E0 + ("bbox",), [220, 80, 60, 920])))
    assert inverted.message == "y_min 220 > y_max 60 (bbox[0] > bbox[2])"
    [both] = check_caption(
        mutated((STYLE, {"aesthetics": "a", "lighting": "b", "photo": "c", "medium": "d", "art_style": "e"}))
    )
    assert both.message == "has both 'photo' and 'art_style'; a style is one or the other"
    [missing] = check_caption(mutated((E0 + ("text",), DELETE)))
    assert missing.message == "missing required key 'text'" and "literal string to render" in missing.hint


def test_caption_issue_is_a_frozen_one_line_record():
    issue = CaptionIssue(el(2, ".bbox[1]"), "1200 is out of range 0..1000", "use 0..1000")
    assert str(issue) == "compositional_deconstruction.elements[2].bbox[1]: 1200 is out of range 0..1000 (use 0..1000)"
    assert str(CaptionIssue("$", "caption is empty")) == "$: caption is empty"
    assert issue.severity == "error" and issue.is_error
    with pytest.raises(dataclasses.FrozenInstanceError):
        issue.path = "$"


def test_issues_come_in_caption_order_all_at_once():
    caption = mutated(
        (E2 + ("bbox",), [0, 0, 2000, 5]),
        (("high_level_description",), 3),
        (E0 + ("color_palette",), ["#abcdef"]),
        (STYLE + ("photo",), DELETE),
    )
    assert error_paths(caption) == [
        "high_level_description",
        "style_description",
        "compositional_deconstruction.elements[0].color_palette[0]",
        "compositional_deconstruction.elements[2].bbox[2]",
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Warnings: valid captions likely to generate worse images
# ---------------------------------------------------------------------------------------------------------------------

WARNING_CASES = {
    "empty desc": ([(E2 + ("desc",), "")], ["compositional_deconstruction.elements[2].desc"]),
    "blank text": ([(E0 + ("text",), "  ")], ["compositional_deconstruction.elements[0].text"]),
    "no high_level_description": ([(("high_level_description",), DELETE)], ["high_level_description"]),
    "13 elements": (
        [(ELEMENTS, [{"type": "obj", "desc": f"star {i}"} for i in range(MAX_RECOMMENDED_ELEMENTS + 1)])],
        ["compositional_deconstruction.elements"],
    ),
    "overlapping text boxes": ([(E1 + ("bbox",), [200, 100, 300, 500])], [el(1, ".bbox")]),
    "touching text boxes": ([(E1 + ("bbox",), [220, 80, 300, 920])], []),
    "text over an object": ([(E1 + ("bbox",), [400, 400, 500, 600])], []),
    "12 elements": ([(ELEMENTS, [{"type": "obj", "desc": "x"}] * MAX_RECOMMENDED_ELEMENTS)], []),
}


@pytest.mark.parametrize("changes, expected", WARNING_CASES.values(), ids=WARNING_CASES.keys())
def test_warnings_do_not_invalidate(changes, expected):
    caption = mutated(*changes)
    assert error_paths(caption) == []
    assert warning_paths(caption) == expected
    assert is_valid(caption)


def test_top_level_key_order_is_a_warning():
    """As in the reference verifier, which checks the order of the nested objects only; `caption format` fixes it."""
    caption = reordered(VALID, ["compositional_deconstruction", "high_level_description", "style_description"])
    [issue] = check_caption(caption)
    assert (issue.path, issue.severity) == ("$", "warning") and is_valid(caption)
    assert issue.message == (
        "keys out of order: got compositional_deconstruction, high_level_description, style_description; expected "
        "high_level_description, style_description, compositional_deconstruction"
    )
    assert "`ideogram4 caption format FILE`" in issue.hint
    assert check_caption(canonicalize(caption)) == []


def test_text_level_warnings():
    pretty = json.dumps(VALID, ensure_ascii=False, indent=2)
    assert [(issue.path, issue.severity) for issue in check_caption(pretty)] == [("$", "warning")]
    assert "minified" in check_caption(pretty)[0].message and is_valid(pretty)
    [newline] = check_caption(VALID_TEXT + "\n")
    assert (newline.path, newline.severity) == ("$", "warning") and "whitespace around the JSON" in newline.message
    duplicated = VALID_TEXT.replace('"desc":"a singer', '"desc":"first","desc":"a singer')
    assert [(issue.path, issue.severity) for issue in check_caption(duplicated)] == [
        ("compositional_deconstruction.elements[2].desc", "warning")
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Text input: JSON errors, plain text, ensure_ascii
# ---------------------------------------------------------------------------------------------------------------------


def test_ensure_ascii_escapes_are_flagged():
    escaped = json.dumps(VALID, separators=(",", ":"))  # ensure_ascii=True: "JULY 12\u201314 ..."
    [issue] = check_caption(escaped)
    assert (issue.path, issue.severity) == ("$", "error") and "ensure_ascii=True" in issue.message
    assert "\\u2013" in issue.message and "ensure_ascii=False" in issue.hint
    # Not flagged: ASCII escapes, an escaped backslash (literal text), escapes next to literal non-ASCII text.
    ascii_only = to_json(mutated((E1 + ("text",), "JULY 12-14")))
    assert ascii_only.isascii() and check_caption(ascii_only) == []
    assert error_paths(ascii_only.replace("SUNSET", "\\u0053UNSET")) == []
    assert error_paths(ascii_only.replace("SUNSET", "SUNSET \\\\u00e9")) == []
    assert error_paths(ascii_only.replace("SUNSET", "SUNS\\u00c9T")) == ["$"]
    assert error_paths(VALID_TEXT.replace("SUNSET", "SUNS\\u00c9T")) == []  # the text also holds a literal "–"


def test_invalid_json_reports_the_position():
    [issue] = check_caption('{"compositional_deconstruction": }')
    assert issue.path == "$"
    assert issue.message == "invalid JSON: Expecting value at line 1 column 34 (char 33)"


def test_plain_text_says_what_to_do():
    [issue] = check_caption("a cat on a mat")
    assert issue.path == "$" and issue.message.startswith("plain text, not a structured JSON caption")
    assert "Caption" in issue.hint and "JSON caption" in issue.hint
    for way in ("prompt_upsampling=True", "pipe.expand_prompt(idea)", '`ideogram4 caption expand "idea"`'):
        assert way in issue.hint


@pytest.mark.parametrize(
    "caption, message",
    [
        ("", "caption is empty"),
        ("[]", "a caption is a JSON object, got array []"),
        ("null", "a caption is a JSON object, got null"),
        ("42", "a caption is a JSON object, got integer 42"),
        (json.dumps(VALID_TEXT), "caption is a JSON string that holds JSON"),
        (None, "expected a JSON string or a dict, got NoneType None"),
        (b"{}", "expected a JSON string or a dict, got bytes b'{}'"),
        ([VALID], "expected a JSON string or a dict, got list"),
    ],
)
def test_wrong_top_level_is_one_root_issue(caption, message):
    [issue] = check_caption(caption)
    assert issue.path == "$" and issue.is_error and issue.message.startswith(message)


# ---------------------------------------------------------------------------------------------------------------------
# Never raises
# ---------------------------------------------------------------------------------------------------------------------


def nested(depth: int):
    value = "x"
    for _ in range(depth):
        value = [value]
    return value


def test_malformed_inputs_are_issues_not_exceptions():
    cyclic = copy.deepcopy(VALID)
    cyclic["compositional_deconstruction"]["elements"].append(cyclic)
    odd_keys = {1: "x", ("a", "b"): 2, **VALID}
    cases = {
        "deep JSON text": "[" * 100_000,
        "deep dict value": mutated((E2 + ("desc",), nested(50_000))),
        "cyclic dict": cyclic,
        "non-string keys": odd_keys,
        "unhashable type": mutated((E2 + ("type",), ["obj"])),
        "dict type": mutated((E2 + ("type",), {"obj": 1})),
        "NaN bbox": VALID_TEXT.replace("[300,350,780,650]", "[NaN,350,Infinity,-Infinity]"),
        "huge int": mutated((E2 + ("bbox",), [10**5000, 0, 0, 0])),
        "huge int text": VALID_TEXT.replace("[300,", "[" + "9" * 5000 + ","),
        "set value": mutated((E2 + ("desc",), {1, 2})),
    }
    for name, caption in cases.items():
        issues = check_caption(caption)
        assert all(isinstance(issue, CaptionIssue) for issue in issues), name
        assert any(issue.is_error for issue in issues), name
    assert [issue.path for issue in check_caption(odd_keys)] == ["[1]", "[('a', 'b')]"]
    surrogate = mutated((E0 + ("text",), "\ud800"))
    assert check_caption(surrogate) == check_caption(json.dumps(surrogate, ensure_ascii=False, separators=(",", ":")))
    assert error_paths(cases["NaN bbox"]) == [f"compositional_deconstruction.elements[2].bbox[{i}]" for i in (0, 2, 3)]


def test_huge_strings_are_clipped_in_messages():
    huge = "x" * 5_000_000
    for caption in (mutated((E2 + ("desc",), [huge])), mutated(((huge,), 1)), huge):
        issues = check_caption(caption)
        assert issues and all(len(str(issue)) < 600 for issue in issues)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)


@FAST
@given(json_values)
def test_random_json_never_crashes(value):
    for caption in (value, json.dumps(value), json.dumps(value, ensure_ascii=False, indent=1)):
        issues = check_caption(caption)
        assert all(isinstance(issue, CaptionIssue) and issue.severity in ("error", "warning") for issue in issues)


@FAST
@given(st.text())
def test_random_text_never_crashes(text):
    assert all(isinstance(issue, CaptionIssue) for issue in check_caption(text))


def test_objects_that_raise_when_compared_or_shown_are_an_issue_not_a_crash():
    class Hostile:
        def __repr__(self):
            raise RuntimeError("boom")

        def __eq__(self, other):
            raise RuntimeError("eq")

        __hash__ = object.__hash__

    for caption in (
        {"compositional_deconstruction": {"background": Hostile(), "elements": []}},
        {Hostile(): 1, "compositional_deconstruction": {"background": "x", "elements": []}},
    ):
        issues = check_caption(caption)
        assert any(issue.is_error for issue in issues), issues


def paths_in(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths_in(child, path + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from paths_in(child, path + (index,))


VALID_PATHS = [path for path in paths_in(VALID) if path]
KNOWN_KEYS = sorted(set(TOP_LEVEL_KEY_ORDER + STYLE_KEY_ORDER + COMPOSITION_KEY_ORDER + ELEMENT_KEY_ORDER))


def mutate(caption: dict, path: tuple, action: str, value) -> None:
    """Set, delete or rename the key / item at `path`, if the path still exists."""
    try:
        parent = caption
        for part in path[:-1]:
            parent = parent[part]
        if action == "delete":
            del parent[path[-1]]
        elif action == "rename" and isinstance(parent, dict):
            parent[value if isinstance(value, str) else str(value)] = parent.pop(path[-1])
        else:
            parent[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        pass


@FAST
@given(
    st.lists(
        st.tuples(
            st.sampled_from(VALID_PATHS),
            st.sampled_from(["set", "delete", "rename"]),
            json_values | st.sampled_from(KNOWN_KEYS),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_captions_never_crash(changes):
    caption = copy.deepcopy(VALID)
    for path, action, value in changes:
        mutate(caption, path, action, value)
    for form in (caption, json.dumps(caption, ensure_ascii=False, separators=(",", ":")), json.dumps(caption)):
        issues = check_caption(form)
        assert all(isinstance(issue, CaptionIssue) for issue in issues)
        assert is_valid(form) == (not any(issue.is_error for issue in issues))


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline helpers
# ---------------------------------------------------------------------------------------------------------------------

BAD = to_json(mutated((E0 + ("bbox",), [220, 80, 60, 920])))
NO_SUMMARY = to_json(mutated((("high_level_description",), DELETE)))


def test_check_prompts_error_mode_raises_with_every_issue():
    with pytest.raises(CaptionError) as raised:
        check_prompts([BAD])
    error = raised.value
    assert isinstance(error, ValueError)
    assert [(index, issue.path) for index, issue in error.issues] == [(0, el(0, ".bbox"))]
    lines = str(error).splitlines()
    assert lines[0] == "caption check found 1 error:"
    assert lines[1].startswith("compositional_deconstruction.elements[0].bbox: y_min 220 > y_max 60")
    assert 'caption_check="off"' in lines[-1]


def test_check_prompts_batches_prefix_the_prompt_index():
    with pytest.raises(CaptionError) as raised:
        check_prompts([VALID_TEXT, BAD, "a cat on a mat"])
    assert [(index, issue.path) for index, issue in raised.value.issues] == [
        (1, "compositional_deconstruction.elements[0].bbox"),
        (2, "$"),
    ]
    lines = str(raised.value).splitlines()
    assert lines[1].startswith("prompt[1] compositional_deconstruction.elements[0].bbox: ")
    assert lines[2].startswith("prompt[2] $: plain text")


def test_plain_text_prompt_error_says_what_to_do():
    with pytest.raises(CaptionError) as raised:
        check_prompts("a cat on a mat")
    message = str(raised.value)
    assert "structured JSON caption" in message and "diffusers_ideogram4.Caption" in message
    assert 'caption_check="off"' in message


def test_check_prompts_warnings_never_raise():
    with pytest.warns(CaptionWarning, match="high_level_description"):
        check_prompts([NO_SUMMARY], mode="error")
    with pytest.warns(CaptionWarning, match=r"elements\[0\]\.bbox"):
        check_prompts([BAD], mode="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_prompts([VALID_TEXT], mode="error")
        check_prompts(["a cat on a mat", BAD], mode="off")
    assert issubclass(CaptionWarning, UserWarning)


@pytest.mark.parametrize("mode", ["loud", "", None, "ERROR"])
def test_check_prompts_rejects_unknown_modes(mode):
    with pytest.raises(ValueError, match="caption_check") as raised:
        check_prompts([VALID_TEXT], mode=mode)
    assert repr(mode) in str(raised.value) and '"error", "warn", "off"' in str(raised.value)


def test_caption_error_pickles():
    with pytest.raises(CaptionError) as raised:
        check_prompts([BAD, BAD])
    clone = pickle.loads(pickle.dumps(raised.value))
    assert str(clone) == str(raised.value) and clone.issues == raised.value.issues


# ---------------------------------------------------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------------------------------------------------


def valid_caption_object() -> Caption:
    return Caption(
        high_level_description=VALID["high_level_description"],
        style=Style(
            aesthetics="energetic, warm, high contrast",
            lighting="golden hour backlight with a soft lens flare",
            photo="wide angle 24mm, shallow depth of field, light film grain",
            medium="photograph",
            color_palette=["#FF7A00", "#FFD23F", "#1B1B3A", "#FFFFFF"],
        ),
        background="a festival crowd with raised hands, silhouetted against an orange sunset sky",
        elements=[
            TextElement(
                text="SUNSET SOUNDS",
                desc="huge bold condensed sans-serif title, white with a soft orange glow",
                bbox=BBox(60, 80, 220, 920),
                color_palette=["#FFFFFF", "#FF7A00"],
            ),
            TextElement(
                text="JULY 12–14 · RIVERSIDE PARK",
                desc="small uppercase sans-serif, evenly spaced",
                bbox=[840, 200, 930, 800],
                color_palette=("#FFD23F",),
            ),
            ObjectElement(desc="a singer on stage with a microphone, backlit", bbox=BBox(300, 350, 780, 650)),
        ],
    )


def test_builder_emits_the_canonical_text():
    caption = valid_caption_object()
    assert caption.to_json() == VALID_TEXT
    assert caption.to_dict() == VALID and json.dumps(caption.to_dict()) == json.dumps(VALID)
    assert Caption.from_json(VALID_TEXT) == caption == Caption.from_json(VALID)
    assert Caption.from_json(caption.to_json()).to_json() == caption.to_json()


def test_builder_minimal_and_empty_palettes():
    caption = Caption(background="plain white", elements=[ObjectElement(desc="a cup", color_palette=[])])
    assert caption.to_json() == (
        '{"compositional_deconstruction":{"background":"plain white","elements":[{"type":"obj","desc":"a cup",'
        '"color_palette":[]}]}}'
    )
    art = Style(aesthetics="a", lighting="b", medium="c", art_style="d", color_palette=["#000000"])
    assert list(art.to_dict()) == list(ART_STYLE_KEY_ORDER)
    assert isinstance(TextElement(text="A", desc="b"), TextElement) and not isinstance(
        TextElement(text="A", desc="b"), ObjectElement
    )


def test_from_json_raises_caption_error_with_every_issue():
    with pytest.raises(CaptionError) as raised:
        Caption.from_json(mutated((E0 + ("bbox",), [220, 80, 60, 920]), (E2 + ("type",), "image")))
    assert [issue.path for _, issue in raised.value.issues] == [
        "compositional_deconstruction.elements[0].bbox",
        "compositional_deconstruction.elements[2].type",
    ]
    assert "prompt[" not in str(raised.value)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: BBox(-1, 0, 10, 10), r"BBox\.y_min=-1 is out of range 0\.\.1000"),
        (lambda: BBox(0, 0, 10, 1001), r"BBox\.x_max=1001 is out of range"),
        (lambda: BBox(0, 0.5, 10, 10), r"BBox\.x_min must be an int 0\.\.1000, got float 0\.5"),
        (lambda: BBox(0, True, 10, 10), r"BBox\.x_min must be an int"),
        (lambda: BBox(20, 0, 10, 10), r"BBox\.y_min=20 > BBox\.y_max=10"),
        (lambda: BBox(0, 20, 10, 10), r"BBox\.x_min=20 > BBox\.x_max=10"),
        (lambda: BBox.from_relative(0, 0, 1.5, 1), r"right=1\.5 must be a number in 0\.\.1"),
        (lambda: BBox.from_relative(0.6, 0, 0.5, 1), r"left=0\.6 > right=0\.5"),
        (lambda: BBox.from_pixels(0, 0, 1100, 10, width=1024, height=768), r"right=1100 .* 0\.\.1024 \(the image wid"),
        (lambda: BBox.from_pixels(0, 0, 10, 800, width=1024, height=768), r"bottom=800 .* 0\.\.768 \(the image hei"),
        (lambda: BBox.from_pixels(0, 0, 10, 10, width=0, height=768), r"width=0 must be a positive number"),
        (lambda: BBox.from_list([1, 2, 3]), r"bbox must be 4 ints"),
        (lambda: Style(aesthetics="a", lighting="b", medium="c"), r"exactly one of photo= .* got neither"),
        (lambda: Style(aesthetics="a", lighting="b", medium="c", photo="d", art_style="e"), r"got both"),
        (lambda: Style(aesthetics=1, lighting="b", medium="c", photo="d"), r"Style\.aesthetics must be a string"),
        (
            lambda: Style(aesthetics="a", lighting="b", medium="c", photo="d", color_palette=["#000000"] * 17),
            r"Style\.color_palette has 17 colours, at most 16",
        ),
        (lambda: ObjectElement(desc="a", color_palette=["#abcdef"]), r"color_palette\[0\]='#abcdef' .* '#ABCDEF'"),
        (lambda: ObjectElement(desc="a", color_palette=["#000000"] * 6), r"has 6 colours, at most 5"),
        (lambda: ObjectElement(desc="a", color_palette="#000000"), r"got the string '#000000'; wrap it in a list"),
        (lambda: ObjectElement(desc="a", bbox=[10, 0, 5, 5]), r"ObjectElement\.bbox: BBox\.y_min=10 > BBox\.y_max=5"),
        (lambda: TextElement(text=None, desc="a"), r"TextElement\.text must be a string"),
        (lambda: Caption(background=None), r"Caption\.background must be a string"),
        (lambda: Caption(background="x", elements=[{"type": "obj"}]), r"Caption\.elements\[0\] must be an Object"),
        (lambda: Caption(background="x", style={"aesthetics": "a"}), r"Caption\.style must be a Style"),
    ],
)
def test_builder_validates_on_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    "args, expected",
    [
        ((256, 0, 768, 512, 1024, 1024), (0, 250, 500, 750)),
        ((500, 250, 2000, 1000, 2000, 1000), (250, 250, 1000, 1000)),  # each axis by its own side
        ((10, 10, 11, 11, 800, 800), (13, 13, 14, 14)),  # 12.5 -> 13 and 13.75 -> 14: half up
        ((0, 0, 1, 1, 3, 3), (0, 0, 333, 333)),
    ],
)
def test_bbox_from_pixels(args, expected):
    left, top, right, bottom, width, height = args
    assert BBox.from_pixels(left, top, right, bottom, width=width, height=height).to_list() == list(expected)


def test_bbox_from_relative_rounds_to_nearest():
    assert BBox.from_relative(0.0125, 0.1234, 0.9995, 1.0) == BBox(123, 13, 1000, 1000)
    assert BBox.from_relative(0, 0, 0, 0) == BBox(0, 0, 0, 0)


colors = st.from_regex(r"#[0-9A-F]{6}", fullmatch=True)


@st.composite
def bboxes(draw):
    y_min, y_max = sorted(draw(st.lists(st.integers(0, BBOX_MAX), min_size=2, max_size=2)))
    x_min, x_max = sorted(draw(st.lists(st.integers(0, BBOX_MAX), min_size=2, max_size=2)))
    return BBox(y_min, x_min, y_max, x_max)


palettes = st.none() | st.lists(colors, max_size=MAX_ELEMENT_PALETTE)
elements = st.one_of(
    st.builds(ObjectElement, desc=st.text(), bbox=st.none() | bboxes(), color_palette=palettes),
    st.builds(TextElement, text=st.text(), desc=st.text(), bbox=st.none() | bboxes(), color_palette=palettes),
)
style_fields = {
    "aesthetics": st.text(),
    "lighting": st.text(),
    "medium": st.text(),
    "color_palette": st.none() | st.lists(colors, max_size=MAX_STYLE_PALETTE),
}
styles = st.builds(Style, photo=st.text(), **style_fields) | st.builds(Style, art_style=st.text(), **style_fields)
captions = st.builds(
    Caption,
    high_level_description=st.none() | st.text(),
    style=st.none() | styles,
    background=st.text(),
    elements=st.lists(elements, max_size=6),
)


@FAST
@given(captions)
def test_builder_output_always_validates_and_round_trips(caption):
    text = caption.to_json()
    assert error_paths(text) == []
    assert Caption.from_json(text) == caption
    assert Caption.from_json(text).to_json() == text
    assert to_json(caption.to_dict()) == text


# ---------------------------------------------------------------------------------------------------------------------
# canonicalize
# ---------------------------------------------------------------------------------------------------------------------


def shuffled(value, rng: random.Random):
    if isinstance(value, dict):
        items = [(key, shuffled(child, rng)) for key, child in value.items()]
        rng.shuffle(items)
        return dict(items)
    if isinstance(value, list):
        return [shuffled(child, rng) for child in value]
    return value


def key_orders(value, path=()):
    """Every object's key list, by path."""
    orders = {}
    if isinstance(value, dict):
        orders[path] = list(value)
        for key, child in value.items():
            orders.update(key_orders(child, path + (key,)))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            orders.update(key_orders(child, path + (index,)))
    return orders


@FAST
@given(st.randoms(use_true_random=False), st.sampled_from([VALID, mutated((STYLE, ART_STYLE))]))
def test_canonicalize_only_reorders(rng, caption):
    messy = shuffled(caption, rng)
    result = canonicalize(messy)
    assert result == messy == caption  # dict equality ignores order: no value changed
    assert key_orders(result) == key_orders(caption)
    assert to_json(messy) == to_json(caption) == json.dumps(caption, ensure_ascii=False, separators=(",", ":"))
    assert canonicalize(json.dumps(messy)) == caption


def test_canonicalize_keeps_unknown_keys_last_and_values_untouched():
    messy = {
        "extra": 1,
        "compositional_deconstruction": {
            "elements": [{"desc": "x", "zzz": 2, "type": "obj"}, "junk"],
            "background": "y",
        },
    }
    result = canonicalize(messy)
    assert list(result) == ["compositional_deconstruction", "extra"]
    assert list(result["compositional_deconstruction"]) == ["background", "elements"]
    assert result["compositional_deconstruction"]["elements"] == [{"type": "obj", "desc": "x", "zzz": 2}, "junk"]
    assert list(result["compositional_deconstruction"]["elements"][0]) == ["type", "desc", "zzz"]
    assert error_paths(result) == [el(0, ".zzz"), el(1), "extra"]  # unknown keys sort after known ones
    assert list(messy) == ["extra", "compositional_deconstruction"]  # the input is not modified


def test_canonicalize_rejects_non_captions():
    with pytest.raises(CaptionError, match="invalid JSON"):
        canonicalize("{")
    with pytest.raises(ValueError, match="got list"):
        canonicalize("[]")


# ---------------------------------------------------------------------------------------------------------------------
# render_layout
# ---------------------------------------------------------------------------------------------------------------------

WHITE = (255, 255, 255)


def colors_of(image: Image.Image) -> set:
    return {color for _, color in image.getcolors(image.width * image.height)}


ONE_BOX = {
    "compositional_deconstruction": {
        "background": "x",
        "elements": [{"type": "obj", "bbox": [100, 200, 300, 400], "desc": "a box"}],
    }
}


def test_bbox_to_pixels_normalizes_each_axis_by_its_side():
    assert bbox_to_pixels([100, 200, 300, 400], 1000, 1000) == (200, 100, 399, 299)
    assert bbox_to_pixels([500, 500, 1000, 1000], 800, 400) == (400, 200, 799, 399)
    assert bbox_to_pixels([0, 0, 1000, 1000], 1024, 768) == (0, 0, 1023, 767)


def test_render_layout_on_a_blank_canvas():
    image = render_layout(ONE_BOX, 1000, 1000)
    assert image.size == (1000, 1000) and image.mode == "RGB"
    assert image.getpixel((200, 200)) == OUTLINE_COLORS[0]  # left edge, mid-height
    assert image.getpixel((399, 200)) == OUTLINE_COLORS[0]  # right edge
    assert image.getpixel((300, 299)) == OUTLINE_COLORS[0]  # bottom edge
    assert image.getpixel((300, 200)) == WHITE  # inside the box
    assert image.getpixel((800, 600)) == WHITE  # well outside every box
    assert LEGEND_BACKGROUND not in colors_of(image)


def test_render_layout_non_square_and_palettes():
    image = render_layout(VALID, 800, 400)
    assert image.size == (800, 400)
    left, top, right, bottom = bbox_to_pixels(VALID["compositional_deconstruction"]["elements"][2]["bbox"], 800, 400)
    assert image.getpixel((left, (top + bottom) // 2)) == OUTLINE_COLORS[2]
    # Element palettes sit inside their box, the style palette along the bottom edge.
    title = bbox_to_pixels(VALID["compositional_deconstruction"]["elements"][0]["bbox"], 800, 400)
    assert (255, 122, 0) in colors_of(image.crop((title[0], title[1], title[2] + 1, title[3] + 1)))
    bottom_strip = colors_of(image.crop((0, 360, 400, 400)))
    assert {(255, 122, 0), (255, 210, 63), (27, 27, 58)} <= bottom_strip
    assert image.getpixel((790, 150)) == WHITE


def test_render_layout_over_an_image_and_legend():
    caption = valid_caption_object()
    caption = Caption(background="x", elements=[*caption.elements, ObjectElement(desc="a floating drone")])
    generated = Image.new("RGB", (640, 480), (10, 20, 30))
    image = render_layout(caption.to_json(), 640, 480, image=generated)
    assert generated.getpixel((0, 0)) == (10, 20, 30) and colors_of(generated) == {(10, 20, 30)}
    assert image.getpixel((630, 240)) == (10, 20, 30)
    left, top, right, bottom = bbox_to_pixels([300, 350, 780, 650], 640, 480)
    assert image.getpixel((right, (top + bottom) // 2)) == OUTLINE_COLORS[2]
    assert LEGEND_BACKGROUND in colors_of(image)  # the element without a bbox is listed
    with pytest.raises(ValueError, match="`image` is 640x480 but width x height is 1024x1024"):
        render_layout(caption, 1024, 1024, image=generated)
    with pytest.raises(ValueError, match="`width` must be a positive int"):
        render_layout(caption, 0, 100)


def as_layout(value) -> dict:
    """Any JSON value placed where render_layout looks: the elements list and the style."""
    elements = value if isinstance(value, list) else [value]
    return {"style_description": value, "compositional_deconstruction": {"background": "x", "elements": elements}}


@settings(max_examples=60, deadline=None)
@given(captions | json_values.map(as_layout), st.integers(1, 96), st.integers(1, 96))
def test_render_layout_draws_any_caption_dict(caption, width, height):
    assert render_layout(caption, width, height).size == (width, height)


def test_labels_are_cut_with_an_ellipsis():
    font = _font(12)
    label = _label_text("#0 " + "A" * 100, font)
    assert len(label) == LABEL_MAX_CHARS and label.endswith("…")
    assert _label_text("#1 SALE\nNOW", font) == "#1 SALE NOW"


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="ideogram4")
    add_caption_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_validate(tmp_path, capsys, monkeypatch):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(VALID_TEXT + "\n", encoding="utf-8")
    bad.write_text(BAD, encoding="utf-8")
    assert run_cli(["caption", "validate", str(good)], capsys) == (0, f"{good}: ok\n", "")
    code, out, _ = run_cli(["caption", "validate", str(good), str(bad)], capsys)
    assert code == 1
    assert out.splitlines()[1].startswith(f"{bad}: {el(0, '.bbox')}: y_min 220 > y_max 60")
    code, out, err = run_cli(["caption", "validate", str(tmp_path / "missing.json")], capsys)
    assert (code, out, err) == (2, "", f"error: cannot read {tmp_path / 'missing.json'}: No such file or directory\n")
    monkeypatch.setattr("sys.stdin", io.StringIO(NO_SUMMARY))
    code, out, _ = run_cli(["caption", "validate", "-"], capsys)
    assert code == 0 and out.startswith("-: high_level_description: no high_level_description") and "[warning]" in out


def test_cli_format(tmp_path, capsys):
    messy = tmp_path / "messy.json"
    messy.write_text(json.dumps(shuffled(VALID, random.Random(1)), indent=2), encoding="utf-8")  # ASCII escapes too
    code, out, err = run_cli(["caption", "format", str(messy)], capsys)
    assert (code, out, err) == (0, VALID_TEXT + "\n", "")
    out_file = tmp_path / "out.json"
    assert run_cli(["caption", "format", str(messy), "-o", str(out_file)], capsys)[0] == 0
    assert out_file.read_text(encoding="utf-8") == VALID_TEXT + "\n"
    assert run_cli(["caption", "format", str(messy), "--in-place"], capsys)[0] == 0
    assert messy.read_text(encoding="utf-8") == VALID_TEXT + "\n"
    broken = tmp_path / "broken.json"
    broken.write_text('{"compositional_deconstruction": ', encoding="utf-8")
    code, out, err = run_cli(["caption", "format", str(broken)], capsys)
    assert code == 1 and out == "" and err.startswith(f"{broken}: $: invalid JSON")
    invalid = tmp_path / "invalid.json"
    invalid.write_text(BAD, encoding="utf-8")
    code, out, err = run_cli(["caption", "format", str(invalid)], capsys)
    assert code == 0 and out == BAD + "\n" and "y_min 220 > y_max 60" in err
    repeated = tmp_path / "repeated.json"
    text = VALID_TEXT.replace('"background":', '"background":"a red wall","background":', 1)
    repeated.write_text(text, encoding="utf-8")
    code, out, err = run_cli(["caption", "format", str(repeated), "--in-place"], capsys)
    assert code == 1 and out == "" and "key 'background' appears more than once" in err
    assert err.endswith("repeats keys; keep one value of each before formatting (nothing was written)\n")
    assert repeated.read_text(encoding="utf-8") == text


def test_cli_preview(tmp_path, capsys):
    caption_file, layout = tmp_path / "poster.json", tmp_path / "layout.png"
    caption_file.write_text(VALID_TEXT, encoding="utf-8")
    code, out, _ = run_cli(
        ["caption", "preview", str(caption_file), "-o", str(layout), "--width", "320", "--height", "240"], capsys
    )
    assert code == 0 and out == f"wrote {layout} (320x240)\n"
    assert Image.open(layout).size == (320, 240)
    generated = tmp_path / "generated.png"
    Image.new("RGB", (200, 100), (0, 0, 0)).save(generated)
    argv = ["caption", "preview", str(caption_file), "-o", str(layout), "--image", str(generated)]
    code, _, _ = run_cli(argv, capsys)
    assert code == 0
    assert Image.open(layout).size == (200, 100)
    code, _, err = run_cli(
        ["caption", "preview", str(caption_file), "-o", str(layout), "--image", str(generated), "--width", "300"],
        capsys,
    )
    assert code == 2 and "`image` is 200x100" in err
    code, _, err = run_cli(["caption", "preview", str(caption_file), "-o", str(layout), "--width", "0"], capsys)
    assert code == 2 and "`width` must be a positive int (pixels), got 0" in err
