"""Convert an Ideogram 4 LoRA between the diffusers format and the original (ai-toolkit / kohya-style) format.

    python conversion/convert_lora.py --input lora.safetensors --output lora_diffusers.safetensors --to diffusers
    python conversion/convert_lora.py --input lora_diffusers.safetensors --output lora_kohya.safetensors --to original

The input may be in any supported format (`diffusers_ideogram4.lora_formats`); the delta of every weight is kept. "diffusers":
`transformer.` / `unconditional_transformer.` prefixes, lora_A / lora_B on the split attention, alpha / rank folded into
lora_B, diffusers' LoRA metadata in the header. "original": `diffusion_model.` prefix (`unconditional_transformer.` for
the unconditional branch), lora_down / lora_up / alpha on the fused `attention.qkv` / `attention.o`.
"""

import argparse
import sys

from diffusers_ideogram4.commands import exit_code
from diffusers_ideogram4.lora_formats import COMPONENTS, LORA_FORMATS, convert_lora_file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="LoRA .safetensors file, any supported format")
    parser.add_argument("--output", required=True, help="where to write the converted .safetensors file")
    parser.add_argument("--to", required=True, choices=LORA_FORMATS, help="output format")
    parser.add_argument(
        "--target",
        choices=COMPONENTS,
        default=None,
        help="transformer that keys without a branch prefix belong to (default: the conditional transformer)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def convert() -> int:
        converted = convert_lora_file(args.input, args.output, to=args.to, target=args.target)
        print(f"Wrote {len(converted)} tensors in the {args.to} format to {args.output}")
        return 0

    return exit_code(convert)  # a LoRA this converter refuses: one message, no traceback


if __name__ == "__main__":
    sys.exit(main())
