"""GPU check (not run in the test suite; no GPU was available when it was written): every attention backend of
diffusers' dispatcher on the Ideogram 4 transformer, against the native (SDPA) output, with and without the segment
mask of a padded batch.

Run on one GPU: `python benchmarks/check_attention_backends_gpu.py` (prints a Markdown table). Expected: the SDPA
family and flex match with both batches; flash / sage / xformers / varlen kernels match the unpadded batch where their
package is installed, and are refused by name for the padded one; a backend whose package is missing says so.
"""

import argparse

import torch


BACKENDS = [
    "_native_cudnn",
    "_native_efficient",
    "_native_flash",
    "_native_math",
    "flex",
    "flash",
    "flash_varlen",
    "_flash_3",
    "_flash_varlen_3",
    "sage",
    "sage_varlen",
    "xformers",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--model", default="ideogram4", help="a size name: ideogram4 (full-width blocks) or tiny")
    parser.add_argument("--device", default="cuda", help="cpu only to try the script itself (float32)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    from diffusers_ideogram4 import Ideogram4Transformer2DModel
    from diffusers_ideogram4.constants import TRANSFORMER_SIZES
    from diffusers_ideogram4.testing import random_transformer_inputs

    config = dict(TRANSFORMER_SIZES[args.model], num_layers=args.layers)
    torch.manual_seed(0)
    model = Ideogram4Transformer2DModel(**config).to(device, dtype).eval()
    grid = (args.size // 16, args.size // 16)
    batches = {
        name: random_transformer_inputs(lengths, grid, config, device=device, dtype=dtype)
        for name, lengths in (("padded (mask)", (200, 120)), ("unpadded", (200,)))
    }
    rows = []
    with torch.no_grad():
        expected = {name: model(**inputs)[0] for name, inputs in batches.items()}
        for backend in BACKENDS:
            try:
                model.set_attention_backend(backend)
            except Exception as error:  # noqa: BLE001 - reported in the table
                rows.append(f"| {backend} | {type(error).__name__}: {str(error)[:120]} | |")
                continue
            results = []
            for name, inputs in batches.items():
                image = inputs["indicator"] == 2
                try:
                    got = model(**inputs)[0]
                    results.append(f"max abs diff {(got[image] - expected[name][image]).abs().max().item():.3g}")
                except Exception as error:  # noqa: BLE001 - reported in the table
                    results.append(f"{type(error).__name__}: {str(error)[:120]}")
            rows.append(f"| {backend} | " + " | ".join(results) + " |")
            model.reset_attention_backend()
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{where}, torch {torch.__version__}, {args.layers} blocks of the {args.model} size, {dtype}.\n")
    print("| backend | padded batch (mask) | unpadded batch |\n|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
