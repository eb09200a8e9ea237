"""Writers for the single-file formats people hold, used by the tests: ComfyUI's scaled fp8 (current per-layer configs
and the legacy marker), ComfyUI's NVFP4, and GGUF (through the `gguf` package's own writer and quantizers).

Each writer also returns the weights a reader must find, computed without the loader's code: the NVFP4 reference
uses the plain block scales and codes from before packing and tiling, and the tiling is written from cuBLAS'
index formula, not as the inverse of the loader's reshapes.
"""

import json
import math

import numpy as np
import torch
from safetensors.torch import save_file

from diffusers_ideogram4.constants import TRANSFORMER_SIZES
from diffusers_ideogram4.fp8 import linear_weight_keys
from diffusers_ideogram4.loading import diffusers_to_original
from diffusers_ideogram4.testing import tiny_transformer


CONFIG = TRANSFORMER_SIZES["tiny"]
E2M1_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def round_up(value, multiple):
    return math.ceil(value / multiple) * multiple


def original_state(seed=0, dtype=torch.bfloat16):
    """A tiny transformer's weights in the original (fused) layout, and the model itself."""
    model = tiny_transformer(seed=seed)
    return {k: v.to(dtype) for k, v in diffusers_to_original(model.state_dict()).items()}, model


def original_linear_keys(model):
    """The tiny model's Linear weights, named in the original layout (qkv and o fused)."""
    return sorted(set(diffusers_to_original(dict.fromkeys(linear_weight_keys(model), torch.zeros(3, 1)))))


def write_safetensors(path, state, metadata=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt", **(metadata or {})})
    return path


# --------------------------------------------------------------------------------------------------------------------
# ComfyUI scaled fp8


def quantize_per_tensor(weight, dtype=torch.float8_e4m3fn):
    """(float8 weight, float32 0-d scale = amax / the format's max)."""
    scale = weight.float().abs().max() / torch.finfo(dtype).max
    return (weight.float() / scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype), scale


def comfy_marker(config):
    return torch.tensor(list(json.dumps(config).encode("utf-8")), dtype=torch.uint8)


# --------------------------------------------------------------------------------------------------------------------
# ComfyUI NVFP4


def tile_index(row, column, column_tiles):
    """Where block scale (row, column) sits in cuBLAS' tiled block-scale layout (128 x 4 tiles of 512 entries,
    row tiles outermost; inside a tile, 32 lines of 16: row % 32 picks the line, (row % 128) // 32 the group of 4)."""
    tile = (row // 128) * column_tiles + column // 4
    return tile * 512 + (row % 32) * 16 + ((row % 128) // 32) * 4 + column % 4


def tile_block_scales(plain):
    rows, columns = round_up(plain.shape[0], 128), round_up(plain.shape[1], 4)
    padded = torch.zeros(rows, columns, dtype=plain.dtype)
    padded[: plain.shape[0], : plain.shape[1]] = plain
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij")
    flat = torch.zeros(rows * columns, dtype=plain.dtype)
    flat[tile_index(r, c, columns // 4).reshape(-1)] = padded.reshape(-1)
    return flat.reshape(rows, columns)


def quantize_nvfp4(weight):
    """(out, in) float weight -> (stored tensors, (codes, plain block scales, scale_2) for the reference)."""
    out, inp = weight.shape
    rows, columns = round_up(out, 16), round_up(inp, 16)
    padded = torch.zeros(rows, columns)
    padded[:out, :inp] = weight.float()
    scale_2 = padded.abs().max() / (448 * 6)
    blocks = padded.reshape(rows, columns // 16, 16)
    block_scales = (blocks.abs().amax(-1) / 6 / scale_2).to(torch.float8_e4m3fn)  # (rows, in / 16)
    step = block_scales.float() * scale_2
    scaled = blocks / torch.where(step > 0, step, torch.ones_like(step))[..., None]
    magnitude = (scaled.abs()[..., None] - E2M1_MAGNITUDES).abs().argmin(-1)
    codes = (magnitude + 8 * (scaled < 0)).reshape(rows, columns).to(torch.uint8)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
    stored = {"weight": packed, "weight_scale": tile_block_scales(block_scales), "weight_scale_2": scale_2}
    return stored, (codes, block_scales, scale_2)


def dequantize_nvfp4_reference(codes, block_scales, scale_2, shape, dtype):
    """From unpacked codes and plain block scales, in ComfyUI's order: (scale_2 * block) * value, in `dtype`."""
    values = torch.cat([E2M1_MAGNITUDES, -E2M1_MAGNITUDES])[codes.long()].to(dtype)
    scales = (scale_2.to(dtype) * block_scales.to(dtype)).repeat_interleave(16, dim=1)
    return (values * scales)[: shape[0], : shape[1]]


def comfy_file(path, seed=0, formats=None, prefix="", how="tensors", dtype=torch.bfloat16, legacy=False):
    """A tiny transformer as a ComfyUI quantized single file, original layout.

    formats: original-layout Linear name -> "float8_e4m3fn" | "float8_e5m2" | "nvfp4" (others stay `dtype`);
    how: "tensors" (`comfy_quant` tensors) or "metadata" (`_quantization_metadata`); legacy: the older `scaled_fp8`
    marker with `scale_weight` (float8 formats only). Returns (path, the dequantized weights in the diffusers
    layout, in `dtype`, computed as ComfyUI does; the unquantized model).
    """
    state, model = original_state(seed, dtype)
    dequantized, stored, layers = dict(state), {}, {}
    for key, tensor in state.items():
        layer = key.removesuffix(".weight")
        fmt = (formats or {}).get(layer) if key.endswith(".weight") else None
        if fmt is None:
            stored[key] = tensor
        elif fmt == "nvfp4":
            tensors, (codes, block_scales, scale_2) = quantize_nvfp4(tensor)
            stored.update({f"{layer}.{name}": value for name, value in tensors.items()})
            dequantized[key] = dequantize_nvfp4_reference(codes, block_scales, scale_2, tensor.shape, dtype)
        else:
            weight, scale = quantize_per_tensor(tensor, getattr(torch, fmt))
            stored[key] = weight
            stored[f"{layer}.scale_weight" if legacy else f"{layer}.weight_scale"] = scale
            dequantized[key] = weight.to(dtype) * scale.to(dtype)
        if fmt is not None:
            layers[layer] = {"format": fmt}
    metadata = None
    if legacy:
        stored["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    elif how == "tensors":
        stored.update({f"{layer}.comfy_quant": comfy_marker(config) for layer, config in layers.items()})
    else:
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    stored = {prefix + key: value for key, value in stored.items()}
    from diffusers_ideogram4.loading import original_to_diffusers

    return write_safetensors(path, stored, metadata), original_to_diffusers(dequantized), model


# --------------------------------------------------------------------------------------------------------------------
# GGUF


def gguf_blocks(shape, quant_type, seed=0):
    """Random but valid bytes of a GGUF block type (for types gguf-py cannot quantize: the K-quants, IQ4_NL, IQ4_XS):
    random codes, the float16 (super-)block scales set to small finite values."""
    import gguf

    rng = np.random.default_rng(seed)
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, quant_type)
    data = rng.integers(0, 256, size=byte_shape, dtype=np.uint8)
    block_size, type_size = gguf.GGML_QUANT_SIZES[quant_type]
    blocks = data.reshape(-1, type_size)
    # Byte offsets of each K-quant's float16 scales (d, dmin), from ggml's block structs.
    scale_fields = {
        **{"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)},
        **{"IQ4_NL": (0,), "IQ4_XS": (0,)},
    }
    for offset in scale_fields[quant_type.name]:
        scales = rng.uniform(1e-4, 4e-4, size=len(blocks)).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(byte_shape)


def write_gguf(path, tensors):
    """tensors: name -> (float32 numpy array or raw block bytes, GGMLQuantizationType) -> the file path."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch="ideogram4")
    for name, (array, quant_type) in tensors.items():
        if quant_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, array.astype(np.float32))
        elif quant_type == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, array.astype(np.float16))
        elif array.dtype == np.uint8:
            writer.add_tensor(name, array, raw_dtype=quant_type)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, quant_type), raw_dtype=quant_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_file(path, linear_type, seed=0, prefix="", k_quant_keys=()):
    """A tiny transformer (original layout) as GGUF: Linear weights in `linear_type` where their input width fits its
    blocks, the rest F32 / BF16 as the converters keep them; `k_quant_keys` get random K-quant blocks of
    `linear_type`. Returns (path, the dequantized weights in the diffusers layout as gguf-py computes them, model)."""
    import gguf

    types = gguf.GGMLQuantizationType
    state, model = original_state(seed, torch.float32)
    linears = set(original_linear_keys(model))
    block_size = gguf.GGML_QUANT_SIZES[linear_type][0]
    tensors, dequantized = {}, {}
    for index, (key, tensor) in enumerate(sorted(state.items())):
        array = tensor.numpy()
        if key in k_quant_keys:
            array, quant_type = gguf_blocks(array.shape, linear_type, seed=index), linear_type
        elif key in linears and not k_quant_keys and array.shape[-1] % block_size == 0:
            quant_type = linear_type
        elif key.endswith("norm1.weight") or key.endswith("indicator.weight"):
            quant_type = types.BF16  # sd.cpp keeps unmatched tensors in their source type
        else:
            quant_type = types.F32
        tensors[prefix + key] = (array, quant_type)
        stored = array if array.dtype == np.uint8 else gguf.quants.quantize(array, quant_type)
        dequantized[key] = torch.from_numpy(gguf.quants.dequantize(stored, quant_type).copy()).reshape(tensor.shape)
    from diffusers_ideogram4.loading import original_to_diffusers

    return write_gguf(path, tensors), original_to_diffusers(dequantized), model
