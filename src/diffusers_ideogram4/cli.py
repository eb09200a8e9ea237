"""The `ideogram4` command: `generate` an image from a caption, `edit` one, and the `caption` tools."""

import argparse
import sys
from pathlib import Path

from .captions import CAPTION_CHECK_MODES, CaptionError, check_prompts
from .captions.cli import add_caption_commands
from .constants import DEFAULT_IMAGE_SIDE
from .sampler import PRESETS


TINY_RANDOM = "tiny-random"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
CLI_OPT_OUT_HINT = (
    "Fix the caption, or pass --caption-check warn to generate anyway or --caption-check off to skip it."
)


def read_caption(value: str) -> str:
    """A caption given as a file path, `-` for stdin, or the JSON text itself (anything starting with `{`)."""
    if value == "-":
        return sys.stdin.read().rstrip("\n")
    if value.lstrip().startswith("{"):
        return value
    path = Path(value)
    if not path.is_file():
        raise ValueError(
            f"caption {value!r} is neither a file nor JSON text: pass a caption file, '-' for stdin, or the JSON "
            "caption itself (starting with '{')."
        )
    # A file's closing newline is not part of the caption (the prompt is tokenized verbatim).
    return path.read_text(encoding="utf-8").rstrip("\n")


def add_model_arguments(parser) -> None:
    """The options `generate` and `edit` share: the model, the sampler, the device, the caption check."""
    parser.add_argument(
        "--model",
        default="ideogram-ai/ideogram-4-nf4-diffusers",
        help=f"hub id or local folder; '{TINY_RANDOM}' builds a tiny random model offline (noise)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: quality_48")
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--offload", action="store_true", help="enable_model_cpu_offload (16 GB cards)")
    parser.add_argument("--caption-check", choices=CAPTION_CHECK_MODES, default="error")


def add_generate_command(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="Generate a PNG from a JSON caption.")
    parser.add_argument("caption", help="caption JSON file, '-' for stdin, or the JSON text itself")
    parser.add_argument("-o", "--output", default="ideogram4.png", help="PNG to write (default: ideogram4.png)")
    parser.add_argument("--height", type=int, default=DEFAULT_IMAGE_SIDE)
    parser.add_argument("--width", type=int, default=DEFAULT_IMAGE_SIDE)
    add_model_arguments(parser)
    parser.set_defaults(func=run_generate)


def check_model_arguments(args, caption: str) -> None:
    """What `generate` and `edit` check before a (possibly 16 GB) model is loaded."""
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps}: give a positive number of steps, or leave it out for the preset's.")
    try:
        check_prompts([caption], mode=args.caption_check)
    except CaptionError as error:
        raise CaptionError(error.issues, error.num_prompts, CLI_OPT_OUT_HINT) from None


def load_pipeline(args, pipeline_class=None):
    """The pipeline `--model` names, as `pipeline_class` (default `Ideogram4Pipeline`), placed on `--device`."""
    import torch

    from .pipeline_ideogram4 import Ideogram4Pipeline

    pipeline_class = pipeline_class or Ideogram4Pipeline
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model == TINY_RANDOM:
        from .testing import tiny_pipeline

        pipe = tiny_pipeline(seed=args.seed)
        pipe = pipe if pipeline_class is Ideogram4Pipeline else pipeline_class.from_pipe(pipe)
        pipe.set_progress_bar_config(disable=True)
        print(f"Using a tiny model with RANDOM weights: the image at {args.output} is noise, not a picture.")
    else:
        pipe = pipeline_class.from_pretrained(args.model, dtype=getattr(torch, DTYPES[args.dtype]))
    if args.offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def sampling_kwargs(args) -> dict:
    import torch

    return dict(
        num_inference_steps=args.steps,
        preset=args.preset,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
        caption_check="off",  # checked before loading
    )


def run_generate(args) -> int:
    from .validation import check_image_size

    # Everything that needs no model is checked before a (possibly 16 GB) model is loaded.
    caption = read_caption(args.caption)
    check_image_size(args.height, args.width)
    check_model_arguments(args, caption)
    pipe = load_pipeline(args)
    image = pipe(caption, height=args.height, width=args.width, **sampling_kwargs(args)).images[0]
    image.save(args.output)
    print(f"Wrote {args.output} ({image.width}x{image.height}, seed {args.seed}).")
    return 0


def add_edit_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "edit",
        help="Edit an image: image-to-image, or inpaint a mask or a caption element's box.",
        description="Without --mask or --element: image-to-image. With one: inpainting (white = repaint).",
    )
    parser.add_argument("caption", help="caption JSON file, '-' for stdin, or the JSON text itself")
    parser.add_argument("--image", required=True, help="the image to edit")
    region = parser.add_mutually_exclusive_group()
    region.add_argument("--mask", default=None, help="mask image of the image's size: white = repaint, black = keep")
    region.add_argument(
        "--element", type=int, action="append", default=None, help="repaint this caption element's bbox (repeatable)"
    )
    parser.add_argument("--pad", type=int, default=0, help="pixels around each --element box (default: 0)")
    parser.add_argument("--mask-blur", type=float, default=0, help="feathering of the mask edge in pixels")
    parser.add_argument("--padding-mask-crop", type=int, default=None, help="repaint a crop around the mask")
    parser.add_argument(
        "--strength", type=float, default=None, help="in (0, 1] (default: 0.6 image-to-image, 1.0 inpainting)"
    )
    parser.add_argument("-o", "--output", default="ideogram4_edit.png", help="PNG to write")
    parser.add_argument("--height", type=int, default=None, help="default: the image's")
    parser.add_argument("--width", type=int, default=None, help="default: the image's")
    parser.add_argument(
        "--resize", choices=("default", "fill", "crop"), default=None, help="resize to --height/--width"
    )
    add_model_arguments(parser)
    parser.set_defaults(func=run_edit)


def _open_image(option: str, path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.copy()
    except (OSError, UnidentifiedImageError) as error:  # missing, unreadable, not an image
        raise ValueError(f"{option} {path!r} cannot be read as an image ({error}); give a PNG or JPEG file.") from None


def run_edit(args) -> int:
    from .canvas import mask_from_caption
    from .pipeline_ideogram4_edit import (
        DEFAULT_IMG2IMG_STRENGTH,
        DEFAULT_INPAINT_STRENGTH,
        Ideogram4Img2ImgPipeline,
        Ideogram4InpaintPipeline,
        check_edit_inputs,
    )

    # Everything that needs no model is checked before a (possibly 16 GB) model is loaded.
    caption = read_caption(args.caption)
    image = _open_image("--image", args.image)
    mask = _open_image("--mask", args.mask) if args.mask else None
    if args.element is not None:
        mask = mask_from_caption(caption, args.element, height=image.height, width=image.width, pad=args.pad)
    inpainting = mask is not None
    if args.pad and args.element is None:
        raise ValueError(f"--pad {args.pad} grows --element boxes; add --element, or draw the padding into --mask.")
    if not inpainting and (args.mask_blur or args.padding_mask_crop is not None):
        raise ValueError("--mask-blur and --padding-mask-crop shape an inpainting mask; add --mask or --element.")
    strength = args.strength
    if strength is None:
        strength = DEFAULT_INPAINT_STRENGTH if inpainting else DEFAULT_IMG2IMG_STRENGTH
    check_edit_inputs(
        image,
        mask,
        strength=strength,
        height=args.height,
        width=args.width,
        resize_mode=args.resize,
        padding_mask_crop=args.padding_mask_crop,
    )
    check_model_arguments(args, caption)
    region = {"mask_image": mask, "mask_blur": args.mask_blur, "padding_mask_crop": args.padding_mask_crop}
    pipe = load_pipeline(args, Ideogram4InpaintPipeline if inpainting else Ideogram4Img2ImgPipeline)
    edited = pipe(
        caption,
        image=image,
        strength=strength,
        height=args.height,
        width=args.width,
        resize_mode=args.resize,
        **(region if inpainting else {}),
        **sampling_kwargs(args),
    ).images[0]
    edited.save(args.output)
    what = "inpainted" if inpainting else "image-to-image"
    print(f"Wrote {args.output} ({edited.width}x{edited.height}, {what}, strength {strength}, seed {args.seed}).")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ideogram4", description="Ideogram 4 with diffusers.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_command(subparsers)
    add_edit_command(subparsers)
    add_caption_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:  # bad input: one clear line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
