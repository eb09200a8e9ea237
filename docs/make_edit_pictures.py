"""Make the README's editing pictures: `python docs/make_edit_pictures.py` (CPU, offline, a few seconds).

The input poster is drawn here with PIL after examples/poster.json's layout; the edited result comes from the tiny
RANDOM model of `diffusers_ideogram4.testing` (no Ideogram 4 weights are available to this project), so the repainted
region is noise: the pictures show where an edit acts, not what the real model paints.
"""

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from diffusers_ideogram4 import (
    Ideogram4InpaintPipeline,
    expand_canvas,
    expand_caption,
    mask_from_caption,
    overlay_mask,
    render_layout,
    repainted_area,
)
from diffusers_ideogram4.captions.preview import bbox_to_pixels
from diffusers_ideogram4.testing import tiny_pipeline


ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SIDE = 384
MARGIN = 64  # outpainting: pixels added left and right


def draw_poster(caption: str) -> Image.Image:
    """A flat stand-in for a generated poster: striped sky, sea, the title and a lighthouse in their boxes."""
    import json

    elements = json.loads(caption)["compositional_deconstruction"]["elements"]
    poster = Image.new("RGB", (SIDE, SIDE), "#F2C14E")
    draw = ImageDraw.Draw(poster)
    for index, color in enumerate(("#F78154", "#F2C14E", "#F78154")):
        draw.rectangle((0, 40 * index + 60, SIDE, 40 * index + 80), fill=color)
    draw.rectangle((0, SIDE * 2 // 3, SIDE, SIDE), fill="#4D9078")
    left, top, right, bottom = bbox_to_pixels(elements[0]["bbox"], SIDE, SIDE)
    try:
        font = ImageFont.load_default(size=(bottom - top) // 2)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    draw.text(((left + right) // 2, (top + bottom) // 2), elements[0]["text"], fill="#1B2A41", font=font, anchor="mm")
    left, top, right, bottom = bbox_to_pixels(elements[1]["bbox"], SIDE, SIDE)
    draw.polygon([(left + 30, bottom), (right - 30, bottom), (right - 45, top + 30), (left + 45, top + 30)], "white")
    draw.rectangle((left + 38, (top + bottom) // 2, right - 38, (top + bottom) // 2 + 25), fill="#E63946")
    draw.rectangle((left, bottom - 20, right, bottom), fill="#1B2A41")
    return poster


def main() -> None:
    caption = (ROOT / "examples" / "poster.json").read_text(encoding="utf-8").rstrip("\n")
    poster = draw_poster(caption)
    poster.save(DOCS / "edit_input.png", optimize=True)

    # Inpainting: regenerate the headline (element 0), with 8 pixels of margin around its box.
    mask = mask_from_caption(caption, 0, height=SIDE, width=SIDE, pad=8)
    mask.save(DOCS / "edit_mask.png", optimize=True)
    preview = render_layout(caption, SIDE, SIDE, image=poster)
    overlay_mask(preview, repainted_area(mask)).save(DOCS / "edit_layout_mask.png", optimize=True)

    pipe = Ideogram4InpaintPipeline.from_pipe(tiny_pipeline(seed=0))
    pipe.set_progress_bar_config(disable=True)
    edited = pipe(
        caption,
        image=poster,
        mask_image=mask,
        padding_mask_crop=32,
        height=256,
        width=512,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    edited.save(DOCS / "edit_result_tiny_random.png", optimize=True)

    # Outpainting: 64 more pixels on each side, the caption's boxes moved with the poster.
    canvas, canvas_mask = expand_canvas(poster, left=MARGIN, right=MARGIN)
    wider = expand_caption(caption, width=SIDE, height=SIDE, left=MARGIN, right=MARGIN)
    preview = render_layout(wider, canvas.width, canvas.height, image=canvas)
    overlay_mask(preview, repainted_area(canvas_mask)).save(DOCS / "edit_outpaint_layout_mask.png", optimize=True)


if __name__ == "__main__":
    main()
