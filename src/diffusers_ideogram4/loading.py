"""Strict checkpoint loading (SPEC 2.1, 2.2, 9), one rule for every component.

Checkpoints the host libraries read (the transformer's diffusers layout, a Qwen3-VL text encoder, the FLUX.2 VAE, with
or without quantization configs and device maps) load through the host's own `from_pretrained(...,
output_loading_info=True)`, and `check_loading_info` refuses the result when a key was missing, unexpected or
mis-shaped (the hosts only log those and initialise the missing weights at random). The formats the hosts cannot read
(the original release's fused attention, the fp8 release) load through `strict_load`. Either way the safetensors
headers are checked against the model built on the meta device first, so a wrong checkpoint fails fast, by name,
before a tensor is read.
"""

import json
import re
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open

from .constants import FUSED_TO_SPLIT
from .fp8 import (
    SCALE_SUFFIX,
    STORED_SCALE_SUFFIXES,
    is_fp8_checkpoint,
    keeps_stored_dtype,
    replace_linears_with_fp8,
)


# A hub repo id as this package takes one: `owner/name`.
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
HUB_DOWNLOAD_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
# device_map values that spread a model over devices (only the host's loader places those).
MULTI_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# Arguments diffusers' pipeline loader passes to every model that only matter to the host's loader: the strict
# loader accepts them at their "nothing asked" value and refuses anything else.
_HOST_ONLY = {
    "quantization_config": None,
    "max_memory": None,
    "offload_folder": None,
    "offload_state_dict": None,
    "use_flashpack": False,
}
# Arguments that change nothing for a model built on the meta device and filled from safetensors files.
_NO_EFFECT = ("low_cpu_mem_usage", "use_safetensors", "variant")
# How many offending keys an error message lists before it summarises.
MAX_KEYS_IN_MESSAGE = 12
# The safetensors dtypes a floating model tensor may be stored in (cast to the load dtype); see `accepted_dtypes`.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# safetensors header dtype names and the torch dtypes they store.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
STORED_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the model it is loaded into."""


# --------------------------------------------------------------------------------------------------------------------
# Key layouts: the fused <-> split rename of `constants.FUSED_TO_SPLIT`, for checkpoints, conversion and LoRA alike

_SPLIT_TO_FUSED = {
    split: (fused, index) for fused, parts in FUSED_TO_SPLIT.items() for index, split in enumerate(parts)
}


def _module_pattern(modules) -> re.Pattern:
    """`<prefix><module><rest>` where rest is empty or `.<parameter path>`."""
    alternatives = "|".join(map(re.escape, modules))
    return re.compile(rf"^(?P<prefix>(?:.*\.)?)(?P<module>{alternatives})(?P<rest>(?:\..+)?)$")


_FUSED_NAME, _SPLIT_NAME = _module_pattern(FUSED_TO_SPLIT), _module_pattern(_SPLIT_TO_FUSED)


def split_names(name: str) -> tuple[str, ...] | None:
    """`layers.3.attention.qkv[.weight]` -> the split names its rows go to, in row order; None outside fused modules."""
    match = _FUSED_NAME.match(name)
    if match is None:
        return None
    prefix, module, rest = match.group("prefix", "module", "rest")
    return tuple(f"{prefix}{split}{rest}" for split in FUSED_TO_SPLIT[module])


def fused_name(name: str) -> tuple[str, int, int] | None:
    """`layers.3.attention.to_k[.weight]` -> (`layers.3.attention.qkv[.weight]`, row part 1, of 3 parts); None for
    names outside the split attention."""
    match = _SPLIT_NAME.match(name)
    if match is None:
        return None
    prefix, module, rest = match.group("prefix", "module", "rest")
    fused, index = _SPLIT_TO_FUSED[module]
    return f"{prefix}{fused}{rest}", index, len(FUSED_TO_SPLIT[fused])


def fused_groups(named: dict) -> tuple[dict, dict[str, list]]:
    """Split-layout names -> (the entries outside the split attention, fused name -> its parts' values in row order,
    None where a part is absent)."""
    unchanged, groups = {}, {}
    for name, value in named.items():
        fused = fused_name(name)
        if fused is None:
            unchanged[name] = value
        else:
            groups.setdefault(fused[0], [None] * fused[2])[fused[1]] = value
    return unchanged, groups


def is_original_layout(keys) -> bool:
    """True when the keys use the original release's fused attention (`attention.qkv` / `attention.o`)."""
    return any(_FUSED_NAME.match(key) for key in keys)


def original_key_plan(key: str, shape: tuple[int, ...]) -> list[tuple[str, slice | None]]:
    """Where one original-layout tensor goes in the diffusers layout: a list of (new key, row slice or None)."""
    parts = split_names(key)
    if parts is None or len(parts) == 1:
        return [(parts[0] if parts else key, None)]
    if shape == ():  # a per-tensor scale of the fused weight holds for each of its parts
        return [(part, None) for part in parts]
    if shape[0] % len(parts):
        raise CheckpointMismatchError(
            f"`{key}` has shape {list(shape)}; a fused q/k/v tensor needs 3 * hidden rows (contiguous [q; k; v])."
        )
    rows = shape[0] // len(parts)
    return [(part, slice(i * rows, (i + 1) * rows)) for i, part in enumerate(parts)]


def original_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split fused attention tensors into the diffusers layout; rows are copied, never changed."""
    return {
        new_key: tensor if rows is None else tensor[rows].clone()
        for key, tensor in state_dict.items()
        for new_key, rows in original_key_plan(key, tuple(tensor.shape))
    }


def diffusers_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fuse to_q/to_k/to_v into `attention.qkv` (rows [q; k; v]) and rename `to_out.0` to `attention.o`."""
    converted, groups = fused_groups(state_dict)
    for key, parts in groups.items():
        if any(part is None for part in parts):
            raise CheckpointMismatchError(f"`{key}` cannot be fused: some of {list(split_names(key))} are missing.")
        converted[key] = parts[0] if len(parts) == 1 else torch.cat(parts)
    return converted


# --------------------------------------------------------------------------------------------------------------------
# Files and headers


def resolve_component_folder(pretrained_model_name_or_path, subfolder: str | None = None, **hub_kwargs) -> Path:
    """A local folder, or a hub repo id fetched with `huggingface_hub` (only the component's files)."""
    path = Path(pretrained_model_name_or_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        patterns = [f"{subfolder}/*.json", f"{subfolder}/*.safetensors"] if subfolder else ["*.json", "*.safetensors"]
        hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
        path = Path(snapshot_download(str(pretrained_model_name_or_path), allow_patterns=patterns, **hub_kwargs))
    folder = path / (subfolder or "")
    if not folder.is_dir():
        raise FileNotFoundError(f"`subfolder={subfolder!r}` does not exist in {path}.")
    return folder


def checkpoint_files(folder: Path, variant: str | None = None, name: str = "diffusion_pytorch_model") -> list[Path]:
    """The safetensors files of one component: `<name>[.variant].safetensors`, an index, or a single file."""
    stem = name + (f".{variant}" if variant else "")
    index = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if not index.exists():
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        index = indexes[0] if len(indexes) == 1 and variant is None else index
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [name for name in shards if not (folder / name).exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shard files that are not in {folder}: {missing}.")
        return [folder / name for name in shards]
    if single.exists():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1 and variant is None:
        return found
    if list(folder.glob("*.bin")):
        raise ValueError(f"{folder} holds pickled `.bin` weights; this package loads safetensors only.")
    raise FileNotFoundError(
        f"No checkpoint in {folder}: expected `{stem}.safetensors`, a `*.safetensors.index.json` with its shards, or "
        f"exactly one `*.safetensors` file (found {[p.name for p in found]})."
    )


def unreadable(file: Path, error: Exception) -> str:
    """One line on why a file is not a readable safetensors file: truncated (its size against what its own header
    describes), or not safetensors at all."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        if size < 8 + length + end:
            return f"{file} is truncated: {size} bytes, its header describes {8 + length + end} ({error})."
    except (struct.error, ValueError, KeyError, TypeError, MemoryError, OverflowError):
        return f"{file} is not a safetensors file, or its header is damaged ({size} bytes; {error})."
    return f"{file} is not a readable safetensors file ({size} bytes; {error})."


@contextmanager
def open_safetensors(file):
    """`safe_open(file)` whose failure names the file and says whether it is truncated (CheckpointMismatchError)."""
    try:
        handle = safe_open(str(file), framework="pt")
    except SafetensorError as error:
        raise CheckpointMismatchError(unreadable(Path(file), error)) from None
    with handle:
        yield handle


def locate_tensors(files: list[Path]) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Key -> (file, safetensors dtype, shape) of every tensor in the files, without reading any tensor."""
    located = {}
    for file in files:
        with open_safetensors(file) as handle:
            for key in handle.keys():
                if key in located:
                    raise CheckpointMismatchError(f"`{key}` appears in two shards: {located[key][0]} and {file}.")
                view = handle.get_slice(key)
                located[key] = (file, view.get_dtype(), tuple(view.get_shape()))
    return located


def read_header(files: list[Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Key -> (safetensors dtype, shape) of every tensor in the files, without reading any tensor."""
    return {key: (dtype, shape) for key, (_, dtype, shape) in locate_tensors(files).items()}


# --------------------------------------------------------------------------------------------------------------------
# Checks: every problem named, all at once


def list_keys(keys) -> str:
    """Sorted names for an error message, the first MAX_KEYS_IN_MESSAGE of them and a count of the rest."""
    keys = sorted(str(key) for key in keys)
    more = len(keys) - MAX_KEYS_IN_MESSAGE
    return ", ".join(keys[:MAX_KEYS_IN_MESSAGE]) + (f" and {more} more" if more > 0 else "")


def key_problems(labelled: dict) -> list[str]:
    """`{label: keys}` -> one `label: names` problem per non-empty group, for `raise_problems`."""
    return [f"{label}: {list_keys(keys)}" for label, keys in labelled.items() if keys]


def raise_problems(headline: str, problems: list[str], error: type[Exception] = CheckpointMismatchError) -> None:
    """Raise one error listing every problem under its headline (nothing to do when there is none)."""
    if problems:
        raise error(headline + "\n  - " + "\n  - ".join(problems))


def raise_key_problems(source, hint: str, missing=(), unexpected=(), mismatched=()) -> None:
    """One CheckpointMismatchError naming every missing, unexpected and mis-shaped key (nothing when there is none)."""
    problems = key_problems({"missing keys": missing, "unexpected keys": unexpected, "mis-shaped keys": mismatched})
    raise_problems(f"The checkpoint at {source} does not match the model; it was not used. {hint}".rstrip(), problems)


def check_keys(expected: dict, provided: dict, source, hint: str = "") -> None:
    """Raise CheckpointMismatchError naming every missing, unexpected and mis-shaped key (key -> shape dicts)."""
    mismatched = [
        f"{key} (checkpoint {list(provided[key])}, model {list(expected[key])})"
        for key in set(expected) & set(provided)
        if tuple(provided[key]) != tuple(expected[key])
    ]
    raise_key_problems(source, hint, set(expected) - set(provided), set(provided) - set(expected), mismatched)


def check_loading_info(info: dict, source, hint: str = "") -> None:
    """Raise CheckpointMismatchError when a diffusers / transformers `from_pretrained(output_loading_info=True)`
    reports missing, unexpected or mis-shaped keys (those loaders only log them and initialise at random)."""
    keys = (info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    raise_key_problems(source, hint, *keys)


def check_fp8_pairs(header: dict[str, tuple[str, tuple[int, ...]]], source: str) -> None:
    """Every float8 weight has its `.weight_scale`, and every scale belongs to a float8 weight."""
    scales = {key for key in header if key.endswith(SCALE_SUFFIX)}
    float8 = {key for key, (dtype, _) in header.items() if dtype.startswith("F8")}
    unscaled = [key for key in float8 if key + "_scale" not in scales]
    orphans = [key for key in scales if key.removesuffix("_scale") not in float8]
    problems = key_problems(
        {
            "float8 weights without their `.weight_scale`": unscaled,
            "`.weight_scale` tensors without a float8 weight": orphans,
        }
    )
    raise_problems(f"The fp8 checkpoint at {source} is incomplete or corrupted; nothing was loaded.", problems)


def rename_header(header: dict, key_plan, source: str) -> tuple[dict, dict]:
    """Apply a key plan -> (origin: new key -> (source key, row slice or None), renamed: new key -> (dtype, shape)).
    Two source tensors landing on one key is an error."""
    origin, renamed = {}, {}
    for key, (dtype, shape) in header.items():
        try:
            targets = key_plan(key, shape)
        except CheckpointMismatchError as error:
            raise CheckpointMismatchError(f"{source}: {error}") from None
        for new_key, rows in targets:
            if new_key in origin:
                raise CheckpointMismatchError(f"`{new_key}` is given twice in {source} (once via `{key}`).")
            origin[new_key] = (key, rows)
            renamed[new_key] = (dtype, shape if rows is None else (rows.stop - rows.start, *shape[1:]))
    return origin, renamed


def fp8_release_layers(model, renamed: dict, source) -> None:
    """`check_header`'s default layer rule: FP8Linear wherever the checkpoint has a `.weight_scale` (the fp8 release),
    after checking that every float8 weight has its scale."""
    check_fp8_pairs(renamed, source)
    replace_linears_with_fp8(model, [key.removesuffix("_scale") for key in renamed if key.endswith(SCALE_SUFFIX)])


def check_header(build_model, header: dict, source, key_plan=None, hint: str = "", quantized_layers=None):
    """Rename a checkpoint header with `key_plan` and check it against the model `build_model()` returns, built on
    the meta device with quantized layers where the checkpoint has them -> (that model, origin of each model key).

    `quantized_layers(model, renamed header, source)` checks the quantized tensors and swaps the meta model's Linears
    for the layers that hold them (default `fp8_release_layers`). Reads no tensor: a missing, unexpected or mis-shaped
    key, or an fp8 weight without its scale, raises here."""
    origin, renamed = rename_header(header, key_plan or (lambda key, shape: [(key, None)]), source)
    with init_empty_weights():
        model = build_model()
        (quantized_layers or fp8_release_layers)(model, renamed, source)
    state = model.state_dict()
    expected = {key: tuple(value.shape) for key, value in state.items()}
    check_keys(expected, {key: shape for key, (_, shape) in renamed.items()}, source, hint)
    # Tensors stored in safetensors dtypes (a GGUF header names its quantization types instead, checked by its loader).
    stored = {key: dtype for key, (dtype, _) in renamed.items() if dtype in SAFETENSORS_DTYPES}
    check_dtypes({key: (dtype, accepted_dtypes(key, state[key].dtype)) for key, dtype in stored.items()}, source)
    return model, origin


def accepted_dtypes(key: str, model_dtype: torch.dtype) -> tuple[str, ...]:
    """The safetensors dtypes a checkpoint may store a model tensor in: exactly the model's dtype for the tensors
    that keep their stored dtype (`fp8.keeps_stored_dtype`: float8 weights and block scales, float32 scales, packed
    codes, integer buffers), any float for the others (cast to the load dtype)."""
    return (STORED_NAMES[model_dtype],) if keeps_stored_dtype(key, model_dtype) else FLOAT_DTYPES


def check_dtypes(found: dict[str, tuple[str, tuple[str, ...]]], source) -> None:
    """Raise CheckpointMismatchError naming every key (-> (stored dtype, accepted dtypes)) stored in a dtype its format
    does not define (an integer weight would be cast to float, a float8_e5m2 weight read as float32...)."""
    wrong = [f"{key} ({dtype}, not {' or '.join(ok)})" for key, (dtype, ok) in found.items() if dtype not in ok]
    if wrong:
        raise CheckpointMismatchError(
            f"The checkpoint at {source} stores tensors in dtypes their format does not define; it was not used: "
            f"{list_keys(wrong)}."
        )


# --------------------------------------------------------------------------------------------------------------------
# Loading


def strict_load(model, origin: dict, files: list[Path], *, torch_dtype: torch.dtype | None, disable_mmap=False):
    """Fill a checked meta model (`check_header`) from safetensors files, every planned key read exactly once.

    Floating tensors are cast to `torch_dtype` (default float32); fp8 weights and their scales keep their dtypes.
    Scales must be finite and positive; NaN or inf in other weights is a warning (`warn_non_finite`)."""
    targets = {}
    for new_key, (key, rows) in origin.items():
        targets.setdefault(key, []).append((new_key, rows))
    state_dict = {}
    for file in files:
        with open_safetensors(file) as handle:
            for key in targets.keys() & set(handle.keys()):
                tensor = handle.get_tensor(key)
                tensor = tensor.clone() if disable_mmap else tensor
                shared = len(targets[key]) > 1
                for new_key, rows in targets[key]:
                    part = tensor if rows is None else tensor[rows]
                    part = part.clone() if shared and rows is None else part  # one scale for several layers
                    if not keeps_stored_dtype(new_key, part.dtype):
                        part = part.to(torch_dtype or torch.float32)
                    state_dict[new_key] = part.contiguous()

    # Per-row and per-tensor float32 scales multiply whole weights: finite and positive. (Block scales of packed
    # formats are checked by their own loaders: their padding rows hold no meaning.)
    scales = [
        key
        for key, value in state_dict.items()
        if key.endswith(STORED_SCALE_SUFFIXES)
        and value.dtype == torch.float32
        and not bool((torch.isfinite(value) & (value > 0)).all())
    ]
    if scales:
        raise CheckpointMismatchError(
            f"Quantization scales must be finite and positive; these are not: {list_keys(scales)}."
        )
    model.load_state_dict(state_dict, strict=True, assign=True)
    warn_non_finite(model, files[0] if len(files) == 1 else files[0].parent)
    return model


def warn_non_finite(model, source) -> None:
    """Weights with NaN or inf are the user's to judge (a half-trained LoRA merge...): one warning naming the keys."""
    bad = [
        key
        for key, value in model.state_dict().items()
        if type(value) in (torch.Tensor, torch.nn.Parameter)  # quantized tensor subclasses hold their own checks
        and not keeps_stored_dtype(key, value.dtype)  # floats only; stored scales were checked by strict_load
        and not bool(torch.isfinite(value).all())
    ]
    if bad:
        warnings.warn(f"The checkpoint at {source} has NaN or infinite values in {list_keys(bad)}.", stacklevel=3)


def resolve_dtype(dtype, torch_dtype):
    """`dtype` (diffusers >= 0.42, transformers 5) or its older name `torch_dtype`; never two that disagree."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"`dtype={dtype}` and `torch_dtype={torch_dtype}` disagree: pass only `dtype`.")
    return torch_dtype if dtype is None else dtype


def load_pretrained(
    pretrained_model_name_or_path,
    *,
    build_model,
    host_from_pretrained,
    hint: str,
    host_dtype_argument: str = "torch_dtype",
    weights_name: str = "diffusion_pytorch_model",
    key_plan=None,
    ignore: str | None = None,
    known_kwargs: tuple[str, ...] | None = None,
    check_before_host: bool = True,
    **kwargs,
):
    """The one loading rule (module docstring) for a model class of this package.

    Args:
        build_model: `build_model(folder)` returns the model the folder's config describes (called on the meta device).
        host_from_pretrained: the host library's own loader, e.g. `super().from_pretrained` in the class's override;
            called with the folder, the dtype as `host_dtype_argument` (`torch_dtype` for diffusers, `dtype` for
            transformers), `output_loading_info=True` and the remaining kwargs.
        hint: what the folder should hold, for error messages.
        weights_name: the weight files' stem (`diffusion_pytorch_model`, `model`).
        key_plan: renames checkpoint keys (and splits fused tensors) for the strict loader.
        ignore: a regex of checkpoint keys that are never loaded (a vision tower).
        known_kwargs: when given, any other argument is refused (the host would only warn about it).
        check_before_host: check the header against the model before the host loads (diffusers' loader reports a
            mis-shaped key without naming the checkpoint); False leaves the key mapping to the host (transformers
            renames some checkpoint keys itself): then only the dtypes (floats) and the host's loading info.
        kwargs: the host's `from_pretrained` arguments (`dtype` or `torch_dtype`, `subfolder`, `device_map`, hub
            download arguments, ...).
    """
    unknown = sorted(set(kwargs) - set(known_kwargs)) if known_kwargs is not None else []
    if unknown:
        raise TypeError(f"from_pretrained got unexpected arguments: {unknown}.")
    dtype = resolve_dtype(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None))
    wants_info = kwargs.pop("output_loading_info", False)
    hub_kwargs = {key: kwargs.pop(key) for key in HUB_DOWNLOAD_KWARGS if key in kwargs}
    if kwargs.get("use_safetensors") is False:
        raise ValueError("`use_safetensors=False`: this package loads safetensors weights only (never pickle).")
    folder = resolve_component_folder(pretrained_model_name_or_path, kwargs.pop("subfolder", None), **hub_kwargs)
    files = checkpoint_files(folder, kwargs.get("variant"), weights_name)
    header = {key: value for key, value in read_header(files).items() if not (ignore and re.search(ignore, key))}
    build = lambda: build_model(folder)  # noqa: E731

    from .sdnq_loading import SDNQ_METHOD, check_sdnq_checkpoint, stored_quantization_config

    quantization = stored_quantization_config(folder)
    if quantization is not None and quantization.get("quant_method") == SDNQ_METHOD:
        check_sdnq_checkpoint(build, header, folder, hint, check_names=check_before_host)  # the host loads it
    if not (is_original_layout(header) or is_fp8_checkpoint(header)):
        # A pre-quantized checkpoint stores its quantization state as extra keys that only the host can read.
        if quantization is None and check_before_host:
            check_header(build, header, folder, hint=hint)
        elif quantization is None:
            check_dtypes({key: (dtype, FLOAT_DTYPES) for key, (dtype, _) in header.items()}, folder)
        model, info = host_from_pretrained(folder, **{host_dtype_argument: dtype}, output_loading_info=True, **kwargs)
        check_loading_info(info, folder, hint)
        warn_non_finite(model, folder)
        return (model, info) if wants_info else model

    # The original layout or the fp8 release: this package's strict loader, on one device.
    device_map = kwargs.pop("device_map", None)
    disable_mmap = kwargs.pop("disable_mmap", False)
    for name in _NO_EFFECT:
        kwargs.pop(name, None)
    refused = sorted(name for name, unset in _HOST_ONLY.items() if kwargs.pop(name, unset) != unset)
    if isinstance(device_map, dict) or device_map in MULTI_DEVICE_MAPS:
        refused.append("device_map")
    if refused:
        layout = "the fp8 release" if is_fp8_checkpoint(header) else "the original fused-attention layout"
        raise ValueError(
            f"The checkpoint at {folder} is in {layout}, which this package loads itself, on one device and without "
            f"a quantization config; it cannot take {refused}. Load it without them, or convert it to the diffusers "
            "layout first: `python conversion/convert_ideogram4_to_diffusers.py --source SRC --output OUT`."
        )
    if kwargs:
        raise TypeError(f"from_pretrained got unexpected arguments: {sorted(kwargs)}.")
    model, origin = check_header(build, header, folder, key_plan, hint)
    if isinstance(dtype, str):  # transformers' spellings: "auto" (as stored) or a name such as "bfloat16"
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    model = strict_load(model, origin, files, torch_dtype=dtype, disable_mmap=disable_mmap)
    if device_map is not None:
        model.to(device_map)
    model.eval()
    info = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    return (model, info) if wants_info else model
