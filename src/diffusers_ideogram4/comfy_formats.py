"""ComfyUI's quantized single-file formats, as ComfyUI writes and reads them (`comfy/quant_ops.py`, `comfy/ops.py`,
`comfy/utils.py::convert_old_quants`; the tensor layouts are comfy-kitchen's), loaded weight-only.

A layer's format is named per layer, by a `<layer>.comfy_quant` uint8 tensor holding UTF-8 JSON (`{"format":
"nvfp4"}`) or by the `layers` of the header metadata `_quantization_metadata` (JSON). Formats read here:

- `float8_e4m3fn`, `float8_e5m2`: `weight` float8 (out, in) and `weight_scale`, one float32 scale for the whole tensor
  (0-d): W = weight * scale, both cast to the compute dtype first (as ComfyUI dequantizes). An optional float32
  `input_scale` (0-d) is the static activation scale of fp8 matmuls (`set_fp8_matmul`).
- `nvfp4`: `weight` uint8 (R, C / 2), R and C the out and in features rounded up to 16, two E2M1 codes per byte with
  the even column in the high nibble; `weight_scale` float8_e4m3fn block scales, one per 16 inputs, in cuBLAS' 128 x 4
  tiled layout (R rounded up to 128, C / 16 rounded up to 4); `weight_scale_2` float32 (0-d):
  W = E2M1[code] * (weight_scale_2 * block scale) in the compute dtype, padding sliced off.

Older "scaled fp8" files have a `scaled_fp8` marker tensor instead, and `scale_weight` / `scale_input` per layer; they
load as the float8 formats, each layer in its stored float8 dtype (ComfyUI reads every such layer as e4m3fn).
"""

import math

import torch
import torch.nn as nn

from .fp8 import FLOAT8_DTYPES, FP8_DTYPE, FP8Linear, QuantizedLinear, stored_parameter


COMFY_QUANT_SUFFIX = ".comfy_quant"
QUANTIZATION_METADATA_KEY = "_quantization_metadata"
LEGACY_MARKER = "scaled_fp8"
# Legacy per-layer names and the current ones they stand for.
LEGACY_RENAMES = {".scale_weight": ".weight_scale", ".scale_input": ".input_scale"}

FLOAT8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
NVFP4_FORMAT = "nvfp4"
SUPPORTED_FORMATS = (*FLOAT8_FORMATS, NVFP4_FORMAT)
# ComfyUI formats this package does not dequantize (each has its own rotation, codebook or zero points).
UNSUPPORTED_FORMATS = ("int8_tensorwise", "mxfp8", "convrot_w4a4", "asym_w4a8_int8", "awq_w4a16")
# Layer config keys understood here: `full_precision_matrix_mult` asks for dequantized matmuls, which is all this
# package does; `group_size` must be NVFP4's 16.
LAYER_CONFIG_KEYS = ("format", "full_precision_matrix_mult", "group_size")

NVFP4_GROUP = 16  # inputs per block scale
NVFP4_ROW_TILE, NVFP4_COLUMN_TILE = 128, 4  # cuBLAS' tiled layout of the block scales
# E2M1 code -> value; codes 8..15 are the negatives of 0..7.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


# --------------------------------------------------------------------------------------------------------------------
# NVFP4 tensors


def unswizzle_block_scales(tiled: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """Block scales in cuBLAS' tiled layout -> plain (rows, columns). The tiled tensor is a sequence of 128 x 4 tiles,
    row tiles outermost; inside a tile, row r sits at (r % 32, r // 32) and column c at c % 4 (16 bytes per line)."""
    row_tiles, column_tiles = math.ceil(rows / NVFP4_ROW_TILE), math.ceil(columns / NVFP4_COLUMN_TILE)
    tiles = tiled.reshape(row_tiles, column_tiles, 32, NVFP4_ROW_TILE // 32, NVFP4_COLUMN_TILE)
    plain = tiles.permute(0, 3, 2, 1, 4).reshape(row_tiles * NVFP4_ROW_TILE, column_tiles * NVFP4_COLUMN_TILE)
    return plain[:rows, :columns]


def dequantize_nvfp4(
    packed: torch.Tensor, block_scales: torch.Tensor, scale_2: torch.Tensor, shape: tuple[int, int], dtype
) -> torch.Tensor:
    """NVFP4 weight -> (out, in) in `dtype`, computed in `dtype` in ComfyUI's order: (scale_2 * block) * E2M1 value."""
    rows, half = packed.shape
    codes = torch.stack((packed >> 4, packed & 0x0F), dim=-1).reshape(rows, 2 * half)  # even column: high nibble
    values = torch.tensor(E2M1_VALUES, dtype=dtype, device=packed.device)[codes.long()]
    blocks = unswizzle_block_scales(block_scales, rows, 2 * half // NVFP4_GROUP).to(dtype)
    scales = scale_2.to(dtype) * blocks  # (rows, in / 16)
    weight = (values.unflatten(1, (-1, NVFP4_GROUP)) * scales[..., None]).flatten(1)
    return weight[: shape[0], : shape[1]]


# --------------------------------------------------------------------------------------------------------------------
# Layers


class ScaledFP8Linear(FP8Linear):
    """A float8 weight (e4m3fn or e5m2) with one float32 scale for the whole tensor (ComfyUI's scaled fp8), and an
    optional static activation scale `input_scale` used by the fp8 matmul (`set_fp8_matmul`)."""

    stored_format = ("weight", "weight_scale", "input_scale")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        weight_dtype: torch.dtype = FP8_DTYPE,
        input_scale: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias, device)
        if weight_dtype not in FLOAT8_DTYPES:
            raise ValueError(f"`weight_dtype={weight_dtype}` is not a float8 dtype; use one of {FLOAT8_DTYPES}.")
        self.weight = stored_parameter((out_features, in_features), weight_dtype, device)
        self.weight_scale = stored_parameter((), torch.float32, device)
        self.input_scale = stored_parameter((), torch.float32, device) if input_scale else None

    def extra_repr(self) -> str:
        return super().extra_repr() + f" ({str(self.weight.dtype).removeprefix('torch.')}, per-tensor scale)"

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.weight_scale.to(dtype)

    def row_scales(self) -> torch.Tensor:
        return self.weight_scale.float().expand(self.out_features).contiguous()

    def _matmul_scales(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """With an `input_scale`, the activations are quantized with it and the weight with its one scale (as
        ComfyUI's fp8 matmul does); without one, per row (`FP8Linear`)."""
        if self.input_scale is None:
            return super()._matmul_scales(rows)
        return self.input_scale.float(), self.weight_scale.float()


class NVFP4Linear(QuantizedLinear):
    """A Linear stored in ComfyUI's NVFP4 layout (module docstring), dequantized in the compute dtype when it runs.

    NVFP4 matmuls need Blackwell GPUs (compute capability >= 10.0); this package has none, so `input_scale` (their
    activation scale), when the file has one, is kept with the weights but not used.
    """

    stored_format = ("weight", "weight_scale", "weight_scale_2", "input_scale")

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device=None, input_scale: bool = False
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: no float weight to allocate and initialise
        self.in_features = in_features
        self.out_features = out_features
        rows, columns = round_up(out_features, NVFP4_GROUP), round_up(in_features, NVFP4_GROUP)
        block_scales = (round_up(rows, NVFP4_ROW_TILE), round_up(columns // NVFP4_GROUP, NVFP4_COLUMN_TILE))
        self.weight = stored_parameter((rows, columns // 2), torch.uint8, device)
        self.weight_scale = stored_parameter(block_scales, FP8_DTYPE, device)
        self.weight_scale_2 = stored_parameter((), torch.float32, device)
        self.input_scale = stored_parameter((), torch.float32, device) if input_scale else None
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, nvfp4"

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        return dequantize_nvfp4(self.weight, self.weight_scale, self.weight_scale_2, shape, dtype)


# --------------------------------------------------------------------------------------------------------------------
# Layer configs


def layer_config_problem(config) -> str | None:
    """Why a layer config cannot be loaded here (None when it can)."""
    if not isinstance(config, dict) or not isinstance(config.get("format"), str):
        return f"{config!r} is not a layer config with a `format`"
    fmt = config["format"]
    if fmt in UNSUPPORTED_FORMATS:
        return f"ComfyUI's `{fmt}` format is not supported (this package reads {list(SUPPORTED_FORMATS)})"
    if fmt not in SUPPORTED_FORMATS:
        return f"unknown format `{fmt}` (this package reads {list(SUPPORTED_FORMATS)})"
    unknown = sorted(set(config) - set(LAYER_CONFIG_KEYS))
    if unknown:
        return f"config keys {unknown} are not understood here (known: {list(LAYER_CONFIG_KEYS)})"
    if "group_size" in config and (fmt != NVFP4_FORMAT or config["group_size"] != NVFP4_GROUP):
        return f"`group_size={config['group_size']}` with `{fmt}` (only nvfp4 has one, 16)"
    return None


def quantized_layer(fmt: str, linear: nn.Linear, has_input_scale: bool) -> QuantizedLinear:
    """The layer holding format `fmt` in place of `linear` (same features, bias and device)."""
    arguments = (linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device)
    if fmt == NVFP4_FORMAT:
        return NVFP4Linear(*arguments, input_scale=has_input_scale)
    return ScaledFP8Linear(*arguments, weight_dtype=FLOAT8_FORMATS[fmt], input_scale=has_input_scale)
