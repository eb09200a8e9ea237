"""The `ideogram4` command: `generate` an image from a caption, and the `caption` tools."""

import argparse
import sys
from pathlib import Path

from .captions import CAPTION_CHECK_MODES, CaptionError, check_prompts
from .captions.cli import add_caption_commands
from .constants import DEFAULT_IMAGE_SIDE
from .sampler import PRESETS


TINY_RANDOM = "tiny-random"
DEFAULT_MODEL = "ideogram-ai/ideogram-4-nf4-diffusers"
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
            "caption itself (starting with '{'). To turn an idea into a caption, run "
            '`ideogram4 caption expand "idea" -o caption.json` first.'
        )
    # A file's closing newline is not part of the caption (the prompt is tokenized verbatim).
    return path.read_text(encoding="utf-8").rstrip("\n")


def add_generate_command(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="Generate a PNG from a JSON caption.")
    parser.add_argument("caption", help="caption JSON file, '-' for stdin, or the JSON text itself")
    parser.add_argument("-o", "--output", default="ideogram4.png", help="PNG to write (default: ideogram4.png)")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
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

    from .pipeline_ideogram4 import Ideogram4Pipeline, check_image_size

    # Everything that needs no model is checked before a (possibly 16 GB) model is loaded.
    caption = read_caption(args.caption)
    check_image_size(args.height, args.width)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps}: give a positive number of steps, or leave it out for the preset's.")
    try:
        check_prompts([caption], mode=args.caption_check)
    except CaptionError as error:
        raise CaptionError(error.issues, error.num_prompts, CLI_OPT_OUT_HINT) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model == TINY_RANDOM:
        from .testing import tiny_pipeline

        pipe = tiny_pipeline(seed=args.seed)
        print(f"Using a tiny model with RANDOM weights: the image at {args.output} is noise, not a picture.")
    else:
        dtype = getattr(torch, DTYPES[args.dtype])
        pipe = Ideogram4Pipeline.from_pretrained(args.model, dtype=dtype)
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
    image.save(args.output)
    print(f"Wrote {args.output} ({image.width}x{image.height}, seed {args.seed}).")
    return 0


def expansion_limits(args):
    """`--max-elements` and `--max-chars` as `CaptionLimits` (None when neither is given)."""
    from .captions.grammar import CaptionLimits

    if args.max_elements is None and args.max_chars is None:
        return None
    changes = {} if args.max_elements is None else {"max_elements": args.max_elements}
    if args.max_chars is not None:
        changes.update(
            dict.fromkeys(("description_chars", "style_chars", "element_chars", "text_chars"), args.max_chars)
        )
    return CaptionLimits(**changes)


def run_caption_expand(args) -> int:
    """`ideogram4 caption expand IDEA`: load only what decoding needs (text encoder, tokenizer, LM head)."""
    import torch

    from .captions.grammar import require_llguidance
    from .prompt_expansion import (
        DEFAULT_TEMPERATURE,
        HEAD_REPO,
        Ideogram4PromptEnhancerHead,
        check_expansion_arguments,
    )

    # Everything that needs no model is checked before a (16 GB) text encoder is loaded.
    idea = sys.stdin.read().rstrip("\n") if args.idea == "-" else args.idea
    temperature = DEFAULT_TEMPERATURE if args.temperature is None else args.temperature
    limits = expansion_limits(args)
    check_expansion_arguments(idea, args.height, args.width, None, temperature, args.max_new_tokens, limits)
    require_llguidance()
    if args.model == TINY_RANDOM and args.head is not None:
        raise ValueError("--head does nothing with --model tiny-random (it builds its own random head); drop it.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model == TINY_RANDOM:
        from .testing import tiny_pipeline

        pipe = tiny_pipeline(seed=args.seed, prompt_enhancer_head=True)
        print("Using a tiny model with RANDOM weights: the caption is valid but meaningless.", file=sys.stderr)
    else:
        from .pipeline_ideogram4 import Ideogram4Pipeline

        dtype = getattr(torch, DTYPES[args.dtype])
        head = Ideogram4PromptEnhancerHead.from_pretrained(args.head or HEAD_REPO, dtype=dtype)
        pipe = Ideogram4Pipeline.from_pretrained(
            args.model or DEFAULT_MODEL,
            dtype=dtype,
            transformer=None,
            unconditional_transformer=None,
            vae=None,
            prompt_enhancer_head=head,
        )
    if args.offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    caption = pipe.expand_prompt(
        idea,
        height=args.height,
        width=args.width,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
        temperature=temperature,
        max_new_tokens=args.max_new_tokens,
        limits=limits,
    )
    if args.output is None:
        print(caption)
    else:
        Path(args.output).write_text(caption + "\n", encoding="utf-8")
        print(f"Wrote {args.output} (seed {args.seed}).", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ideogram4", description="Ideogram 4 with diffusers.")
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
