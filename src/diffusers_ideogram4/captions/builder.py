"""A typed builder for structured captions (SPEC 7), validated on construction, and the canonical serialization.

caption = Caption(
    high_level_description="A travel poster with a bold title above a lighthouse.",
    style=Style(aesthetics="vintage, bold", lighting="flat", medium="screen print", art_style="art deco"),
    background="a calm sea under a striped evening sky",
    elements=[
        TextElement(text="VISIT SEASIDE", desc="bold serif title", bbox=BBox(40, 100, 200, 900)),
        ObjectElement(
            desc="a white lighthouse",
            bbox=BBox.from_pixels(300, 300, 700, 900, width=1024, height=1024),  # left, top, right, bottom
        ),
    ],
)
prompt = caption.to_json()  # minified UTF-8, keys in the trained order
"""

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from .checker import CaptionError, check_caption
from .schema import (
    ART_STYLE_KEY_ORDER,
    BBOX_FIELDS,
    BBOX_MAX,
    COLOR_PATTERN,
    COMPOSITION_KEY_ORDER,
    ELEMENT_KEY_ORDER,
    LOOSE_COLOR_PATTERN,
    MAX_ELEMENT_PALETTE,
    MAX_STYLE_PALETTE,
    OBJECT_TYPE,
    PHOTO_STYLE_KEY_ORDER,
    STYLE_KEY_ORDER,
    TEXT_TYPE,
    TOP_LEVEL_KEY_ORDER,
)


# The serialization the model was trained on: minified, non-ASCII characters literal.
JSON_SEPARATORS = (",", ":")


def _dumps(data) -> str:
    return json.dumps(data, ensure_ascii=False, separators=JSON_SEPARATORS)


# --------------------------------------------------------------------------------------------------------------------
# Validation on construction
# --------------------------------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_str(owner: str, name: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise ValueError(f"{owner}.{name} must be a string, got {type(value).__name__} {value!r}.")


def _palette(owner: str, colors, limit: int) -> tuple[str, ...] | None:
    """A validated palette as a tuple; None stays None (no `color_palette` key), an empty list stays empty."""
    if colors is None:
        return None
    if isinstance(colors, str):
        raise ValueError(
            f"{owner}.color_palette must be a list of '#RRGGBB' strings, got the string {colors!r}; wrap it in a list."
        )
    colors = tuple(colors)
    if len(colors) > limit:
        raise ValueError(
            f"{owner}.color_palette has {len(colors)} colours, at most {limit} are allowed; keep the "
            f"{limit} most prominent."
        )
    for index, color in enumerate(colors):
        if isinstance(color, str) and COLOR_PATTERN.fullmatch(color):
            continue
        if isinstance(color, str) and LOOSE_COLOR_PATTERN.fullmatch(color):
            fix = f"write {color.upper()!r} (uppercase hex digits)"
        else:
            fix = "write colours as '#RRGGBB' with uppercase hex digits, e.g. '#1B2A41'"
        raise ValueError(f"{owner}.color_palette[{index}]={color!r} is not a valid colour; {fix}.")
    return colors


def _grid(position: float, side: float = 1.0) -> int:
    """`position` along a side of length `side` on the 0..BBOX_MAX grid, rounded half up (12.5 -> 13, not 12)."""
    # Multiply before dividing: pixel positions then land exactly on the grid when they can (512 / 1024 -> 500).
    return math.floor(position * BBOX_MAX / side + 0.5)


def _check_corners(method: str, left: float, top: float, right: float, bottom: float) -> None:
    for low, high, low_value, high_value in (("left", "right", left, right), ("top", "bottom", top, bottom)):
        if low_value > high_value:
            raise ValueError(
                f"BBox.{method}: {low}={low_value!r} > {high}={high_value!r}; the arguments are "
                "(left, top, right, bottom)."
            )


@dataclass(frozen=True)
class BBox:
    """An element's box, `[y_min, x_min, y_max, x_max]`, each axis normalized by its own side to 0..1000.

    The origin is the top-left corner. Use `from_pixels` or `from_relative` to convert the usual
    (left, top, right, bottom) boxes.

    Args:
        y_min: top edge, 0..1000.
        x_min: left edge, 0..1000.
        y_max: bottom edge, y_min..1000.
        x_max: right edge, x_min..1000.
    """

    y_min: int
    x_min: int
    y_max: int
    x_max: int

    def __post_init__(self):
        for name in BBOX_FIELDS:
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(
                    f"BBox.{name} must be an int 0..{BBOX_MAX}, got {type(value).__name__} {value!r}; "
                    "use BBox.from_pixels or BBox.from_relative to convert other units."
                )
            if not 0 <= value <= BBOX_MAX:
                raise ValueError(
                    f"BBox.{name}={value} is out of range 0..{BBOX_MAX}; each axis is normalized by its "
                    "own side (BBox.from_pixels converts pixels)."
                )
        for low, high in (("y_min", "y_max"), ("x_min", "x_max")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(
                    f"BBox.{low}={getattr(self, low)} > BBox.{high}={getattr(self, high)}; the order is "
                    "(y_min, x_min, y_max, x_max): swap them, or build (left, top, right, bottom) "
                    "boxes with BBox.from_pixels / BBox.from_relative."
                )

    @classmethod
    def from_relative(cls, left: float, top: float, right: float, bottom: float) -> "BBox":
        """A box from 0..1 fractions of the width (left, right) and height (top, bottom), rounded to the grid."""
        values = {"left": left, "top": top, "right": right, "bottom": bottom}
        for name, value in values.items():
            if not (_is_real(value) and 0.0 <= value <= 1.0):
                raise ValueError(
                    f"BBox.from_relative: {name}={value!r} must be a number in 0..1 (a fraction of the "
                    "image side); use BBox.from_pixels for pixel coordinates."
                )
        _check_corners("from_relative", left, top, right, bottom)
        return cls(_grid(top), _grid(left), _grid(bottom), _grid(right))

    @classmethod
    def from_pixels(cls, left: float, top: float, right: float, bottom: float, *, width: int, height: int) -> "BBox":
        """A box from pixel coordinates in a `width` x `height` image, rounded to the nearest grid value.

        Args:
            left, right: x pixel coordinates, 0..width.
            top, bottom: y pixel coordinates, 0..height.
            width, height: the image size in pixels.
        """
        for name, side in (("width", width), ("height", height)):
            if not (_is_real(side) and side > 0):
                raise ValueError(f"BBox.from_pixels: {name}={side!r} must be a positive number of pixels.")
        values = {
            "left": (left, "width", width),
            "top": (top, "height", height),
            "right": (right, "width", width),
            "bottom": (bottom, "height", height),
        }
        for name, (value, axis, side) in values.items():
            if not (_is_real(value) and 0 <= value <= side):
                raise ValueError(
                    f"BBox.from_pixels: {name}={value!r} must be a pixel coordinate in 0..{side} (the "
                    f"image {axis}); clip the box to the image first."
                )
        _check_corners("from_pixels", left, top, right, bottom)
        return cls(_grid(top, height), _grid(left, width), _grid(bottom, height), _grid(right, width))

    @classmethod
    def from_list(cls, values: Sequence[int]) -> "BBox":
        """A box from the caption's `[y_min, x_min, y_max, x_max]` list."""
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != len(BBOX_FIELDS):
            raise ValueError(f"bbox must be 4 ints [y_min, x_min, y_max, x_max], got {values!r}.")
        return cls(*values)

    def to_list(self) -> list[int]:
        return [self.y_min, self.x_min, self.y_max, self.x_max]


def _bbox(owner: str, bbox) -> "BBox | None":
    if bbox is None or isinstance(bbox, BBox):
        return bbox
    try:
        return BBox.from_list(bbox)
    except ValueError as error:
        raise ValueError(f"{owner}.bbox: {error}") from None


# --------------------------------------------------------------------------------------------------------------------
# Caption parts
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Style:
    """`style_description`: a photographic style (`photo=...`) or any other style (`art_style=...`), not both.

    Args:
        aesthetics: the overall aesthetic, e.g. "minimal, bold, high contrast".
        lighting: the lighting, e.g. "soft window light from the left".
        medium: the medium, e.g. "photograph", "screen print".
        photo: photographic styles only: camera, lens, film.
        art_style: other styles only: the art style, e.g. "art deco poster".
        color_palette: at most 16 '#RRGGBB' colours with uppercase hex digits; None leaves the key out.
    """

    aesthetics: str
    lighting: str
    medium: str
    photo: str | None = None
    art_style: str | None = None
    color_palette: tuple[str, ...] | None = None

    def __post_init__(self):
        for name in ("aesthetics", "lighting", "medium"):
            _check_str("Style", name, getattr(self, name))
        _check_str("Style", "photo", self.photo, optional=True)
        _check_str("Style", "art_style", self.art_style, optional=True)
        if (self.photo is None) == (self.art_style is None):
            given = "both" if self.photo is not None else "neither"
            raise ValueError(
                f"Style needs exactly one of photo= (a photographic style) or art_style= (any other "
                f"style), got {given}."
            )
        object.__setattr__(self, "color_palette", _palette("Style", self.color_palette, MAX_STYLE_PALETTE))

    def to_dict(self) -> dict:
        order = PHOTO_STYLE_KEY_ORDER if self.photo is not None else ART_STYLE_KEY_ORDER
        values = {name: getattr(self, name) for name in order}
        if values["color_palette"] is not None:
            values["color_palette"] = list(values["color_palette"])
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True, kw_only=True)
class _Element:
    """What object and text elements share: desc, bbox, color_palette, and the serialization."""

    type: ClassVar[str]
    desc: str
    bbox: BBox | None = None
    color_palette: tuple[str, ...] | None = None

    def __post_init__(self):
        owner = type(self).__name__
        _check_str(owner, "desc", self.desc)
        object.__setattr__(self, "bbox", _bbox(owner, self.bbox))
        object.__setattr__(self, "color_palette", _palette(owner, self.color_palette, MAX_ELEMENT_PALETTE))

    def to_dict(self) -> dict:
        values = {
            "type": self.type,
            "bbox": None if self.bbox is None else self.bbox.to_list(),
            "text": getattr(self, "text", None),
            "desc": self.desc,
            "color_palette": None if self.color_palette is None else list(self.color_palette),
        }
        return {name: values[name] for name in ELEMENT_KEY_ORDER if values[name] is not None}


@dataclass(frozen=True, kw_only=True)
class ObjectElement(_Element):
    """An element of type "obj": something in the image.

    Args:
        desc: what it is and how it looks.
        bbox: where it is (`BBox` or `[y_min, x_min, y_max, x_max]`); None leaves the placement to the model.
        color_palette: at most 5 '#RRGGBB' colours; None leaves the key out.
    """

    type: ClassVar[str] = OBJECT_TYPE


@dataclass(frozen=True, kw_only=True)
class TextElement(_Element):
    """An element of type "text": a string the model renders.

    Args:
        text: the literal string to render, "\\n" for line breaks.
        desc: its typography and look, e.g. "bold condensed serif, white with a thin black outline".
        bbox: where it is (`BBox` or `[y_min, x_min, y_max, x_max]`); None leaves the placement to the model.
        color_palette: at most 5 '#RRGGBB' colours; None leaves the key out.
    """

    type: ClassVar[str] = TEXT_TYPE
    text: str

    def __post_init__(self):
        _check_str("TextElement", "text", self.text)
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class Caption:
    """A structured caption. `to_json()` is the prompt to pass to the pipeline.

    Args:
        background: the background of the image.
        elements: the elements, background-affixed first and foreground last; may be empty.
        high_level_description: one or two sentences describing the whole image (recommended).
        style: the `Style`; None leaves `style_description` out.
    """

    high_level_description: str | None = None
    style: Style | None = None
    background: str
    elements: tuple[ObjectElement | TextElement, ...] = ()

    def __post_init__(self):
        _check_str("Caption", "high_level_description", self.high_level_description, optional=True)
        _check_str("Caption", "background", self.background)
        if self.style is not None and not isinstance(self.style, Style):
            raise ValueError(
                f"Caption.style must be a Style or None, got {type(self.style).__name__}; build it with "
                "Style(aesthetics=..., lighting=..., medium=..., photo=... or art_style=...)."
            )
        if isinstance(self.elements, (str, bytes, dict)) or not isinstance(self.elements, Sequence):
            raise ValueError(
                f"Caption.elements must be a list of ObjectElement / TextElement, got {type(self.elements).__name__}."
            )
        for index, element in enumerate(self.elements):
            if not isinstance(element, _Element):
                raise ValueError(
                    f"Caption.elements[{index}] must be an ObjectElement or TextElement, got "
                    f"{type(element).__name__} {element!r:.80}."
                )
        object.__setattr__(self, "elements", tuple(self.elements))

    def to_dict(self) -> dict:
        """The caption as a dict with keys in the trained order."""
        data = {}
        if self.high_level_description is not None:
            data["high_level_description"] = self.high_level_description
        if self.style is not None:
            data["style_description"] = self.style.to_dict()
        data["compositional_deconstruction"] = {
            "background": self.background,
            "elements": [element.to_dict() for element in self.elements],
        }
        return data

    def to_json(self) -> str:
        """The canonical caption text: minified UTF-8, keys in the trained order. Pass it as the prompt."""
        return _dumps(self.to_dict())

    @classmethod
    def from_json(cls, caption: "str | dict") -> "Caption":
        """Parse a caption (JSON text or dict).

        Raises:
            CaptionError: the caption has errors (`check_caption`); all of them are listed.
        """
        errors = [(0, issue) for issue in check_caption(caption) if issue.is_error]
        if errors:
            raise CaptionError(errors, num_prompts=1)
        data = json.loads(caption) if isinstance(caption, str) else caption
        style = data.get("style_description")
        composition = data["compositional_deconstruction"]
        return cls(
            high_level_description=data.get("high_level_description"),
            style=None if style is None else Style(**style),
            background=composition["background"],
            elements=[_element_from_dict(element) for element in composition["elements"]],
        )


def _element_from_dict(element: dict) -> ObjectElement | TextElement:
    fields = {name: value for name, value in element.items() if name != "type"}
    return TextElement(**fields) if element["type"] == TEXT_TYPE else ObjectElement(**fields)


# --------------------------------------------------------------------------------------------------------------------
# Canonical form of user dicts
# --------------------------------------------------------------------------------------------------------------------


def _reordered(obj: dict, order: tuple) -> dict:
    """Known keys in `order`, then unknown keys in their original order (kept, so the checker still reports them)."""
    known = {key: obj[key] for key in order if key in obj}
    return {**known, **{key: value for key, value in obj.items() if key not in known}}


def caption_dict(caption: "Caption | str | dict", caller: str) -> dict:
    """A caption as a dict, from a `Caption`, JSON text or a dict (returned as is).

    Raises:
        CaptionError: `caption` is text that is not valid JSON.
        ValueError: the caption is not a JSON object; the message names `caller`.
    """
    if isinstance(caption, Caption):
        return caption.to_dict()
    if isinstance(caption, str):
        try:
            caption = json.loads(caption)
        except (ValueError, RecursionError):
            raise CaptionError([(0, issue) for issue in check_caption(caption) if issue.is_error], 1) from None
    if not isinstance(caption, dict):
        raise ValueError(
            f"{caller}: `caption` must be a Caption, a dict or JSON text of an object, got {type(caption).__name__}."
        )
    return caption


def canonicalize(caption: "str | dict") -> dict:
    """The caption with every object's keys in the trained order. Values are never changed.

    Returns a new dict (and new dicts / lists along the reordered levels); other values are shared, not copied.

    Args:
        caption: a caption dict or JSON text.

    Raises:
        CaptionError: `caption` is text that is not valid JSON.
        ValueError: the caption is not a JSON object.
    """
    result = _reordered(caption_dict(caption, "canonicalize"), TOP_LEVEL_KEY_ORDER)
    if isinstance(result.get("style_description"), dict):
        result["style_description"] = _reordered(result["style_description"], STYLE_KEY_ORDER)
    composition = result.get("compositional_deconstruction")
    if isinstance(composition, dict):
        composition = result["compositional_deconstruction"] = _reordered(composition, COMPOSITION_KEY_ORDER)
        if isinstance(composition.get("elements"), list):
            composition["elements"] = [
                _reordered(element, ELEMENT_KEY_ORDER) if isinstance(element, dict) else element
                for element in composition["elements"]
            ]
    return result


def to_json(caption: "Caption | str | dict") -> str:
    """The canonical text of a caption: keys in the trained order, minified, literal UTF-8. Values are not checked
    (use `check_caption`), only reordered.
    """
    if isinstance(caption, Caption):
        return caption.to_json()
    return _dumps(canonicalize(caption))
