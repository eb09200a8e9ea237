"""Make the unconditional LoRA of an Ideogram 4 repo: truncated SVD of (unconditional - conditional) per Linear.

    python conversion/extract_unconditional_lora.py --source ideogram-ai/ideogram-4-fp8 --rank 64 --output uncond.safetensors
    python conversion/extract_unconditional_lora.py --source ./ideogram-4-bf16 --max-rel-error 0.05 --rank 256 \\
        --output uncond.safetensors --device cuda

The two transformers are read one layer at a time (either layout, bf16 / fp32 or the fp8 release). The output is in
ai-toolkit's format (`diffusion_model.` keys, fused attention, lora_down / lora_up / alpha), with norm, embedding and
bias differences as float32 `.diff` / `.diff_b` tensors, and loads with `pipe.load_unconditional_lora(output)`. Each
layer's rank and relative Frobenius error, and the total, are printed and stored in the file's metadata
(`diffusers_ideogram4.lora_extraction`).
"""

import argparse
import sys

from diffusers_ideogram4.commands import add_progress_option, run_converter
from diffusers_ideogram4.lora_extraction import DTYPES, NON_LINEAR_CHOICES, extract_unconditional_lora


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="folder or hub repo id with both transformers")
    parser.add_argument("--output", required=True, help="the .safetensors file to write")
    parser.add_argument("--rank", type=int, default=None, help="rank of every layer (with --max-rel-error: the cap)")
    parser.add_argument(
        "--max-rel-error",
        type=float,
        default=None,
        help="per layer, the smallest rank whose error is at most this fraction of ||unconditional - conditional||",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="dtype of the LoRA factors")
    parser.add_argument(
        "--non-linear",
        choices=NON_LINEAR_CHOICES,
        default="store",
        help="norm / embedding / bias tensors that differ: store them as float32 differences, or refuse",
    )
    parser.add_argument("--device", default="cpu", help="where the SVDs run (cuda is much faster at full size)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--revision", default=None, help="hub revision of --source")
    add_progress_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_converter(extract_unconditional_lora, build_parser().parse_args(argv))  # nothing written on an error


if __name__ == "__main__":
    sys.exit(main())
