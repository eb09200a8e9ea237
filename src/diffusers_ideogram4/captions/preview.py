"""Draw a caption's layout: element boxes, labels and palettes, on a blank canvas or over a generated image."""

from PIL import Image, ImageDraw, ImageFont

from .builder import caption_dict
from .schema import BBOX_FIELDS, BBOX_MAX, COLOR_PATTERN, TEXT_TYPE


# Outline colour of element i is OUTLINE_COLORS[i % len(OUTLINE_COLORS)]: saturated, readable on white and photos.
OUTLINE_COLORS = (
    (230, 25, 75),
    (0, 130, 200),
    (60, 180, 75),
    (245, 130, 48),
    (145, 30, 180),
    (240, 50, 230),
    (0, 128, 128),
    (170, 110, 40),
    (0, 0, 128),
    (128, 128, 0),
)
CANVAS_COLOR = (255, 255, 255)
LABEL_TEXT_COLOR = (255, 255, 255)
LEGEND_TEXT_COLOR = (0, 0, 0)
LEGEND_BACKGROUND = (235, 235, 235)
SWATCH_OUTLINE = (0, 0, 0)
# Label text past this many characters is cut with an ellipsis (the label only: the caption is never changed).
LABEL_MAX_CHARS = 24


def bbox_to_pixels(bbox: list[int], width: int, height: int) -> tuple[int, int, int, int]:
    """Inclusive pixel box (left, top, right, bottom) of a caption bbox `[y_min, x_min, y_max, x_max]`.

    Each axis is normalized by its own side: x by `width`, y by `height`. Rounded half up with integer arithmetic.
    """
    y_min, x_min, y_max, x_max = bbox

    def scale(value: int, side: int) -> int:
        return (2 * value * side + BBOX_MAX) // (2 * BBOX_MAX)

    left, top = scale(x_min, width), scale(y_min, height)
    # The max edges are exclusive on the grid: [0, 0, 1000, 1000] covers pixels 0..width-1.
    right = max(left, min(scale(x_max, width), width) - 1)
    bottom = max(top, min(scale(y_max, height), height) - 1)
    return left, top, right, bottom


def _valid_bbox(bbox) -> bool:
    return (
        isinstance(bbox, list)
        and len(bbox) == len(BBOX_FIELDS)
        and all(isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= BBOX_MAX for value in bbox)
        and bbox[0] <= bbox[2]
        and bbox[1] <= bbox[3]
    )


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


def _label_text(text: str, font) -> str:
    """One line, at most LABEL_MAX_CHARS characters (ellipsis), in characters the font can encode."""
    text = " ".join(text.split())
    ellipsis = "…"
    if not isinstance(font, ImageFont.FreeTypeFont):  # the bitmap fallback font only encodes Latin-1
        text = text.encode("latin-1", "replace").decode("latin-1")
        ellipsis = "..."
    if len(text) > LABEL_MAX_CHARS:
        text = text[: LABEL_MAX_CHARS - len(ellipsis)] + ellipsis
    return text


def _elements(caption: dict) -> list:
    composition = caption.get("compositional_deconstruction")
    elements = composition.get("elements") if isinstance(composition, dict) else None
    return elements if isinstance(elements, list) else []


def _swatches(draw: ImageDraw.ImageDraw, colors, left: int, top: int, size: int, right_limit: int) -> None:
    """A row of square swatches from (left, top), skipping malformed colours, stopping at `right_limit`."""
    if not isinstance(colors, list):
        return
    x = left
    for color in colors:
        if not (isinstance(color, str) and COLOR_PATTERN.fullmatch(color)):
            continue
        if x + size - 1 > right_limit:
            break
        draw.rectangle((x, top, x + size - 1, top + size - 1), fill=color, outline=SWATCH_OUTLINE)
        x += size + max(1, size // 4)


def render_layout(caption, width: int, height: int, image: Image.Image | None = None) -> Image.Image:
    """Draw the layout a caption asks for, to check it before generating or to compare with the result.

    Every element with a well-formed bbox gets an outline (colour `OUTLINE_COLORS[i % 10]`), a label with its index
    (and, for text elements, its text, cut with an ellipsis) and its palette as small swatches inside the box.
    The style palette is a row of swatches along the bottom edge. Elements without a bbox (or with a malformed one)
    are listed in a legend above it. The caption is not validated here: run `check_caption` for that.

    Args:
        caption: a `Caption`, a caption dict or JSON text.
        width, height: the image size in pixels; bbox x values are scaled by `width`, y values by `height`.
        image: draw over this image (e.g. the generated one) instead of a white canvas; it must be
            `width` x `height`. It is not modified.

    Returns:
        A new RGB image of size (width, height).
    """
    for name, value in (("width", width), ("height", height)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ValueError(f"render_layout: `{name}` must be a positive int (pixels), got {value!r}.")
    if image is not None:
        if not isinstance(image, Image.Image):
            raise ValueError(f"render_layout: `image` must be a PIL image, got {type(image).__name__}.")
        if image.size != (width, height):
            raise ValueError(
                f"render_layout: `image` is {image.width}x{image.height} but width x height is "
                f"{width}x{height}; pass width={image.width}, height={image.height} or resize the image."
            )
    caption = caption_dict(caption, "render_layout")
    # convert() returns a new image even when the mode already matches: the caller's image is never drawn on.
    canvas = image.convert("RGB") if image is not None else Image.new("RGB", (width, height), CANVAS_COLOR)
    draw = ImageDraw.Draw(canvas)

    short_side = min(width, height)
    line_width = max(2, round(short_side / 256))
    font = _font(max(10, short_side // 48))
    margin = max(2, short_side // 128)

    boxed, unboxed = [], []
    for index, element in enumerate(_elements(caption)):
        element = element if isinstance(element, dict) else {}
        bbox = element.get("bbox")
        (boxed if _valid_bbox(bbox) else unboxed).append((index, element))

    # Outlines first, then swatches and labels on top so that no outline hides them.
    for index, element in boxed:
        box = bbox_to_pixels(element["bbox"], width, height)
        draw.rectangle(box, outline=OUTLINE_COLORS[index % len(OUTLINE_COLORS)], width=line_width)
    for index, element in boxed:
        left, top, right, bottom = bbox_to_pixels(element["bbox"], width, height)
        color = OUTLINE_COLORS[index % len(OUTLINE_COLORS)]
        swatch = max(4, min(24, (right - left) // 8, (bottom - top) // 4))
        swatch_top = bottom - line_width - swatch
        _swatches(draw, element.get("color_palette"), left + line_width + 1, swatch_top, swatch, right - line_width)

        if element.get("type") == TEXT_TYPE and isinstance(element.get("text"), str):
            label = f'#{index} "{element["text"]}"'
        else:
            label = f"#{index} obj"
        label = _label_text(label, font)
        x, y = left + line_width, top + line_width
        text_box = draw.textbbox((x, y), label, font=font)
        draw.rectangle((x, y, text_box[2] + 2, text_box[3] + 1), fill=color)
        draw.text((x + 1, y), label, fill=LABEL_TEXT_COLOR, font=font)

    style = caption.get("style_description")
    palette = style.get("color_palette") if isinstance(style, dict) else None
    palette_size = max(8, short_side // 32)
    palette_top = height - margin - palette_size
    _swatches(draw, palette, margin, palette_top, palette_size, width - margin)

    if unboxed:
        lines = []
        for index, element in unboxed:
            what = element.get("text") if element.get("type") == TEXT_TYPE else element.get("desc")
            reason = "no bbox" if element.get("bbox") is None else "invalid bbox"
            kind = element.get("type") if isinstance(element.get("type"), str) else "?"
            lines.append(
                _label_text(f"#{index} {kind}", font) + ": " + _label_text(str(what or ""), font) + f" ({reason})"
            )
        text = "\n".join(lines)
        bottom_edge = palette_top - margin if isinstance(palette, list) and palette else height - margin
        text_box = draw.multiline_textbbox((0, 0), text, font=font)
        # On a canvas too small for the legend it starts at the top and runs off the bottom.
        legend_top = max(0, bottom_edge - (text_box[3] - text_box[1]) - 2 * margin)
        bottom_edge = max(bottom_edge, legend_top)
        draw.rectangle((margin, legend_top, margin + text_box[2] + 2 * margin, bottom_edge), fill=LEGEND_BACKGROUND)
        draw.multiline_text((2 * margin, legend_top + margin - text_box[1]), text, fill=LEGEND_TEXT_COLOR, font=font)
    return canvas
