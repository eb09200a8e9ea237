"""Convert an Ideogram 4 repo in the diffusers layout back to the original fused-attention layout.

    python conversion/convert_diffusers_to_original.py --source ideogram-4-bf16 --output ideogram-4-bf16-original

One safetensors file per transformer (`attention.qkv` = rows [q; k; v], `attention.o`), every tensor bit for bit; the
other components are copied. The logic is `diffusers_ideogram4.conversion.convert_diffusers_to_original`.
"""

import argparse
import sys

from diffusers_ideogram4.commands import add_output_folder_options, run_converter
from diffusers_ideogram4.conversion import ORIGINAL_WEIGHTS_NAME, convert_diffusers_to_original


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="local folder or hub repo id in the diffusers layout")
    parser.add_argument("--components", default=None, help="comma-separated subset, e.g. transformer")
    parser.add_argument(
        "--weights-name",
        default=ORIGINAL_WEIGHTS_NAME,
        help=f"file name of each transformer's weights (default {ORIGINAL_WEIGHTS_NAME})",
    )
    parser.add_argument("--revision", default=None, help="source revision on the hub")
    add_output_folder_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_converter(convert_diffusers_to_original, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
