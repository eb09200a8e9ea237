"""Geometry of editing, with PIL and numpy only: the mask of a caption element's box, a larger canvas for
outpainting with the caption moved onto it, and the rule that turns a pixel mask into the per-token weights that
inpainting uses.

Captions are given as `Caption` objects, JSON text or dicts, and come back in the form they were given. Masks follow
diffusers' convention: white (1.0, 255) = repaint, black (0) = keep.
"""

import copy
import json
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from PIL import Image, ImageFilter

from .captions.builder import JSON_SEPARATORS, BBox, Caption, caption_dict
from .captions.preview import _elements, _valid_bbox, bbox_to_pixels
from .captions.schema import BBOX_MAX
from .constants import PIXELS_PER_TOKEN


# A pixel is repainted when its mask value is at least this (diffusers' `VaeImageProcessor.binarize` threshold).
MASK_THRESHOLD = 0.5
REPAINT, KEEP = 255, 0
# What `expand_canvas` puts in the new margins: mid grey, neutral for the VAE. Only a `strength` below 1 sees it.
DEFAULT_FILL = (127, 127, 127)
# `overlay_mask`'s default tint of the repainted area.
OVERLAY_COLOR = (255, 0, 96)


def _require_ints(caller: str, minimum: int, **values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{caller}: `{name}` must be an int >= {minimum} (pixels), got {value!r}.")


def _element_path(index: int) -> str:
    return f"compositional_deconstruction.elements[{index}]"


def _check_bbox(caller: str, index: int, bbox) -> None:
    if not _valid_bbox(bbox):
        raise ValueError(
            f"{caller}: {_element_path(index)}.bbox={bbox!r} is not 4 ints [y_min, x_min, y_max, x_max] in "
            f"0..{BBOX_MAX} with min <= max; fix the caption (`check_caption` lists the problems)."
        )


# --------------------------------------------------------------------------------------------------------------------
# Masks


def mask_from_caption(caption, element: int | Sequence[int], *, height: int, width: int, pad: int = 0) -> Image.Image:
    """The mask of one element's bounding box (or of several: their union), so that "regenerate the headline" is one
    line: `pipe(caption, image=poster, mask_image=mask_from_caption(caption, 0, height=1024, width=1024))`.

    The box covers the pixels that `render_layout` outlines (edges rounded half up, `[y_min, x_min, y_max, x_max]`
    with each axis normalized by its own side), grown by `pad` pixels on every side and clipped to the image.
    Inpainting then repaints every 16 x 16 token that holds a pixel of it (`token_weights`).

    Args:
        caption: a `Caption`, JSON text or a dict.
        element: the index of the element in `compositional_deconstruction.elements` (0-based), or a list of them.
        height, width: the image size in pixels.
        pad: pixels added around the box on each side (text often overhangs its box a little).

    Returns:
        A mode "L" image of `width` x `height`: 255 inside the box (repaint), 0 elsewhere (keep).
    """
    caller = "mask_from_caption"
    _require_ints(caller, 1, height=height, width=width)
    _require_ints(caller, 0, pad=pad)
    indices = [element] if isinstance(element, int) and not isinstance(element, bool) else element
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence) or not indices:
        raise ValueError(f"{caller}: `element` must be an element index or a non-empty list of them, got {element!r}.")
    elements = _elements(caption_dict(caption, caller))
    mask = np.full((height, width), KEEP, dtype=np.uint8)
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(elements):
            valid = f"indices 0..{len(elements) - 1}" if elements else "none"
            raise ValueError(
                f"{caller}: `element={index!r}` does not exist: the caption has {len(elements)} element(s) ({valid}). "
                "Count from 0 in `compositional_deconstruction.elements` (`ideogram4 caption preview` labels each "
                "box with its index)."
            )
        bbox = elements[index].get("bbox") if isinstance(elements[index], dict) else None
        if bbox is None:
            raise ValueError(
                f"{caller}: {_element_path(index)} has no `bbox`, so there is no region to mask; give it a bbox or "
                "pass a mask drawn by hand."
            )
        _check_bbox(caller, index, bbox)
        left, top, right, bottom = bbox_to_pixels(bbox, width, height)  # inclusive
        mask[max(0, top - pad) : bottom + 1 + pad, max(0, left - pad) : right + 1 + pad] = REPAINT
    return Image.fromarray(mask, mode="L")


def token_weights(mask: np.ndarray, mask_blur: float = 0) -> np.ndarray:
    """How much of each token inpainting repaints: (H, W) mask values in [0, 1] -> (H/16, W/16) float32 weights.

    The rule: a pixel is repainted when its value is at least 0.5 (diffusers' binarization), and a token is repainted
    (weight 1) when any of its 16 x 16 pixels is. With `mask_blur` = r > 0 the binary mask is also blurred
    (PIL's GaussianBlur of radius r pixels, what diffusers' `VaeImageProcessor.blur` does) and a token's weight is the
    largest blurred value among its pixels where that is higher: the repainted region fades into the kept one over
    about r pixels. Tokens of weight 0 are kept exactly; weight w blends w x generated + (1 - w) x original.
    """
    if mask.ndim != 2 or mask.shape[0] % PIXELS_PER_TOKEN or mask.shape[1] % PIXELS_PER_TOKEN:
        raise ValueError(
            f"token_weights: the mask must be (H, W) with both sides multiples of {PIXELS_PER_TOKEN}, got "
            f"{tuple(mask.shape)}."
        )
    grid_h, grid_w = mask.shape[0] // PIXELS_PER_TOKEN, mask.shape[1] // PIXELS_PER_TOKEN

    def per_token_max(pixels: np.ndarray) -> np.ndarray:
        return pixels.reshape(grid_h, PIXELS_PER_TOKEN, grid_w, PIXELS_PER_TOKEN).max(axis=(1, 3))

    repaint = mask >= MASK_THRESHOLD
    weights = per_token_max(repaint.astype(np.float32))
    if mask_blur:
        binary = Image.fromarray(np.where(repaint, REPAINT, KEEP).astype(np.uint8), mode="L")
        blurred = np.asarray(binary.filter(ImageFilter.GaussianBlur(mask_blur)), dtype=np.float32) / REPAINT
        weights = np.maximum(weights, per_token_max(blurred))
    return weights


def repainted_area(mask: Image.Image | np.ndarray, mask_blur: float = 0) -> Image.Image:
    """What inpainting repaints, in pixels: each token's weight (`token_weights`) spread over its 16 x 16 pixels, as a
    mode "L" image (255 = repainted, 0 = kept). Draw it over the input with `overlay_mask` to see the edit's extent
    before running the model."""
    pixels = np.asarray(mask.convert("L"), dtype=np.float32) / REPAINT if isinstance(mask, Image.Image) else mask
    weights = token_weights(pixels, mask_blur)
    spread = np.kron(weights, np.ones((PIXELS_PER_TOKEN, PIXELS_PER_TOKEN), dtype=np.float32))
    return Image.fromarray(np.rint(spread * REPAINT).astype(np.uint8), mode="L")


def overlay_mask(
    image: Image.Image, mask: Image.Image, color: tuple[int, int, int] = OVERLAY_COLOR, opacity: float = 0.5
) -> Image.Image:
    """`image` with the white part of `mask` tinted in `color` (at `opacity`), e.g. over `render_layout`'s preview."""
    if image.size != mask.size:
        raise ValueError(
            f"overlay_mask: `mask` is {mask.width}x{mask.height} but `image` is {image.width}x{image.height}; "
            "give both the same size."
        )
    alpha = mask.convert("L").point(lambda value: round(value * opacity))
    return Image.composite(Image.new("RGB", image.size, color), image.convert("RGB"), alpha)


# --------------------------------------------------------------------------------------------------------------------
# Outpainting


def expand_canvas(
    image: Image.Image,
    *,
    left: int = 0,
    right: int = 0,
    top: int = 0,
    bottom: int = 0,
    fill: tuple[int, int, int] = DEFAULT_FILL,
) -> tuple[Image.Image, Image.Image]:
    """Place `image` on a larger canvas for outpainting with the inpaint pipeline.

    Args:
        image: a PIL image.
        left, right, top, bottom: pixels added on each side.
        fill: the RGB colour of the new margins (seen by the model only with `strength` below 1).

    Returns:
        (canvas, mask): the RGB canvas of (width + left + right) x (height + top + bottom) with the image at (left,
        top), and its mode "L" mask, 255 (repaint) over the margins and 0 (keep) over the image. A margin that is not
        a multiple of 16 pixels also repaints the image's pixels that share a token with it (`token_weights`). Move
        the caption with `expand_caption(caption, width=image.width, height=image.height, left=..., ...)`.
    """
    caller = "expand_canvas"
    if not isinstance(image, Image.Image):
        raise ValueError(f"{caller}: `image` must be a PIL image, got {type(image).__name__}.")
    _require_ints(caller, 0, left=left, right=right, top=top, bottom=bottom)
    size = (image.width + left + right, image.height + top + bottom)
    canvas = Image.new("RGB", size, fill)
    canvas.paste(image.convert("RGB"), (left, top))
    mask = Image.new("L", size, REPAINT)
    mask.paste(KEEP, (left, top, left + image.width, top + image.height))
    return canvas, mask


def _moved(value: int, offset: int, side: int, new_side: int) -> int:
    """A bbox coordinate on a side of `side` pixels, moved `offset` pixels in, on the grid of a `new_side` side:
    (offset + value / 1000 * side) / new_side * 1000, rounded half up with integer arithmetic."""
    numerator = offset * BBOX_MAX + value * side
    return (2 * numerator + new_side) // (2 * new_side)


def expand_caption(caption, *, width: int, height: int, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0):
    """The caption of a `width` x `height` image, its boxes moved and rescaled onto the canvas of
    `expand_canvas(image, left=, right=, top=, bottom=)`, so that the layout stays where it was.

    Every bbox is normalized to the new canvas (each axis by its own side, rounded half up to the 0..1000 grid);
    elements without a bbox and every other field are unchanged. Describe what the margins should show by editing
    `background` or adding elements.

    Args:
        caption: a `Caption`, JSON text or a dict; the same kind comes back (JSON text minified with literal UTF-8,
            its key order kept; a new dict, the input is not modified).
        width, height: the size of the image the caption describes, in pixels.
        left, right, top, bottom: the margins given to `expand_canvas`.
    """
    caller = "expand_caption"
    _require_ints(caller, 1, width=width, height=height)
    _require_ints(caller, 0, left=left, right=right, top=top, bottom=bottom)
    new_width, new_height = width + left + right, height + top + bottom

    def moved(bbox: list[int]) -> list[int]:
        axes = [(top, height, new_height), (left, width, new_width)] * 2  # [y_min, x_min, y_max, x_max]
        return [_moved(value, *axis) for value, axis in zip(bbox, axes)]

    if isinstance(caption, Caption):
        elements = [
            element if element.bbox is None else replace(element, bbox=BBox(*moved(element.bbox.to_list())))
            for element in caption.elements
        ]
        return replace(caption, elements=elements)
    data = copy.deepcopy(caption_dict(caption, caller))
    for index, element in enumerate(_elements(data)):
        bbox = element.get("bbox") if isinstance(element, dict) else None
        if bbox is not None:
            _check_bbox(caller, index, bbox)
            element["bbox"] = moved(bbox)
    return json.dumps(data, ensure_ascii=False, separators=JSON_SEPARATORS) if isinstance(caption, str) else data
