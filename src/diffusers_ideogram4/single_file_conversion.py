"""Convert single-file transformers (GGUF, ComfyUI's scaled fp8 / nvfp4, original-layout safetensors, SDNQ folders'
transformers aside) into the hub's diffusers layout, dequantized to bf16 or fp32, with the conversion module's staged,
verified writing (`diffusers_ideogram4.conversion`).

Each file is loaded strictly with `Ideogram4Transformer2DModel.from_single_file` (every key checked before a byte is
written); each output weight is the one the loaded layer computes with, dequantized in the target dtype when it is
written (one tensor at a time), so the converted model computes exactly what the single file computes in that dtype.
Verification reloads each converted transformer and compares every tensor with its recomputed value, bit for bit.
With `base`, the other components (text encoder, VAE, tokenizer, scheduler) are copied from a hub-layout folder or
repo and a model_index.json is written: the output is a complete pipeline folder.
"""

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import init_empty_weights

from .constants import OFFICIAL_ENTRIES
from .conversion import (
    DEFAULT_MAX_SHARD_SIZE,
    TRANSFORMER_CLASS_NAME,
    WRITTEN_DTYPES,
    ConversionPlan,
    ConversionReport,
    Recipe,
    _check_choice,
    _check_output,
    _execute,
    _plan_copy,
    _read_model_index,
    _sharded,
    component_entries,
    model_index_file,
    parse_size,
    resolve_source,
    transformer_config_text,
)
from .fp8 import QuantizedLinear
from .transformer_ideogram4 import Ideogram4Transformer2DModel


# Target dtypes: the weights are dequantized into one of these.
DEQUANTIZED_DTYPES = WRITTEN_DTYPES


def dequantized_weights(model: nn.Module, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], Callable]]:
    """Key of the plain model -> (shape, function returning that tensor in `dtype`) for a loaded single-file model:
    quantized Linear weights dequantized as their layer does when it runs (GGUF through diffusers' dequantizer),
    every other tensor cast."""
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    weights = {}
    for name, module in model.named_modules():
        for parameter_name, parameter in module.named_parameters(recurse=False):
            key = f"{name}.{parameter_name}" if name else parameter_name
            if isinstance(module, QuantizedLinear) and parameter_name != "bias":
                if parameter_name == "weight":
                    shape = (module.out_features, module.in_features)
                    weights[key] = (shape, lambda m=module: m.dequantized_weight(dtype))
            elif isinstance(parameter, GGUFParameter):
                weights[key] = (tuple(parameter.quant_shape), lambda p=parameter: dequantize_gguf_tensor(p).to(dtype))
            else:
                weights[key] = (tuple(parameter.shape), lambda p=parameter: p.detach().to(dtype))
    return weights


def _plan_single_file(plan: ConversionPlan, name: str, file, config, target: torch.dtype, max_bytes: int) -> None:
    model = Ideogram4Transformer2DModel.from_single_file(file, config=config, dtype=target)
    with init_empty_weights():  # the plain model's key order, which keeps blocks together in shards
        plain = Ideogram4Transformer2DModel.from_config(model.config)
    weights = dequantized_weights(model, target)
    recipes = [Recipe(key, (), weights[key][0], target, compute=weights[key][1]) for key in plain.state_dict()]
    plan.add_transformer(
        name, _sharded(recipes, max_bytes, name), transformer_config_text(plain), {r.key: r for r in recipes}
    )
    plan.notes.append(f"{name}: {Path(str(file)).name} dequantized to {str(target).removeprefix('torch.')}")


def convert_single_files_to_diffusers(
    output,
    *,
    transformer=None,
    unconditional_transformer=None,
    base=None,
    config=None,
    dtype: str = "bf16",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dry_run: bool = False,
    overwrite: bool = False,
    replace_any_folder: bool = False,
    verify: bool = True,
    revision: str | None = None,
    token: str | None = None,
    progress: bool = True,
) -> ConversionReport:
    """Write single-file transformers as diffusers-layout component folders (`transformer/`,
    `unconditional_transformer/`), dequantized to `dtype`.

    Args:
        output: the folder to create; it appears only once complete and verified.
        transformer, unconditional_transformer: single files (`.safetensors` in any format `from_single_file` reads,
            or `.gguf`), paths or hub file URLs; at least one.
        base: a hub-layout folder or repo id whose other components are copied beside them, with a model_index.json
            (transformer folders of `base` that no file replaces are copied as they are).
        config: the transformers' architecture, as `from_single_file` takes it (default the released model).
        dtype: "bf16" or "fp32".
        max_shard_size, dry_run, overwrite, replace_any_folder, verify, progress: as in
            `convert_original_to_diffusers`.
    """
    _check_choice("dtype", dtype, DEQUANTIZED_DTYPES)
    files = {"transformer": transformer, "unconditional_transformer": unconditional_transformer}
    files = {name: file for name, file in files.items() if file is not None}
    if not files:
        raise ValueError("Pass `transformer=` and/or `unconditional_transformer=` (single-file paths or URLs).")
    if revision is not None and base is None:
        raise ValueError(f"`revision={revision!r}` is the hub revision of `base`; give `base`, or drop `revision`.")
    max_bytes = parse_size(max_shard_size)
    local = [Path(f) for f in (base, *files.values()) if f is not None and Path(f).exists()]
    for path in local or [None]:  # before any loading; neither the base nor a source file may be replaced or swallowed
        _check_output(output, overwrite, replace_any_folder, path)
    root = resolve_source(base, revision=revision, token=token) if base is not None else None
    source = ", ".join(f"{name}={file}" for name, file in files.items())
    plan = ConversionPlan("single file -> diffusers", source, root, list(files), dtype)
    for name, file in files.items():
        _plan_single_file(plan, name, file, config, DEQUANTIZED_DTYPES[dtype], max_bytes)
    if root is not None:
        entries = component_entries(_read_model_index(root))
        for name in entries:
            if name not in files:
                _plan_copy(plan, name, None)
                plan.components.append(name)
        entries.update(dict.fromkeys(files, OFFICIAL_ENTRIES[TRANSFORMER_CLASS_NAME]))
        plan.files.append(model_index_file(plan, entries))
    return _execute(plan, output, dry_run, overwrite, replace_any_folder, verify, progress)
