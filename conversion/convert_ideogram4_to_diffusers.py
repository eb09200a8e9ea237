"""Convert an Ideogram 4 repo in the original release layout (fused attention) into the hub's diffusers layout.

    python conversion/convert_ideogram4_to_diffusers.py --source ideogram-ai/ideogram-4-fp8 --output ideogram-4-bf16 \
        --dtype bf16 --model-card bf16 --push-to-hub your-name/ideogram-4-bf16-diffusers --private

The logic lives in `diffusers_ideogram4.conversion.convert_original_to_diffusers`; this file only parses arguments.
"""

import argparse
import sys
from pathlib import Path

from diffusers_ideogram4.commands import add_output_folder_options, run_converter
from diffusers_ideogram4.conversion import (
    DEFAULT_MAX_SHARD_SIZE,
    DTYPES,
    VAE_BN_CHOICES,
    convert_original_to_diffusers,
)


MODEL_CARDS = Path(__file__).resolve().parents[1] / "model_cards"


def model_card_path(value: str) -> Path:
    """A template path, or a short name from model_cards/: `bf16` -> model_cards/ideogram4-bf16.md."""
    named = MODEL_CARDS / f"ideogram4-{value}.md"
    if named.is_file():
        return named
    if Path(value).is_file():
        return Path(value)
    choices = sorted(p.stem.removeprefix("ideogram4-") for p in MODEL_CARDS.glob("ideogram4-*.md"))
    raise argparse.ArgumentTypeError(f"{value!r} is neither a file nor one of the model cards {choices}")


def card_variable(value: str) -> tuple[str, str]:
    name, sep, text = value.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=VALUE")
    return name, text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="local folder or hub repo id in the original layout")
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="keep",
        help="transformer weights: keep as stored (fp8 stays fp8), or cast / dequantize",
    )
    parser.add_argument("--components", default=None, help="comma-separated subset, e.g. transformer,vae")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="e.g. 5GB, 500MB (default 10GB)")
    parser.add_argument(
        "--vae-bn",
        choices=VAE_BN_CHOICES,
        default="keep",
        help="reference: write the reference release's latent normalisation into the VAE's bn (token order), so "
        "that pipelines decoding with bn decode like the reference (the VAE is then for Ideogram 4 only)",
    )
    parser.add_argument(
        "--model-card",
        type=model_card_path,
        default=None,
        help="template (bf16, fp8, nf4, lora or a path) rendered into README.md",
    )
    parser.add_argument(
        "--card-var",
        type=card_variable,
        action="append",
        dest="card_variables",
        default=[],
        metavar="NAME=VALUE",
        help="a model card value, e.g. peak_memory='31 GB'; repeatable",
    )
    parser.add_argument("--base-model", default=None, help="hub id for the card's base_model")
    parser.add_argument(
        "--push-to-hub", dest="push_to_hub_id", default=None, metavar="REPO_ID", help="upload the verified output"
    )
    parser.add_argument("--private", action="store_true", help="create the hub repo private")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--revision", default=None, help="source revision on the hub")
    add_output_folder_options(parser, verify_help="skip reloading the output (not with --push-to-hub)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.card_variables = dict(args.card_variables)  # NAME=VALUE pairs
    return run_converter(convert_original_to_diffusers, args)


if __name__ == "__main__":
    sys.exit(main())
