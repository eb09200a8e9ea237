"""The `ideogram4` command: `generate` an image from a caption, `batch` many from a job file, `reproduce` an image
from the recipe it carries, and the `caption` tools."""

import argparse
import sys
from pathlib import Path

from .captions import CAPTION_CHECK_MODES, CaptionError, check_prompts
from .captions.cli import add_caption_commands
from .constants import DEFAULT_IMAGE_SIDE
from .recipe import DTYPES, TINY_RANDOM
from .sampler import PRESETS


DEFAULT_MODEL = "ideogram-ai/ideogram-4-nf4-diffusers"
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


def add_generate_command(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="Generate a PNG from a JSON caption.")
    parser.add_argument("caption", help="caption JSON file, '-' for stdin, or the JSON text itself")
    parser.add_argument("-o", "--output", default="ideogram4.png", help="PNG to write (default: ideogram4.png)")
    add_model_options(parser, tiny_seed="--seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=DEFAULT_IMAGE_SIDE)
    parser.add_argument("--width", type=int, default=DEFAULT_IMAGE_SIDE)
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: quality_48")
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--caption-check", choices=CAPTION_CHECK_MODES, default="error")
    parser.set_defaults(func=run_generate)


def run_generate(args) -> int:
    import torch

    from .pipeline_ideogram4 import check_image_size
    from .recipe import build_recipe, pipeline_arguments, resolve_sampling, seeded_generator, write_png

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
    model = model_spec(args, tiny_seed=args.seed)
    pipe = model.load_pipeline(device, args.offload)
    if model.id == TINY_RANDOM:
        print(f"Using a tiny model with RANDOM weights: the image at {args.output} is noise, not a picture.")
    sampling = resolve_sampling(pipe, args.preset, args.steps, args.guidance_scale)
    recipe = build_recipe(caption, args.seed, args.height, args.width, sampling, model, pipe._execution_device.type)
    image = pipe(
        caption,
        generator=seeded_generator(args.seed),
        caption_check="off",  # checked above
        **pipeline_arguments(recipe),
    ).images[0]
    if args.output.lower().endswith(".png"):
        write_png(image, args.output, recipe)  # with its recipe, for `ideogram4 reproduce`
    else:
        image.save(args.output)
    print(f"Wrote {args.output} ({image.width}x{image.height}, seed {args.seed}).")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Model options shared by generate, batch and reproduce


def add_device_options(parser) -> None:
    parser.add_argument(
        "--device", default=None, help="default: cuda if available, else cpu (batch under accelerate: each process's)"
    )
    parser.add_argument("--offload", action="store_true", help="enable_model_cpu_offload (16 GB cards)")


def add_model_options(parser, tiny_seed: str) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub id or local folder; '{TINY_RANDOM}' builds a tiny random model offline (noise; weights seeded "
        f"with {tiny_seed})",
    )
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit (default: main)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help=f"default bf16 (fp32 for {TINY_RANDOM})")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a LoRA .safetensors file and its scale (default 1.0); repeat for several",
    )
    add_device_options(parser)


def model_spec(args, tiny_seed: int):
    from .recipe import ModelSpec

    return ModelSpec.from_options(args.model, args.revision, args.dtype, args.lora, tiny_seed=tiny_seed)


# ----------------------------------------------------------------------------------------------------------------------
# batch and reproduce


def add_batch_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="Generate every image of a JSON Lines job file, resumably; runs as is under `accelerate launch`.",
    )
    parser.add_argument("jobs", help="job file: one JSON object per line (caption, seed(s), size, preset, name...)")
    parser.add_argument("--out", required=True, help="folder for the images and manifest.jsonl (created if missing)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="images per pipeline call, among images of equal size, schedule and caption token count (default 1)",
    )
    parser.add_argument(
        "--skip-invalid", action="store_true", help="record invalid lines in the manifest and generate the others"
    )
    parser.add_argument("--force", action="store_true", help="regenerate images that are already done")
    add_model_options(parser, tiny_seed="0")
    parser.set_defaults(func=run_batch)


def run_batch(args) -> int:
    from .batch import CLI_SKIP_HINT, check_out_dir, check_token_limits, generate_batch, process_state, read_jobs

    state = process_state()
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: give a positive number of images per call.")
        if args.device is not None and state.num_processes > 1:
            raise ValueError(
                f"--device {args.device} would put all {state.num_processes} processes on one device; leave it out "
                "under accelerate launch (each process uses its own)."
            )
        check_out_dir(args.out, "--out")
        jobs = read_jobs(args.jobs)
        if jobs.problems and not args.skip_invalid:
            raise jobs.error(CLI_SKIP_HINT)
        model = model_spec(args, tiny_seed=0)
        check_token_limits(jobs, model.load_tokenizer())  # before the weights
        if jobs.problems and not args.skip_invalid:
            raise jobs.error(CLI_SKIP_HINT)
        if model.id == TINY_RANDOM and state.is_main_process:
            print("Using a tiny model with RANDOM weights: the images are noise, not pictures.")
        pipe = model.load_pipeline(args.device or state.device, args.offload)
        result = generate_batch(
            pipe,
            jobs,
            args.out,
            model=model,
            batch_size=args.batch_size,
            skip_invalid=args.skip_invalid,
            force=args.force,
        )
    except ValueError:
        if not state.is_main_process:  # every process finds the same error; one prints it
            return 2
        raise
    if state.is_main_process:
        print("\n".join(result.summary()))
    state.wait_for_everyone()  # a process that exits first may make the launcher stop the others mid-print
    return 0 if result.ok else 1


def add_reproduce_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "reproduce", help="Generate an image again from the recipe it carries (model, LoRAs, caption, seed...)."
    )
    parser.add_argument("image", help="a PNG written by `ideogram4 generate` or `ideogram4 batch`")
    parser.add_argument("-o", "--output", default=None, help="PNG to write (default: IMAGE.reproduced.png beside it)")
    add_device_options(parser)
    parser.set_defaults(func=run_reproduce)


def run_reproduce(args) -> int:
    import torch
    from PIL import Image

    from .recipe import read_recipe, reproduce_image, write_png

    recipe = read_recipe(args.image)
    source = Path(args.image)
    output = Path(args.output) if args.output else source.with_name(f"{source.stem}.reproduced.png")
    if output.suffix.lower() != ".png":
        raise ValueError(f"-o {str(output)!r}: the output is a PNG (it carries the recipe); name it *.png.")
    if output.exists() and output.resolve() == source.resolve():
        raise ValueError(f"-o {str(output)!r} is the image itself; write the reproduction to another file.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = recipe["made_with"].get("cpu_threads")
    if torch.device(device).type == "cpu" and threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)  # the CPU's result depends on how sums are split between threads
        print(f"Using {threads} CPU thread(s), as the image was made with.")
    image, new_recipe = reproduce_image(recipe, device, args.offload)
    write_png(image, output, new_recipe)
    with Image.open(source) as original:
        same = original.convert("RGB").tobytes() == image.convert("RGB").tobytes()
    if same:
        print(f"Wrote {output}: the same pixels as {source}.")
        return 0
    before, now = recipe["made_with"], new_recipe["made_with"]
    changed = [
        f"{key} {before.get(key)} -> {now.get(key)}" for key in sorted(before | now) if before.get(key) != now.get(key)
    ]
    detail = f"made with {', '.join(changed)}" if changed else "same software and device"
    print(f"Wrote {output}: the pixels differ from {source} ({detail}).")
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ideogram4", description="Ideogram 4 with diffusers.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_command(subparsers)
    add_batch_command(subparsers)
    add_reproduce_command(subparsers)
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
