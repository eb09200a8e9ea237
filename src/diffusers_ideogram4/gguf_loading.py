"""GGUF transformers (stable-diffusion.cpp's and ComfyUI-GGUF's files), loaded through diffusers' own GGUF support.

1. A header pass with the `gguf` package's reader (names, quantization types and shapes; no tensor data): a type
   diffusers cannot dequantize is refused naming its tensors, and the header is checked against the model on the meta
   device with the one rename table (`loading.check_header`), before the file is read.
2. diffusers' `load_gguf_checkpoint` reads the tensors. A fused `attention.qkv` is split into to_q/to_k/to_v on the
   quantized bytes: GGUF blocks run along the input dimension, so row slices of a `GGUFParameter` stay valid blocks.
3. Tensors that do not belong to a Linear weight (norms, the image-indicator embedding, biases) are dequantized to the
   compute dtype up front (diffusers would put them in as raw bytes).
4. diffusers' `GGUFQuantizer` swaps every Linear whose weight is quantized for its `GGUFLinear` (dequantized to the
   compute dtype when it runs, on any device; diffusers' optional CUDA kernels when enabled), and
   `load_model_dict_into_meta` fills the model, exactly as diffusers' `from_single_file` does for its own classes.
"""

from pathlib import Path

import torch

from .fp8 import linear_weight_keys
from .loading import CheckpointMismatchError, check_header, list_keys, original_key_plan
from .single_file import SINGLE_FILE_HINT, common_prefix


# GGUF types stored as plain torch tensors; every other supported type becomes a quantized GGUFParameter.
PLAIN_TYPES = ("F32", "F16")


def read_gguf_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (GGUF type name, torch shape), without reading tensor data (GGUF stores shapes reversed)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ImportError(
            f"{path} is a GGUF file; reading it needs the `gguf` package: pip install 'diffusers-ideogram4[gguf]'."
        ) from None
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as error:
        raise CheckpointMismatchError(f"{path} is not a readable GGUF file ({error}); nothing was loaded.") from None
    return {
        tensor.name: (tensor.tensor_type.name, tuple(int(n) for n in reversed(tensor.shape.tolist())))
        for tensor in reader.tensors
    }


def check_gguf_types(header: dict, source) -> None:
    """Every tensor in a type diffusers can load: F32, F16 and those it has a torch dequantizer for (BF16, Q4_0, Q4_1,
    Q5_0, Q5_1, Q8_0, Q2_K .. Q6_K, IQ4_NL, IQ4_XS with diffusers 0.42)."""
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    supported = (*PLAIN_TYPES, *(quant_type.name for quant_type in SUPPORTED_GGUF_QUANT_TYPES))
    unsupported = {}
    for key, (type_name, _) in header.items():
        if type_name not in supported:
            unsupported.setdefault(type_name, []).append(key)
    if unsupported:
        found = "; ".join(f"{name}: {list_keys(keys)}" for name, keys in sorted(unsupported.items()))
        raise CheckpointMismatchError(
            f"{source} has tensors in GGUF types diffusers cannot dequantize ({found}); nothing was loaded. Supported "
            f"types: {', '.join(supported)}. Requantize the file to one of them (e.g. Q8_0 or Q4_K)."
        )


def gguf_quantization_config(dtype, quantization_config):
    """The GGUFQuantizationConfig to load with; its compute dtype is the model's dtype (default float32)."""
    from diffusers import GGUFQuantizationConfig

    if quantization_config is None:
        return GGUFQuantizationConfig(compute_dtype=dtype or torch.float32)
    if not isinstance(quantization_config, GGUFQuantizationConfig):
        raise ValueError(
            f"A GGUF file loads with a `GGUFQuantizationConfig` (or none); got {type(quantization_config).__name__}."
        )
    if dtype is not None and dtype != quantization_config.compute_dtype:
        raise ValueError(
            f"`dtype={dtype}` and the GGUFQuantizationConfig's `compute_dtype={quantization_config.compute_dtype}` "
            "disagree; the model computes in one dtype: pass the same one (or only one of them)."
        )
    return quantization_config


def load_gguf_transformer(cls, path: Path, config: dict, dtype, quantization_config, device):
    """A GGUF single file -> the model with diffusers' GGUF layers (module docstring)."""
    from diffusers.models.model_loading_utils import load_gguf_checkpoint, load_model_dict_into_meta
    from diffusers.quantizers import DiffusersAutoQuantizer
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    quantization_config = gguf_quantization_config(dtype, quantization_config)
    compute_dtype = quantization_config.compute_dtype
    header = read_gguf_header(path)
    check_gguf_types(header, path)
    prefix = common_prefix(header, path)
    model, origin = check_header(
        lambda: cls.from_config(config),
        header,
        path,
        key_plan=lambda key, shape: original_key_plan(key.removeprefix(prefix), shape),
        hint=SINGLE_FILE_HINT,
    )

    stored = load_gguf_checkpoint(str(path))
    linear_weights = set(linear_weight_keys(model))
    state_dict = {}
    for key, (source_key, rows) in origin.items():
        tensor = stored[source_key] if rows is None else stored[source_key][rows]
        if isinstance(tensor, GGUFParameter) and key not in linear_weights:
            tensor = dequantize_gguf_tensor(tensor).to(compute_dtype)
        state_dict[key] = tensor
    del stored

    quantizer = DiffusersAutoQuantizer.from_config(quantization_config, pre_quantized=True)
    quantizer.validate_environment()
    quantizer.preprocess_model(model=model, device_map=None, state_dict=state_dict, keep_in_fp32_modules=[])
    load_model_dict_into_meta(
        model,
        state_dict,
        dtype=compute_dtype,  # never None: diffusers would cast the quantized bytes to the meta weights' dtype
        hf_quantizer=quantizer,
        keep_in_fp32_modules=[],
        device_map={"": torch.device(device or "cpu")},
        unexpected_keys=[],
    )
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    return model
