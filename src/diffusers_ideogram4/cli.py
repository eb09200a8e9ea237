"""The `ideogram4` command: `generate` an image from a caption, and the `caption` tools."""

import argparse
import math
import sys
from pathlib import Path

from .captions import CAPTION_CHECK_MODES, CaptionError, check_prompts
from .captions.cli import add_caption_commands
from .constants import DEFAULT_IMAGE_SIDE
from .files import STDIN, check_image_path, read_text, save_image
from .sampler import PRESETS


TINY_RANDOM = "tiny-random"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
CLI_OPT_OUT_HINT = (
    "Fix the caption, or pass --caption-check warn to generate anyway or --caption-check off to skip it."
)


def read_caption(value: str) -> str:
    """A caption given as a file path, `-` for stdin, or the JSON text itself (anything starting with `{`)."""
    if value == STDIN:
        return read_text(STDIN).rstrip("\n")
    if value.lstrip().startswith("{"):
        return value
    path = Path(value)
    if not path.is_file():
        raise ValueError(
            f"caption {value!r} is neither a file nor JSON text: pass a caption file, '-' for stdin, or the JSON "
            "caption itself (starting with '{')."
        )
    # A file's closing newline is not part of the caption (the prompt is tokenized verbatim).
    return read_text(value).rstrip("\n")


# torch.Generator.manual_seed takes what fits a signed or an unsigned 64-bit integer.
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_generate_arguments(args) -> None:
    """Every `generate` argument that can be checked without a model, so that no mistake costs a model load."""
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps}: give a positive number of steps, or leave it out for the preset's.")
    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        raise ValueError(
            f"--guidance-scale {args.guidance_scale}: give a finite number (the presets guide with 7.0, then 3.0), "
            "or leave it out for the preset's schedule."
        )
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise ValueError(
            f"--seed {args.seed} is out of range: give a whole number from {SEED_RANGE[0]} to {SEED_RANGE[1]}."
        )
    check_image_path(args.output)
    check_model_argument(args.model)


def check_model_argument(model: str) -> None:
    """`--model` is a folder, a hub repo id, or `tiny-random`; a path that does not exist is not taken for a repo id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(model)
    if model == TINY_RANDOM or path.is_dir():
        return
    if path.exists():
        raise ValueError(f"--model {model} is a file: give the model's folder (with model_index.json) or a hub id.")
    try:
        validate_repo_id(model)
    except HFValidationError:
        raise ValueError(
            f"--model {model}: there is no such folder, and it is not a hub repo id (owner/name) either."
        ) from None


def resolve_device(value: str | None):
    """`--device` as a torch.device this machine has (default: cuda when available, else cpu).

    Raises:
        ValueError: the string is not a device, or names a device type or index this machine does not have.
    """
    import torch

    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
        module = torch.get_device_module(device.type)
    except RuntimeError as error:
        reason = str(error).splitlines()[0]
        raise ValueError(
            f"--device {value!r} is not a device this torch can use ({reason}); try cpu or cuda."
        ) from None
    count = module.device_count() if module.is_available() else 0
    if count == 0:
        raise ValueError(f"--device {value}: this machine has no {device.type} device; use --device cpu.")
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"--device {value}: this machine has {count} {device.type} device(s), numbered from 0 to {count - 1}."
        )
    return device


def add_generate_command(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="Generate a PNG from a JSON caption.")
    parser.add_argument("caption", help="caption JSON file, '-' for stdin, or the JSON text itself")
    parser.add_argument(
        "-o",
        "--output",
        default="ideogram4.png",
        help="image to write, format from the extension (default: ideogram4.png)",
    )
    parser.add_argument(
        "--model",
        default="ideogram-ai/ideogram-4-nf4-diffusers",
        help=f"hub id or local folder; '{TINY_RANDOM}' builds a tiny random model offline (noise)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=DEFAULT_IMAGE_SIDE)
    parser.add_argument("--width", type=int, default=DEFAULT_IMAGE_SIDE)
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: quality_48")
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--offload", action="store_true", help="enable_model_cpu_offload (16 GB cards)")
    parser.add_argument("--caption-check", choices=CAPTION_CHECK_MODES, default="error")
    parser.set_defaults(func=run_generate)


def run_generate(args) -> int:
    import torch

    from .pipeline_ideogram4 import Ideogram4Pipeline
    from .validation import check_image_size

    # Everything that needs no model is checked before a (possibly 16 GB) model is loaded.
    caption = read_caption(args.caption)
    check_image_size(args.height, args.width)
    check_generate_arguments(args)
    device = resolve_device(args.device)
    try:
        check_prompts([caption], mode=args.caption_check)
    except CaptionError as error:
        raise CaptionError(error.issues, error.num_prompts, CLI_OPT_OUT_HINT) from None
    if args.model == TINY_RANDOM:
        from .testing import tiny_pipeline

        pipe = tiny_pipeline(seed=args.seed)
        print(f"Using a tiny model with RANDOM weights: the image at {args.output} is noise, not a picture.")
    else:
        dtype = getattr(torch, DTYPES[args.dtype])
        try:
            pipe = Ideogram4Pipeline.from_pretrained(args.model, dtype=dtype)
        except OSError as error:  # a repo that does not exist or is not cached offline, a folder without the files
            raise ValueError(f"cannot load --model {args.model}: {str(error).splitlines()[0]}") from None
    if args.offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    image = pipe(
        caption,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        preset=args.preset,
        guidance_scale=args.guidance_scale,
        generator=generator,
        caption_check="off",  # checked above
    ).images[0]
    save_image(image, args.output)  # encoded in memory, then written completely or not at all
    print(f"Wrote {args.output} ({image.width}x{image.height}, seed {args.seed}).")
    return 0


class OneLineErrors(argparse.ArgumentParser):
    """argparse, with a mistake in the arguments reported like every other mistake: one `error:` line, exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="ideogram4", description="Ideogram 4 with diffusers.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_command(subparsers)
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
