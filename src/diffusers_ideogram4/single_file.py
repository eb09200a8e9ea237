"""Single-file transformers: one `.safetensors` or `.gguf` file per transformer, as ComfyUI, stable-diffusion.cpp and
the trainers pass them around (SPEC 10, "Weights people hold").

The format is read from the file, never from its name:
- GGUF (the file starts with `GGUF`): `diffusers_ideogram4.gguf_loading`.
- safetensors, plain floats, in the original layout (fused `attention.qkv` / `attention.o`) or the diffusers layout;
- safetensors, the fp8 release's format (float8 weights, float32 per-row `weight_scale`);
- safetensors, ComfyUI's quantized formats (`comfy_quant` tensors or `_quantization_metadata`: scaled fp8 and NVFP4
  per layer; the older `scaled_fp8` marker), `diffusers_ideogram4.comfy_formats`.
Every key may carry one prefix, `model.diffusion_model.` or `diffusion_model.`, and then every key must carry it.

A single file has no config: the architecture comes from `config=` (a size name of `constants.TRANSFORMER_SIZES`, a
dict, or a folder / hub repo with the transformer's config.json; default the released model). The file's header is
checked against that model on the meta device before any weight is read, through the one strict loader
(`loading.check_header` / `strict_load`): a key that does not map, a missing key, a wrong shape, a scale of the wrong
dtype or an unsupported quantization format raises and names the keys.
"""

import json
import re
from pathlib import Path

import torch

from .comfy_formats import (
    COMFY_QUANT_SUFFIX,
    FLOAT8_FORMATS,
    LEGACY_MARKER,
    LEGACY_RENAMES,
    NVFP4_FORMAT,
    NVFP4_ROW_TILE,
    QUANTIZATION_METADATA_KEY,
    layer_config_problem,
    quantized_layer,
)
from .constants import TRANSFORMER_SIZES
from .loading import (
    FLOAT_DTYPES,
    HUB_DOWNLOAD_KWARGS,
    STORED_NAMES,
    CheckpointMismatchError,
    check_header,
    fp8_release_layers,
    list_keys,
    open_safetensors,
    original_key_plan,
    raise_problems,
    read_header,
    resolve_dtype,
    split_names,
    strict_load,
)


# Key prefixes single files carry (ComfyUI checkpoint saves, LoRA-style saves); none is the most common.
SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
GGUF_MAGIC = b"GGUF"
DEFAULT_SIZE = "ideogram4"
# Header metadata musubi-tuner requires of the Comfy-Org files: which branch a file holds.
MODEL_TYPE_KEY = "model_type"
BRANCH_MODEL_TYPES = {"ideogram4_cond": "transformer", "ideogram4_uncond": "unconditional_transformer"}
# The one tensor of a quantized layer that a file may leave out.
OPTIONAL_TENSOR = ".input_scale"
LEGACY_SCALE = next(old for old, new in LEGACY_RENAMES.items() if new == ".weight_scale")
# ModelOpt / AWQ activation smoothing: a weight-only load would have to fold it in; refused.
REFUSED_SUFFIXES = (".pre_quant_scale",)
_HUB_URL = re.compile(
    r"^(?:https?://)?(?:huggingface\.co|hf\.co)/(?P<repo>[^/]+/[^/]+)/(?:(?:blob|resolve)/(?P<revision>[^/]+)/)?"
    r"(?P<filename>.+)$"
)
SINGLE_FILE_KWARGS = ("config", "subfolder", "dtype", "torch_dtype", "device", "disable_mmap", "quantization_config")


# --------------------------------------------------------------------------------------------------------------------
# Where the file is, what it is, what model it describes


def resolve_single_file(path_or_url, **hub_kwargs) -> Path:
    """A local file, or a hub file URL (`https://huggingface.co/<owner>/<repo>/blob/<revision>/<file>`) fetched with
    `huggingface_hub.hf_hub_download`."""
    path = Path(path_or_url)
    if path.is_file():
        return path
    match = _HUB_URL.match(str(path_or_url))
    if match is None:
        raise FileNotFoundError(
            f"`{path_or_url}` is neither a file nor a hub file URL (https://huggingface.co/<owner>/<repo>/blob/"
            "<revision>/<file>)."
        )
    from huggingface_hub import hf_hub_download

    hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    revision = hub_kwargs.pop("revision", None) or match["revision"]
    return Path(hf_hub_download(match["repo"], match["filename"], revision=revision, **hub_kwargs))


def file_kind(path: Path) -> str:
    """ "gguf" or "safetensors", from the first bytes (safetensors: the header's length, then `{`)."""
    with open(path, "rb") as handle:
        start = handle.read(9)
    if start[:4] == GGUF_MAGIC:
        return "gguf"
    if len(start) == 9 and start[8:9] == b"{" and int.from_bytes(start[:8], "little") > 0:
        return "safetensors"
    raise ValueError(
        f"{path} is neither a safetensors file nor a GGUF file (it starts with {start!r}); single-file loading reads "
        "those two formats."
    )


def transformer_config(cls, config=None, subfolder: str | None = None, **hub_kwargs) -> dict:
    """The transformer config a single file is loaded into: a size name of `TRANSFORMER_SIZES` (default the released
    model), a dict of `cls` arguments, or a folder / hub repo holding the transformer's config.json (at its root or
    in `subfolder`, default `transformer/` when the root has none)."""
    import inspect

    if config is None or (isinstance(config, str) and config in TRANSFORMER_SIZES):
        return dict(TRANSFORMER_SIZES[config or DEFAULT_SIZE])
    if not isinstance(config, dict):
        folder = Path(config)
        if subfolder is None and not (folder / "config.json").is_file():
            subfolder = "transformer"  # a pipeline folder or hub repo: its transformer
        config = cls.load_config(str(folder), subfolder=subfolder, **{k: v for k, v in hub_kwargs.items() if v})
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(
            f"`config` has fields {unknown} that {cls.__name__} does not take; it takes {sorted(known)}, or a size "
            f"name from {sorted(TRANSFORMER_SIZES)}."
        )
    return {k: v for k, v in config.items() if not k.startswith("_")}


def common_prefix(keys, source) -> str:
    """The one prefix of `SINGLE_FILE_PREFIXES` every key carries, or "" when none does; a prefix on only some keys
    is an error naming the others."""
    keys = list(keys)
    for prefix in SINGLE_FILE_PREFIXES:
        others = [key for key in keys if not key.startswith(prefix)]
        if others and len(others) < len(keys):
            raise CheckpointMismatchError(
                f"{source}: {len(keys) - len(others)} keys start with `{prefix}` and {len(others)} do not: "
                f"{list_keys(others)}. A single file holds one model, every key with the same prefix."
            )
        if keys and not others:
            return prefix
    return ""


def read_model_type(path) -> str | None:
    """The `model_type` header metadata (`ideogram4_cond` / `ideogram4_uncond`) of a safetensors file, if any."""
    if file_kind(path) != "safetensors":
        return None
    with open_safetensors(path) as handle:
        return (handle.metadata() or {}).get(MODEL_TYPE_KEY)


# --------------------------------------------------------------------------------------------------------------------
# ComfyUI's per-layer formats: read, check, and the layers that hold them


def comfy_layer_formats(path: Path, header: dict, metadata: dict, prefix: str) -> tuple[dict[str, str], set[str]]:
    """-> (layer name without prefix -> format, the file's keys that only describe formats). Empty when the file has
    none of ComfyUI's markers. Raises naming every layer whose config cannot be loaded."""
    configs, problems = {}, []
    raw = metadata.get(QUANTIZATION_METADATA_KEY)
    if raw is not None:
        try:  # a `layers` that is not an object has no `.items()`
            configs = {layer.removeprefix(prefix): config for layer, config in json.loads(raw)["layers"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointMismatchError(
                f"{path}: the header's `{QUANTIZATION_METADATA_KEY}` is not JSON with a `layers` object."
            ) from None
    markers = [key for key in header if key.endswith(COMFY_QUANT_SUFFIX)]
    with open_safetensors(path) as handle:
        for key in markers:
            layer = key.removeprefix(prefix).removesuffix(COMFY_QUANT_SUFFIX)
            try:
                config = json.loads(handle.get_tensor(key).numpy().tobytes().decode("utf-8"))  # uint8 bytes of JSON
            except (ValueError, UnicodeDecodeError):
                problems.append(f"`{key}` is not UTF-8 JSON")
                continue
            if layer in configs and configs[layer] != config:
                problems.append(f"`{key}` says {config}, the header's `{QUANTIZATION_METADATA_KEY}` {configs[layer]}")
            configs[layer] = config
    consumed = set(markers)
    legacy = prefix + LEGACY_MARKER
    if legacy in header:
        if configs:
            problems.append(
                f"`{legacy}` (the older scaled fp8 marker) beside per-layer configs: give one or the other"
            )
        consumed.add(legacy)
        # Each layer in the float8 format its weight is stored in (ComfyUI labels them all e4m3fn).
        formats_by_dtype = {STORED_NAMES[dtype]: fmt for fmt, dtype in FLOAT8_FORMATS.items()}
        for key in header:
            if key.endswith(LEGACY_SCALE):
                layer = key.removeprefix(prefix).removesuffix(LEGACY_SCALE)
                weight_dtype = header.get(prefix + layer + ".weight", (None,))[0]
                if weight_dtype in formats_by_dtype:
                    configs[layer] = {"format": formats_by_dtype[weight_dtype]}
                else:
                    problems.append(f"`{key}` scales `{prefix}{layer}.weight`, which is {weight_dtype}, not float8")
    for layer, config in sorted(configs.items()):
        problem = layer_config_problem(config)
        if problem:
            problems.append(f"layer `{layer}`: {problem}")
        elif prefix + layer + ".weight" not in header:
            problems.append(f"layer `{layer}` has a quantization config but the file has no `{prefix}{layer}.weight`")
    raise_problems(
        f"{path} holds quantized layers this package cannot load; nothing was loaded. Load a bf16, fp8 or nvfp4 file "
        "of the model instead, or convert this one with the tool that made it.",
        problems,
    )
    return {layer: config["format"] for layer, config in configs.items()}, consumed


def stored_tensors(fmt: str) -> dict[str, tuple[str, bool]]:
    """`.name` -> (safetensors dtype, whether it is one number) of every tensor but the bias that a layer of format
    `fmt` stores, its optional `.input_scale` included: the layer classes of `comfy_formats` define them."""
    layer = quantized_layer(fmt, torch.nn.Linear(16, 16, bias=False, device="meta"), has_input_scale=True)
    return {f".{name}": (STORED_NAMES[value.dtype], value.dim() == 0) for name, value in layer.named_parameters()}


def check_comfy_tensors(header: dict, formats: dict[str, str], prefix: str, source) -> None:
    """Dtypes and the set of tensors of every layer: quantized layers have exactly their format's tensors, every other
    tensor is a float (a float8 or uint8 tensor outside a quantized layer has no config to read it with)."""
    problems, owned = [], set()
    for layer, fmt in formats.items():
        stem = prefix + layer
        expected = stored_tensors(fmt)
        present = {key.removeprefix(stem) for key in header if key.startswith(stem + ".")} - {".bias"}
        if fmt == NVFP4_FORMAT:
            # Fused q/k/v rows are split by row thirds; the tiled block scales stay whole only at 128-row tiles.
            parts = split_names(layer)
            rows = header[stem + ".weight"][1][0] if stem + ".weight" in header else 0
            if parts and len(parts) > 1 and rows % (len(parts) * NVFP4_ROW_TILE):
                problems.append(f"`{stem}.weight`: nvfp4 q/k/v rows {rows} do not split into 128-row tiles")
        for stored in sorted(present):
            key, suffix = stem + stored, LEGACY_RENAMES.get(stored, stored)
            owned.add(key)
            wanted, one_number = expected.get(suffix, (None, False))
            if suffix in REFUSED_SUFFIXES:
                problems.append(f"`{key}`: activation smoothing (`pre_quant_scale`) is not supported")
            elif wanted is None:
                problems.append(f"`{key}` is not a tensor of a `{fmt}` layer")
            elif header[key][0] != wanted:
                problems.append(f"`{key}` is {header[key][0]}, a `{fmt}` layer stores it as {wanted}")
            elif one_number and header[key][1] != ():
                problems.append(
                    f"`{key}` has shape {list(header[key][1])}; a per-tensor scale is one number (shape [])"
                )
        required = set(expected) - {OPTIONAL_TENSOR}
        missing = sorted(stem + suffix for suffix in required - {LEGACY_RENAMES.get(p, p) for p in present})
        if missing:
            problems.append(f"`{fmt}` layer `{stem}` lacks {missing}")
    others = [key for key, (dtype, _) in header.items() if key not in owned and dtype not in FLOAT_DTYPES]
    if others:
        problems.append(f"tensors that are not floats and belong to no quantized layer: {list_keys(others)}")
    raise_problems(f"The quantized single file {source} is incomplete or corrupted; nothing was loaded.", problems)


def comfy_layers(formats: dict[str, str]):
    """`check_header`'s layer rule for ComfyUI files: each quantized layer (renamed like its weight) becomes the layer
    that holds its format, with an activation scale where the renamed header has one."""
    by_module = {module: fmt for layer, fmt in formats.items() for module in split_names(layer) or (layer,)}

    def replace(model, renamed: dict, source) -> None:
        not_linear = []
        for module, fmt in by_module.items():
            try:
                linear = model.get_submodule(module)
            except AttributeError:
                continue  # reported by the key check as unexpected keys
            if not isinstance(linear, torch.nn.Linear):
                not_linear.append(f"{module} ({type(linear).__name__})")
                continue
            parent, _, child = module.rpartition(".")
            quantized = quantized_layer(fmt, linear, has_input_scale=module + OPTIONAL_TENSOR in renamed)
            setattr(model.get_submodule(parent), child, quantized)
        if not_linear:
            raise CheckpointMismatchError(
                f"{source}: quantization configs for modules that are not Linear layers: {list_keys(not_linear)}."
            )

    return replace


# --------------------------------------------------------------------------------------------------------------------
# Loading


def load_safetensors_transformer(cls, path: Path, config: dict, dtype, disable_mmap: bool = False):
    """A safetensors single file (module docstring) -> the model, checked before any weight is read."""
    header = read_header([path])  # a damaged file is named, with what is wrong
    with open_safetensors(path) as handle:
        metadata = handle.metadata() or {}
    prefix = common_prefix(header, path)
    formats, consumed = comfy_layer_formats(path, header, metadata, prefix)
    header = {key: value for key, value in header.items() if key not in consumed}
    quantized_layers = fp8_release_layers
    if formats:
        check_comfy_tensors(header, formats, prefix, path)
        quantized_layers = comfy_layers(formats)

    def key_plan(key, shape):
        key = key.removeprefix(prefix)
        for old, new in LEGACY_RENAMES.items():
            key = key[: -len(old)] + new if key.endswith(old) else key
        return original_key_plan(key, shape)

    model, origin = check_header(
        lambda: cls.from_config(config),
        header,
        path,
        key_plan,
        hint=SINGLE_FILE_HINT,
        quantized_layers=quantized_layers,
    )
    return strict_load(model, origin, [path], torch_dtype=dtype, disable_mmap=disable_mmap)


SINGLE_FILE_HINT = (
    "Expected one Ideogram 4 transformer; if the shapes differ, pass the architecture as `config=` (a size name, a "
    "dict, or the folder / hub repo of its config.json)."
)


def load_single_file(cls, path_or_url, **kwargs):
    """`Ideogram4Transformer2DModel.from_single_file`: see its docstring."""
    unknown = sorted(set(kwargs) - set(SINGLE_FILE_KWARGS) - set(HUB_DOWNLOAD_KWARGS))
    if unknown:
        raise TypeError(
            f"from_single_file got unexpected arguments {unknown}; it takes {list(SINGLE_FILE_KWARGS)} and the hub "
            f"download arguments {list(HUB_DOWNLOAD_KWARGS)}."
        )
    hub_kwargs = {key: kwargs.pop(key) for key in HUB_DOWNLOAD_KWARGS if key in kwargs}
    dtype = resolve_dtype(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None))
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"`dtype={dtype!r}` is not a floating torch dtype (torch.bfloat16, torch.float32, ...).")
    device = kwargs.pop("device", None)
    quantization_config = kwargs.pop("quantization_config", None)
    disable_mmap = kwargs.pop("disable_mmap", False)
    config = transformer_config(cls, kwargs.pop("config", None), kwargs.pop("subfolder", None), **hub_kwargs)
    path = resolve_single_file(path_or_url, **hub_kwargs)
    if file_kind(path) == "gguf":  # read into memory whatever `disable_mmap` says
        from .gguf_loading import load_gguf_transformer

        return load_gguf_transformer(cls, path, config, dtype, quantization_config, device).eval()
    if quantization_config is not None:
        raise ValueError(
            f"`quantization_config` is for GGUF files; {path} is a safetensors file, which loads in the format it is "
            "stored in (bf16, fp8 or nvfp4). To quantize it another way, convert it to a diffusers folder "
            "(`conversion/convert_single_file_to_diffusers.py`) and load that with `quantization_config=`."
        )
    model = load_safetensors_transformer(cls, path, config, dtype, disable_mmap)
    if device is not None:
        model.to(device)
    return model.eval()


def single_file_transformers(transformer=None, unconditional_transformer=None, **kwargs) -> dict:
    """Load one or both transformers from single files, for `Ideogram4Pipeline.from_pretrained(folder, **these)`:
    the other components then come from the folder. A safetensors file whose `model_type` metadata names the other
    branch (`ideogram4_cond` / `ideogram4_uncond`, as musubi-tuner and the Comfy-Org files write it) is refused.

    Args:
        transformer, unconditional_transformer: single-file paths or hub file URLs (either may be left out).
        kwargs: `Ideogram4Transformer2DModel.from_single_file` arguments (`config`, `dtype`, `device`, ...).
    """
    from .transformer_ideogram4 import Ideogram4Transformer2DModel

    files = {"transformer": transformer, "unconditional_transformer": unconditional_transformer}
    files = {name: file for name, file in files.items() if file is not None}
    if not files:
        raise ValueError("Pass `transformer=` and/or `unconditional_transformer=` (single-file paths or URLs).")
    hub_kwargs = {key: kwargs[key] for key in HUB_DOWNLOAD_KWARGS if key in kwargs}
    paths = {name: resolve_single_file(file, **hub_kwargs) for name, file in files.items()}
    for name, path in paths.items():
        model_type = read_model_type(path)
        branch = BRANCH_MODEL_TYPES.get(model_type)
        if model_type is not None and branch != name:
            raise ValueError(
                f"`{name}={str(files[name])!r}` holds `model_type={model_type!r}` in its header, which is "
                f"{'the ' + branch if branch else 'not an Ideogram 4 transformer'}; pass each file as the branch it "
                f"is ({BRANCH_MODEL_TYPES})."
            )
    return {name: Ideogram4Transformer2DModel.from_single_file(path, **kwargs) for name, path in paths.items()}
