"""The `ideogram4` command: `generate` an image from a caption, `edit` one, `batch` many from a job file, `reproduce`
an image from the recipe it carries, and the `caption` tools."""

import argparse
import math
import sys
from dataclasses import fields
from pathlib import Path

from .captions import CAPTION_CHECK_MODES, CaptionError, check_prompts
from .captions.cli import add_caption_commands, add_expansion_options
from .commands import exit_code
from .constants import DEFAULT_IMAGE_SIDE
from .files import STDIN, check_image_path, check_output_path, read_text, save_image, write_atomically
from .recipe import DEFAULT_DTYPE, DTYPES, SEED_RANGE, TINY_RANDOM, ModelSpec, expand_idea, seeded_generator
from .sampler import PRESETS


DEFAULT_MODEL = "ideogram-ai/ideogram-4-nf4-diffusers"
CLI_OPT_OUT_HINT = (
    "Fix the caption, or pass --caption-check warn to generate anyway or --caption-check off to skip it."
)


def read_caption(value: str) -> str:
    """A caption given as a file path, `-` for stdin, or the JSON text itself (anything starting with `{`)."""
    if value.lstrip().startswith("{"):
        return value
    if value != STDIN and not Path(value).is_file():
        raise ValueError(
            f"caption {value!r} is neither a file nor JSON text: pass a caption file, '-' for stdin, or the JSON "
            "caption itself (starting with '{'). To turn an idea into a caption, run "
            '`ideogram4 caption expand "idea" -o caption.json` first (or `ideogram4 generate "idea" --idea`).'
        )
    # A file's closing newline is not part of the caption (the prompt is tokenized verbatim).
    return read_text(value).rstrip("\n")


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


def check_model_argument(model: str, option: str = "--model") -> None:
    """`--model` is a folder, a hub repo id, or `tiny-random`; a path that does not exist is not taken for a repo id.
    (`--head` likewise.)"""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(model)
    if model == TINY_RANDOM or path.is_dir():
        return
    if path.exists():
        what = "model's folder (with model_index.json)" if option == "--model" else "folder"
        raise ValueError(f"{option} {model} is a file: give the {what} or a hub id.")
    try:
        validate_repo_id(model)
    except HFValidationError:
        raise ValueError(
            f"{option} {model}: there is no such folder, and it is not a hub repo id (owner/name) either."
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


def load_pipeline(model, device, offload: bool):
    """`model.load_pipeline`, with a model that cannot be loaded (a repo that does not exist or is not cached
    offline, a folder without the files) reported in one line."""
    try:
        return model.load_pipeline(device, offload)
    except OSError as error:
        raise ValueError(f"cannot load --model {model.id}: {str(error).splitlines()[0]}") from None


def load_image_model(args, device, head=None):
    """-> (the `ModelSpec` of `--model` (with the prompt-enhancer `head` when given), its pipeline loaded with
    `load_pipeline`), saying so when its weights are random (`generate` and `edit`, whose seed also seeds the tiny
    model's weights)."""
    model = model_spec(args, tiny_seed=args.seed, head=head)
    pipe = load_pipeline(model, device, args.offload)
    if model.id == TINY_RANDOM:
        print(f"Using a tiny model with RANDOM weights: the image at {args.output} is noise, not a picture.")
    return model, pipe


def add_generate_command(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="Generate a PNG from a JSON caption.")
    parser.add_argument(
        "caption", help="caption JSON file, '-' for stdin, or the JSON text itself (with --idea: a plain-text idea)"
    )
    parser.add_argument(
        "-o",
        "--output",
        default="ideogram4.png",
        help="image to write, format from the extension; a .png carries its recipe (default: ideogram4.png)",
    )
    parser.add_argument("--height", type=int, default=DEFAULT_IMAGE_SIDE)
    parser.add_argument("--width", type=int, default=DEFAULT_IMAGE_SIDE)
    parser.add_argument(
        "--idea",
        action="store_true",
        help="CAPTION is a plain-text idea: expand it into a caption first, seeded by --seed (loads the "
        'prompt-enhancer head; needs `pip install "diffusers-ideogram4[expand]"`)',
    )
    add_sampling_options(parser)
    add_model_options(parser, tiny_seed="--seed")
    add_idea_options(parser, "--idea")
    parser.set_defaults(func=run_generate)


def add_sampling_options(parser) -> None:
    """The seed, the sampler and the caption check: shared by `generate` and `edit`."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: quality_48")
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--caption-check", choices=CAPTION_CHECK_MODES, default="error")


def checked_caption(args, caption: str) -> None:
    """The caption checked as `--caption-check` says, with the command line's opt-out hint on an error."""
    try:
        check_prompts([caption], mode=args.caption_check)
    except CaptionError as error:
        raise CaptionError(error.issues, error.num_prompts, CLI_OPT_OUT_HINT) from None


def run_generate(args) -> int:
    from .recipe import build_recipe, expansion_record, resolve_sampling, run_recipes, write_png
    from .validation import check_image_size

    # Everything that needs no model is checked before a (possibly 16 GB) model is loaded.
    idea = caption = None
    if args.idea:
        idea = read_text(STDIN).rstrip("\n") if args.caption == STDIN else args.caption
    else:
        caption = read_caption(args.caption)
    check_image_size(args.height, args.width)
    check_generate_arguments(args)
    expansion = idea_options(args, needed=args.idea, unused="without --idea, nothing is expanded")
    if args.idea and args.caption_check != "error":
        raise ValueError(
            f"--caption-check {args.caption_check}: an expanded idea always passes the caption check; drop it."
        )
    if args.idea:
        check_idea(idea, args, expansion, "--idea")
    device = resolve_device(args.device)
    if not args.idea:
        checked_caption(args, caption)
    model, pipe = load_image_model(args, device, head=head_argument(args) if args.idea else None)
    sampling = resolve_sampling(pipe, args.preset, args.steps, args.guidance_scale)
    record = None
    if args.idea:
        caption = expand_idea(pipe, idea, args.seed, args.height, args.width, expansion)
        record = expansion_record(idea, model.head, expansion["temperature"], expansion["limits"])
    recipe = build_recipe(
        caption, args.seed, args.height, args.width, sampling, model, pipe._execution_device.type, record
    )
    image = run_recipes(pipe, [recipe])[0]
    if args.output.lower().endswith(".png"):
        write_png(image, args.output, recipe)  # with its recipe, for `ideogram4 reproduce`; complete or not at all
    else:
        save_image(image, args.output)  # encoded in memory, then written completely or not at all
    print(f"Wrote {args.output} ({image.width}x{image.height}, seed {args.seed}).")
    if args.idea:
        print(f"Caption: {caption}")
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
    parser.add_argument("-o", "--output", default="ideogram4_edit.png", help="image to write (format from extension)")
    parser.add_argument("--height", type=int, default=None, help="default: the image's")
    parser.add_argument("--width", type=int, default=None, help="default: the image's")
    parser.add_argument(
        "--resize", choices=("default", "fill", "crop"), default=None, help="resize to --height/--width"
    )
    add_sampling_options(parser)
    add_model_options(parser, tiny_seed="--seed")
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
    shape = {"strength": strength, "height": args.height, "width": args.width, "resize_mode": args.resize}
    region = {"mask_image": mask, "mask_blur": args.mask_blur, "padding_mask_crop": args.padding_mask_crop}
    check_edit_inputs(image, **region, **shape)
    check_generate_arguments(args)
    device = resolve_device(args.device)
    checked_caption(args, caption)
    _, pipe = load_image_model(args, device)
    pipe = (Ideogram4InpaintPipeline if inpainting else Ideogram4Img2ImgPipeline).from_pipe(pipe)
    edited = pipe(
        caption,
        image=image,
        **shape,
        num_inference_steps=args.steps,
        preset=args.preset,
        guidance_scale=args.guidance_scale,
        generator=seeded_generator(args.seed),
        caption_check="off",  # checked before loading
        **(region if inpainting else {}),
    ).images[0]
    save_image(edited, args.output)  # complete or not at all
    what = "inpainted" if inpainting else "image-to-image"
    print(f"Wrote {args.output} ({edited.width}x{edited.height}, {what}, strength {strength}, seed {args.seed}).")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Model options shared by generate, edit, batch and reproduce


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
    parser.add_argument(
        "--unconditional-lora",
        default=None,
        metavar="PATH[:SCALE]",
        help="single-transformer mode: the LoRA that makes the conditional transformer compute the unconditional "
        "pass (the unconditional transformer is then not loaded)",
    )
    add_device_options(parser)


def model_spec(args, tiny_seed: int, head: str | None = None) -> ModelSpec:
    return ModelSpec.from_options(
        args.model, args.revision, args.dtype, args.lora, tiny_seed, args.unconditional_lora, head
    )


# ----------------------------------------------------------------------------------------------------------------------
# Ideas: `generate --idea` and the `idea` jobs of `batch`


def add_idea_options(parser, when: str) -> None:
    """The head and the expansion settings, used only `when` there is an idea to expand."""
    from .prompt_expansion import HEAD_REPO

    parser.add_argument(
        "--head",
        default=None,
        help=f"hub id or folder of the prompt-enhancer head, loaded only {when} (default: {HEAD_REPO}; "
        f"{TINY_RANDOM} builds its own)",
    )
    add_expansion_options(parser)


def idea_options(args, needed: bool, unused: str) -> dict:
    """`--temperature`, `--max-elements`, `--max-chars` (every `*_chars` limit) as `expand_prompt` keywords (its
    defaults filled in; `limits` None when neither is given); refused, like `--head`, when nothing is expanded
    (`unused` says why)."""
    from .captions.grammar import CaptionLimits
    from .prompt_expansion import DEFAULT_TEMPERATURE

    options = ("head", "temperature", "max_elements", "max_chars")  # `--head` and `add_expansion_options`'
    given = [f"--{name.replace('_', '-')}" for name in options if getattr(args, name) is not None]
    if given and not needed:
        raise ValueError(f"{' and '.join(given)}: {unused}; drop {'it' if len(given) == 1 else 'them'}.")
    limits = {} if args.max_elements is None else {"max_elements": args.max_elements}
    if args.max_chars is not None:
        limits |= {field.name: args.max_chars for field in fields(CaptionLimits) if field.name.endswith("_chars")}
    temperature = DEFAULT_TEMPERATURE if args.temperature is None else args.temperature
    return {"temperature": temperature, "limits": CaptionLimits(**limits) if limits else None}


def head_argument(args) -> str:
    """`--head` as `ModelSpec.from_options` takes it: the tiny random head with the tiny model."""
    from .prompt_expansion import HEAD_REPO

    if args.model == TINY_RANDOM:
        if args.head is not None:
            raise ValueError(
                f"--head does nothing with --model {TINY_RANDOM} (it builds its own random head); drop it."
            )
        return TINY_RANDOM
    if args.head is not None:
        check_model_argument(args.head, "--head")
    return args.head or HEAD_REPO


def check_idea(idea: str, args, expansion: dict, what: str) -> None:
    """The idea and the expansion settings as `expand_prompt` checks them, and llguidance (else a ValueError, one
    line on the command line, that starts with `what` and says how to install it)."""
    from .captions.grammar import require_llguidance
    from .prompt_expansion import check_expansion_arguments

    check_expansion_arguments(idea, args.height, args.width, None, **{"max_new_tokens": None, **expansion})
    try:
        require_llguidance()
    except ImportError as error:
        raise ValueError(f"{what}: {error}") from None


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
    add_idea_options(parser, "when the job file has an `idea` line")
    parser.set_defaults(func=run_batch)


def run_batch(args) -> int:
    from .batch import (
        CLI_SKIP_HINT,
        check_expansion_kwargs,
        check_no_other_run,
        check_out_dir,
        check_token_limits,
        generate_batch,
        process_state,
        read_jobs,
    )

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
        check_model_argument(args.model)
        device = resolve_device(args.device) if args.device is not None else state.device
        check_no_other_run(args.out)
        jobs = read_jobs(args.jobs)
        if jobs.problems and not args.skip_invalid:
            raise jobs.error(CLI_SKIP_HINT)
        ideas = bool(jobs.idea_lines)
        options = idea_options(args, ideas, f"no valid line of {jobs.source} has an `idea`, so nothing is expanded")
        expansion = check_expansion_kwargs(jobs, options) if ideas else None
        model = model_spec(args, tiny_seed=0, head=head_argument(args) if ideas else None)
        check_token_limits(jobs, model.load_tokenizer())  # before the weights
        if jobs.problems and not args.skip_invalid:
            raise jobs.error(CLI_SKIP_HINT)
        if model.id == TINY_RANDOM and state.is_main_process:
            print("Using a tiny model with RANDOM weights: the images are noise, not pictures.")
        pipe = load_pipeline(model, device, args.offload)
        result = generate_batch(
            pipe,
            jobs,
            args.out,
            model=model,
            batch_size=args.batch_size,
            skip_invalid=args.skip_invalid,
            force=args.force,
            expansion_kwargs=expansion,
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
    check_image_path(output)  # a folder that is missing or read-only, before the model is loaded
    device = resolve_device(args.device)
    threads = recipe["made_with"].get("cpu_threads")
    if device.type == "cpu" and threads is not None and threads != torch.get_num_threads():
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


class OneLineErrors(argparse.ArgumentParser):
    """argparse, with a mistake in the arguments reported like every other mistake: one `error:` line, exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def run_caption_expand(args) -> int:
    """`ideogram4 caption expand IDEA`: load only what decoding needs (text encoder, tokenizer, LM head)."""
    import torch

    from .prompt_expansion import Ideogram4PromptEnhancerHead

    # Everything that needs no model is checked before a (16 GB) text encoder is loaded.
    idea = read_text(STDIN).rstrip("\n") if args.idea == STDIN else args.idea
    expansion = {**idea_options(args, needed=True, unused=""), "max_new_tokens": args.max_new_tokens}
    check_idea(idea, args, expansion, "caption expand")
    head = head_argument(args)
    device = resolve_device(args.device)
    if args.output is not None:
        check_output_path(args.output, example=None)
    if args.model is not None:
        check_model_argument(args.model)
    if args.model == TINY_RANDOM:
        from .testing import tiny_pipeline

        pipe = tiny_pipeline(seed=args.seed, prompt_enhancer_head=True)  # built in float32
        if args.dtype is not None:
            pipe.to(dtype=getattr(torch, DTYPES[args.dtype]))
        print("Using a tiny model with RANDOM weights: the caption is valid but meaningless.", file=sys.stderr)
    else:
        from .pipeline_ideogram4 import Ideogram4Pipeline

        dtype = getattr(torch, DTYPES[args.dtype or DEFAULT_DTYPE])
        try:  # a repo that does not exist or is not cached offline, a folder without the files: one line
            pipe = Ideogram4Pipeline.from_pretrained(
                args.model or DEFAULT_MODEL,
                dtype=dtype,
                transformer=None,
                unconditional_transformer=None,
                vae=None,
                prompt_enhancer_head=Ideogram4PromptEnhancerHead.from_pretrained(head, dtype=dtype),
            )
        except OSError as error:
            reason = str(error).splitlines()[0]
            raise ValueError(f"cannot load --model {args.model or DEFAULT_MODEL} or --head {head}: {reason}") from None
    if args.offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    caption = expand_idea(pipe, idea, args.seed, args.height, args.width, expansion)
    if args.output is None:
        print(caption)
    else:
        write_atomically(args.output, (caption + "\n").encode("utf-8"))
        print(f"Wrote {args.output} (seed {args.seed}).", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="ideogram4", description="Ideogram 4 with diffusers.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_command(subparsers)
    add_edit_command(subparsers)
    add_batch_command(subparsers)
    add_reproduce_command(subparsers)
    add_caption_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code(lambda: args.func(args), errors=(ValueError,), code=2)  # bad input: one line, no traceback


if __name__ == "__main__":
    sys.exit(main())
