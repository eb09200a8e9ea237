"""Convert single-file Ideogram 4 transformers (GGUF, ComfyUI's fp8_scaled / nvfp4_mixed files, original-layout
safetensors) into the hub's diffusers layout, dequantized to bf16 or fp32.

    python conversion/convert_single_file_to_diffusers.py --transformer ideogram4-Q8_0.gguf \
        --unconditional-transformer ideogram4_uncond-Q8_0.gguf --base ideogram-ai/ideogram-4-nf4-diffusers \
        --output ideogram-4-bf16

The logic lives in `diffusers_ideogram4.single_file_conversion.convert_single_files_to_diffusers`; this file only
parses arguments.
"""

import argparse
import sys

from diffusers_ideogram4.commands import add_output_folder_options, run_converter
from diffusers_ideogram4.conversion import DEFAULT_MAX_SHARD_SIZE
from diffusers_ideogram4.single_file_conversion import DEQUANTIZED_DTYPES, convert_single_files_to_diffusers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transformer", default=None, help="single file (.safetensors or .gguf) or hub file URL")
    parser.add_argument("--unconditional-transformer", default=None, help="the unconditional branch's single file")
    parser.add_argument(
        "--base",
        default=None,
        help="hub-layout folder or repo id to copy the other components from (text encoder, "
        "VAE, tokenizer, scheduler); without it only the transformer folders are written",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="the architecture: a size name (ideogram4, tiny) or a folder / repo with the "
        "transformer's config.json (default: the released model)",
    )
    parser.add_argument("--dtype", choices=list(DEQUANTIZED_DTYPES), default="bf16", help="dequantize to this dtype")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="e.g. 5GB, 500MB (default 10GB)")
    parser.add_argument("--revision", default=None, help="revision of --base on the hub")
    add_output_folder_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_converter(convert_single_files_to_diffusers, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
