"""The fp8 release format (SPEC 2.2): float8_e4m3fn Linear weights with float32 per-row `weight_scale`.

Weight-only by default: each layer is dequantized in the compute dtype when it runs (scale cast to the compute dtype
first, as the reference does), which works on every device and halves the weight memory of bf16. On GPUs with
float8 matmuls, `set_fp8_matmul(model, True)` multiplies in fp8 with row-wise scales (`torch._scaled_mm`) instead.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


FP8_DTYPE = torch.float8_e4m3fn
# Both float8 formats checkpoints store weights in (ComfyUI's scaled fp8 files also use e5m2).
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_SUFFIX = ".weight_scale"
# Scales that keep their stored dtype in every quantized format: per row or per tensor (`weight_scale`), NVFP4's
# per-tensor second level (`weight_scale_2`), and static activation scales (`input_scale`).
STORED_SCALE_SUFFIXES = (SCALE_SUFFIX, ".weight_scale_2", ".input_scale")


def is_fp8_checkpoint(keys) -> bool:
    return any(key.endswith(SCALE_SUFFIX) for key in keys)


def keeps_stored_dtype(key: str, dtype: torch.dtype) -> bool:
    """Whether a checkpoint tensor keeps its stored dtype when a model is loaded in another one: float8 weights, their
    scales (`STORED_SCALE_SUFFIXES`), and anything that is not a float (packed NVFP4 weights); every other tensor is
    cast to the load dtype."""
    return not dtype.is_floating_point or dtype in FLOAT8_DTYPES or key.endswith(STORED_SCALE_SUFFIXES)


def quantize_fp8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> float8 weight and float32 (out,) scale = row amax / 448. All-zero rows get scale 1."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = (weight / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized, scale


def dequantize_fp8_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W = fp8 * scale[:, None], computed in `dtype` (the scale is cast to `dtype` first)."""
    return weight.to(dtype) * scale.to(dtype)[:, None]


def quantize_fp8_state_dict(state_dict: dict, linear_weight_keys) -> dict:
    """Quantize the named Linear weights, adding a `.weight_scale` beside each; other tensors are kept as they are."""
    quantized = dict(state_dict)
    for key in linear_weight_keys:
        quantized[key], quantized[key + "_scale"] = quantize_fp8_weight(state_dict[key])
    return quantized


def dequantize_fp8_state_dict(state_dict: dict, dtype: torch.dtype) -> dict:
    """Dequantize every weight that has a `.weight_scale`, dropping the scales; other floats are cast to `dtype`."""
    result = {}
    for key, tensor in state_dict.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        scale = state_dict.get(key + "_scale")
        if scale is not None:
            result[key] = dequantize_fp8_weight(tensor, scale, dtype)
        else:
            result[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return result


def linear_weight_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the weights of every nn.Linear of a model (the fp8 release quantizes all of them)."""
    return [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def stored_parameter(shape: tuple[int, ...], dtype: torch.dtype, device=None) -> nn.Parameter:
    """An empty frozen parameter of a quantized layer's stored format, filled by the loader."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class QuantizedLinear(nn.Linear):
    """Base of the weight-only quantized Linears: a stored weight format (`stored_format` names its parameters) that
    is dequantized in the compute dtype when the layer runs, on any device.

    It is an `nn.Linear` (PEFT wraps it with its LoRA Linear; the adapter then runs beside the dequantized weight), but
    its stored format never changes: `model.to(dtype)` moves those parameters without casting them. Parameters rather
    than buffers, so that sequential CPU offload streams them like any weight (accelerate keeps buffers resident on the
    accelerator there).
    """

    stored_format: tuple[str, ...] = ()
    # PEFT casts new adapters to a base layer's `compute_dtype` when it has one, else to its weight's dtype (float8
    # or uint8 here, which would ruin them). None: adapters keep the dtype they are created or loaded in.
    compute_dtype = None

    def _apply(self, fn, recurse=True):
        stored = {name: p.data for name in self.stored_format if (p := self._parameters.get(name)) is not None}
        super()._apply(fn, recurse)
        for name, original in stored.items():
            parameter = self._parameters[name]
            if parameter.dtype != original.dtype:  # a dtype cast: redo it as a move only
                parameter.data = original.to(parameter.device)
        return self

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The (out, in) weight in `dtype`."""
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight(hidden_states.dtype)
        bias = None if self.bias is None else self.bias.to(hidden_states.dtype)
        return F.linear(hidden_states, weight, bias)


class FP8Linear(QuantizedLinear):
    """A Linear holding a float8 weight and a float32 per-row scale (frozen parameters `weight`, `weight_scale`).

    Keeps the checkpoint's key names, so a model saved with these layers is again an fp8-release checkpoint.
    """

    stored_format = ("weight", "weight_scale")  # kept in the release's dtypes whatever the model's dtype

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: no float weight to allocate and initialise
        self.in_features = in_features
        self.out_features = out_features
        self.use_fp8_matmul = False
        self.weight = stored_parameter((out_features, in_features), FP8_DTYPE, device)
        self.weight_scale = stored_parameter((out_features,), torch.float32, device)
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8"

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8_weight(self.weight, self.weight_scale, dtype)

    def row_scales(self) -> torch.Tensor:
        """(out,) float32 weight scales, for the fp8 matmul."""
        return self.weight_scale.float()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.use_fp8_matmul:
            return self._fp8_matmul(hidden_states)
        return super().forward(hidden_states)

    def _fp8_matmul(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Quantize the activations (`_matmul_scales`) and multiply in fp8 with both sides' scales."""
        rows = hidden_states.reshape(-1, self.in_features)
        input_scale, weight_scale = self._matmul_scales(rows)
        bias = None if self.bias is None else self.bias.to(hidden_states.dtype)
        out = torch._scaled_mm(
            (rows.float() / input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE),
            self.weight.t(),
            scale_a=input_scale,
            scale_b=weight_scale,
            bias=bias,
            out_dtype=hidden_states.dtype,
        )
        return out.reshape(*hidden_states.shape[:-1], self.out_features)

    def _matmul_scales(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(activation scales (rows, 1), weight scales (1, out)) of the fp8 matmul: row-wise on both sides."""
        row_scale = (rows.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        return row_scale, self.row_scales()[None, :]


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model computes in: that of its first floating parameter that does not keep a stored quantized dtype
    (`keeps_stored_dtype`; diffusers' and transformers' `model.dtype` would report float8 for a model whose first
    parameter is an fp8 weight)."""
    return next(
        p.dtype
        for name, p in model.named_parameters()
        if p.is_floating_point() and not keeps_stored_dtype(name, p.dtype)
    )


class ComputeDtypeMixin:
    """`model.dtype` as the dtype the model computes in. diffusers' and transformers' `dtype` is the first floating
    parameter's (or the last dtype seen), which is float8 or uint8 for a model whose first Linear is quantized."""

    @property
    def dtype(self) -> torch.dtype:
        dtype = super().dtype
        return compute_dtype(self) if dtype in FLOAT8_DTYPES or not dtype.is_floating_point else dtype


def replace_linears_with_fp8(model: nn.Module, quantized_weight_keys) -> list[str]:
    """Swap every nn.Linear whose `<name>.weight` is in `quantized_weight_keys` for an FP8Linear (same device)."""
    wanted = {key[: -len(".weight")] for key in quantized_weight_keys}
    replaced = []
    for name, module in list(model.named_modules()):
        if name in wanted and isinstance(module, nn.Linear) and not isinstance(module, FP8Linear):
            parent, _, child = name.rpartition(".")  # not `set_submodule`: torch 2.4 has none
            fp8 = FP8Linear(module.in_features, module.out_features, module.bias is not None, module.weight.device)
            setattr(model.get_submodule(parent), child, fp8)
            replaced.append(name)
    return replaced


def set_fp8_matmul(model: nn.Module, enabled: bool = True) -> int:
    """Opt in to fp8 matmuls (`torch._scaled_mm`) in every FP8Linear; returns how many layers were switched.

    Needs float8 matmul support: CUDA compute capability >= 8.9 (Ada, Hopper and newer), or the CPU.
    """
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    if enabled and torch.cuda.is_available():
        for device in {layer.weight.device for layer in layers}:
            if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
                raise ValueError(
                    f"`set_fp8_matmul(True)` needs a GPU with compute capability >= 8.9; {device} has "
                    f"{torch.cuda.get_device_capability(device)}. Keep the weight-only fp8 path (the default)."
                )
    if enabled and not layers:
        raise ValueError("`set_fp8_matmul(True)`: this model has no fp8 layers; load an fp8-release checkpoint.")
    for layer in layers:
        layer.use_fp8_matmul = enabled
    return len(layers)


# nf4 as released (SPEC 2.2): bitsandbytes blocks of 64 weights, one float32 absmax each (compress_statistics=False).
NF4_BLOCK = 64


def weight_bytes(model: nn.Module, weights: str) -> int:
    """Bytes of `model`'s weights stored as `weights` ("bf16", "fp8", "nf4"), from parameter shapes alone (a model on
    the meta device will do). fp8: one byte per Linear weight plus a float32 scale per row; nf4: half a byte plus a
    float32 absmax per block; everything else bf16."""
    quantized = set(linear_weight_keys(model))
    return sum(stored_bytes(p, weights, name in quantized) for name, p in model.named_parameters())


def stored_bytes(parameter: torch.Tensor, weights: str, quantized: bool) -> int:
    """Bytes of one parameter stored as `weights` (`weight_bytes`' rule); `quantized`: it is a Linear weight, which
    fp8 and nf4 quantize (everything else is bf16)."""
    if weights not in ("bf16", "fp8", "nf4"):
        raise ValueError(f"`weights` must be 'bf16', 'fp8' or 'nf4', got {weights!r}.")
    count = parameter.numel()
    if weights == "bf16" or not quantized:
        return 2 * count
    if weights == "fp8":
        return count + 4 * parameter.shape[0]
    return count // 2 + 4 * math.ceil(count / NF4_BLOCK)
