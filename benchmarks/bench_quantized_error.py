"""Velocity error of each quantized format the package loads, on the tiny random transformer: relative L2 of the
image-token velocity against the unquantized model (bf16 for the ComfyUI and SDNQ files, which compute in bf16;
float32 for GGUF). The files are written with the tests' own writers (tests/single_file_formats.py, tests/test_sdnq.py:
ComfyUI's and diffusers' quantizers as those formats define them), so this runs offline. Prints a Markdown table.

    python benchmarks/bench_quantized_error.py
"""

import sys
import tempfile
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from diffusers_ideogram4 import Ideogram4Transformer2DModel  # noqa: E402
from single_file_formats import comfy_file, gguf_file  # noqa: E402
from test_gguf import TYPES  # noqa: E402
from test_single_file import all_float8_linears, bf16, original_state, relative  # noqa: E402
from test_transformer import image_velocity, packed_inputs  # noqa: E402


def comfy_error(folder: Path, kind: str) -> float:
    _, model = original_state(seed=0)
    formats = dict.fromkeys(all_float8_linears(model), "nvfp4" if kind == "nvfp4" else "float8_e4m3fn")
    if kind == "fp8":
        formats["layers.1.feed_forward.w2"] = "float8_e5m2"  # as the tests: one layer in the other float8 dtype
    path, _, original = comfy_file(folder / f"{kind}.safetensors", formats=formats)
    loaded = Ideogram4Transformer2DModel.from_single_file(path, config="tiny", dtype=torch.bfloat16)
    inputs = bf16(packed_inputs())
    return relative(image_velocity(loaded, inputs), image_velocity(original.to(torch.bfloat16), inputs))


def gguf_error(folder: Path, type_name: str) -> float:
    path, _, original = gguf_file(folder / f"ideogram4-{type_name}.gguf", TYPES[type_name])
    loaded = Ideogram4Transformer2DModel.from_single_file(path, config="tiny")
    return relative(image_velocity(loaded, packed_inputs()), image_velocity(original, packed_inputs()))


def sdnq_error(folder: Path, weights_dtype: str) -> float:
    from test_sdnq import sdnq_folder

    path, original = sdnq_folder(folder, weights_dtype)
    loaded = Ideogram4Transformer2DModel.from_pretrained(path, dtype=torch.bfloat16)
    inputs = bf16(packed_inputs())
    return relative(image_velocity(loaded, inputs), image_velocity(original, inputs))


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, measure, argument) in enumerate(
            [
                ("ComfyUI fp8", comfy_error, "fp8"),
                ("ComfyUI nvfp4 (every Linear)", comfy_error, "nvfp4"),
                *[(f"GGUF {t}", gguf_error, t) for t in ("F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")],
                ("SDNQ fp8", sdnq_error, "float8_e4m3fn"),
                ("SDNQ int8", sdnq_error, "int8"),
                ("SDNQ uint4 (packed)", sdnq_error, "uint4"),
            ]
        ):
            folder = Path(scratch) / str(index)
            folder.mkdir()
            rows.append((name, measure(folder, argument)))
    print("| format | " + " | ".join(name for name, _ in rows) + " |")
    print("|---|" + "---|" * len(rows))
    print("| error | " + " | ".join(f"{error:.3g}" for _, error in rows) + " |")


if __name__ == "__main__":
    main()
