"""Strict checkpoint loading for the Ideogram 4 transformer, in either key layout (SPEC 2.1).

Every key of the checkpoint is consumed exactly once. The key names and shapes are read from the safetensors
headers and checked against the model before a single tensor is read, so a wrong checkpoint fails fast, by name,
and can never leave randomly initialised weights behind.
"""

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open

from .constants import FUSED_OUT, FUSED_QKV, SPLIT_OUT, SPLIT_QKV
from .fp8 import FP8_DTYPE, SCALE_SUFFIX, is_fp8_checkpoint, replace_linears_with_fp8


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
# Original-release keys that the diffusers layout stores differently; every other key is shared. The parameter after
# the module name is `weight`, or `weight_scale` in the fp8 release.
_FUSED_KEY = re.compile(
    rf"^(?P<prefix>(?:.*\.)?)(?P<module>{'|'.join(map(re.escape, (FUSED_QKV, FUSED_OUT)))})\.(?P<param>weight(?:_scale)?)$"
)
_SPLIT_KEY = re.compile(
    rf"^(?P<prefix>(?:.*\.)?)(?P<module>{'|'.join(map(re.escape, (*SPLIT_QKV, SPLIT_OUT)))})\.(?P<param>weight(?:_scale)?)$"
)
# device_map values that spread a model over devices (diffusers' loader handles those).
MULTI_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# How many offending keys an error message lists before it summarises.
MAX_KEYS_IN_MESSAGE = 12


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the model it is loaded into."""


# --------------------------------------------------------------------------------------------------------------------
# Key layouts


def is_original_layout(keys: Iterable[str]) -> bool:
    """True when the keys use the original release's fused attention (`attention.qkv` / `attention.o`)."""
    return any(_FUSED_KEY.match(key) for key in keys)


def original_key_plan(key: str, shape: tuple[int, ...]) -> list[tuple[str, slice | None]]:
    """Where one original-layout tensor goes in the diffusers layout: a list of (new key, row slice or None)."""
    match = _FUSED_KEY.match(key)
    if match is None:
        return [(key, None)]
    prefix, module, param = match.group("prefix", "module", "param")
    if module == FUSED_OUT:
        return [(f"{prefix}{SPLIT_OUT}.{param}", None)]
    if not shape or shape[0] % 3:
        raise CheckpointMismatchError(
            f"`{key}` has shape {list(shape)}; a fused q/k/v tensor needs 3 * hidden rows (contiguous [q; k; v])."
        )
    rows = shape[0] // 3
    return [(f"{prefix}{split}.{param}", slice(i * rows, (i + 1) * rows)) for i, split in enumerate(SPLIT_QKV)]


def original_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split fused attention tensors into the diffusers layout; rows are copied, never changed."""
    converted = {}
    for key, tensor in state_dict.items():
        for new_key, rows in original_key_plan(key, tuple(tensor.shape)):
            converted[new_key] = tensor if rows is None else tensor[rows].clone()
    return converted


def diffusers_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fuse to_q/to_k/to_v into `attention.qkv` and rename `to_out.0` to `attention.o` (the reverse of the above)."""
    converted = {}
    for key, tensor in state_dict.items():
        match = _SPLIT_KEY.match(key)
        if match is None:
            converted[key] = tensor
            continue
        prefix, module, param = match.group("prefix", "module", "param")
        if module == SPLIT_OUT:
            converted[f"{prefix}{FUSED_OUT}.{param}"] = tensor
        elif module == SPLIT_QKV[0]:
            parts = [state_dict[f"{prefix}{split}.{param}"] for split in SPLIT_QKV]
            converted[f"{prefix}{FUSED_QKV}.{param}"] = torch.cat(parts, dim=0)
    return converted


# --------------------------------------------------------------------------------------------------------------------
# Files


def resolve_component_folder(pretrained_model_name_or_path, subfolder: str | None = None, **hub_kwargs) -> Path:
    """A local folder, or a hub repo id fetched with `huggingface_hub` (only the component's files)."""
    path = Path(pretrained_model_name_or_path)
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise FileNotFoundError(f"`subfolder={subfolder!r}` does not exist in {path}.")
        return folder
    from huggingface_hub import snapshot_download

    patterns = [f"{subfolder}/*.json", f"{subfolder}/*.safetensors"] if subfolder else ["*.json", "*.safetensors"]
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    root = snapshot_download(str(pretrained_model_name_or_path), allow_patterns=patterns, **hub_kwargs)
    return Path(root) / subfolder if subfolder else Path(root)


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
    if (folder / "diffusion_pytorch_model.bin").exists() or list(folder.glob("*.bin")):
        raise ValueError(f"{folder} holds pickled `.bin` weights; this package loads safetensors only.")
    raise FileNotFoundError(
        f"No checkpoint in {folder}: expected `{stem}.safetensors`, a `*.safetensors.index.json` with its shards, or "
        f"exactly one `*.safetensors` file (found {[p.name for p in found]})."
    )


def locate_tensors(files: list[Path]) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Key -> (file, safetensors dtype, shape) of every tensor in the files, without reading any tensor."""
    located = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key in located:
                    raise CheckpointMismatchError(f"`{key}` appears in two shards: {located[key][0]} and {file}.")
                view = handle.get_slice(key)
                located[key] = (file, view.get_dtype(), tuple(view.get_shape()))
    return located


def read_header(files: list[Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Key -> (safetensors dtype, shape) of every tensor in the files, without reading any tensor."""
    return {key: (dtype, shape) for key, (_, dtype, shape) in locate_tensors(files).items()}


def rename_keys(header: dict, key_plan, source: str) -> tuple[dict, dict]:
    """Apply a key plan to a header -> (origin: new key -> (source key, row slice or None), renamed: new key ->
    (dtype, shape)). Two source tensors landing on one key is an error."""
    origin, renamed = {}, {}
    for key, (dtype, shape) in header.items():
        for new_key, rows in key_plan(key, shape):
            if new_key in origin:
                raise CheckpointMismatchError(f"`{new_key}` is given twice in {source} (once via `{key}`).")
            origin[new_key] = (key, rows)
            renamed[new_key] = (dtype, shape if rows is None else (rows.stop - rows.start, *shape[1:]))
    return origin, renamed


def check_fp8_pairs(renamed: dict[str, tuple[str, tuple[int, ...]]], source: str) -> None:
    """Every float8 weight has its `.weight_scale`, and every scale belongs to a float8 weight."""
    unscaled = sorted(k for k, (dtype, _) in renamed.items() if dtype.startswith("F8") and k + "_scale" not in renamed)
    orphans = sorted(
        k
        for k in renamed
        if k.endswith(SCALE_SUFFIX) and not renamed.get(k[: -len("_scale")], ("",))[0].startswith("F8")
    )
    problems = []
    if unscaled:
        problems.append(f"float8 weights without their `.weight_scale`: {list_keys(unscaled)}")
    if orphans:
        problems.append(f"`.weight_scale` tensors without a float8 weight: {list_keys(orphans)}")
    raise_problems(f"The fp8 checkpoint at {source} is incomplete or corrupted; nothing was loaded.", problems)


def list_keys(keys) -> str:
    """Sorted names for an error message, the first MAX_KEYS_IN_MESSAGE of them and a count of the rest."""
    keys = sorted(str(key) for key in keys)
    more = len(keys) - MAX_KEYS_IN_MESSAGE
    return ", ".join(keys[:MAX_KEYS_IN_MESSAGE]) + (f" and {more} more" if more > 0 else "")


def raise_problems(headline: str, problems: list[str], error: type[Exception] = None) -> None:
    """Raise one error listing every problem under its headline (nothing to do when there is none)."""
    if problems:
        raise (error or CheckpointMismatchError)(headline + "\n  - " + "\n  - ".join(problems))


def check_keys(expected: dict[str, tuple[int, ...]], provided: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise CheckpointMismatchError naming every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(provided))
    unexpected = sorted(set(provided) - set(expected))
    mismatched = sorted(
        f"{key} (checkpoint {list(provided[key])}, model {list(expected[key])})"
        for key in set(expected) & set(provided)
        if tuple(provided[key]) != tuple(expected[key])
    )
    raise_problems(
        f"The checkpoint at {source} does not match the model config; nothing was loaded. Check that the checkpoint "
        "and config.json belong together (and that this is an Ideogram 4 transformer checkpoint).",
        _key_problems(missing, unexpected, mismatched),
    )


def _key_problems(missing, unexpected, mismatched) -> list[str]:
    labelled = (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", mismatched))
    return [f"{label}: {list_keys(keys)}" for label, keys in labelled if keys]


def check_loading_info(info: dict, path, subfolder: str | None = None, hint: str = "") -> None:
    """Raise CheckpointMismatchError when a diffusers / transformers `from_pretrained(output_loading_info=True)`
    reports missing, unexpected or mis-shaped keys (those loaders only log them and initialise at random)."""
    source = os.path.join(str(path), subfolder) if subfolder else str(path)
    problems = _key_problems(*(info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")))
    raise_problems(f"The checkpoint at {source} does not match the model; it was not used. {hint}".rstrip(), problems)


# --------------------------------------------------------------------------------------------------------------------
# The transformer loader

HUB_DOWNLOAD_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
# Arguments diffusers' pipeline loader passes to every model; they only matter on the delegated path below.
_DELEGATED_ONLY = ("max_memory", "offload_folder", "offload_state_dict")


def load_transformer(
    cls,
    pretrained_model_name_or_path,
    *,
    subfolder: str | None = None,
    dtype: torch.dtype | None = None,
    torch_dtype: torch.dtype | None = None,
    device_map=None,
    quantization_config=None,
    variant: str | None = None,
    use_safetensors: bool | None = None,
    low_cpu_mem_usage: bool = True,
    disable_mmap: bool = False,
    use_flashpack: bool = False,
    output_loading_info: bool = False,
    **kwargs,
):
    """Load an `Ideogram4Transformer2DModel` from a folder or hub id, in the diffusers or original layout.

    Args:
        pretrained_model_name_or_path: a local folder or a hub repo id.
        subfolder: the component folder (`transformer`, `unconditional_transformer`).
        dtype: dtype of the floating-point weights (default float32, like diffusers); `torch_dtype` is its older
            name and is accepted too.
        device_map: a single device (`"cuda"`, `torch.device`) to place the model on; any other device map, or a
            `quantization_config`, goes through diffusers' own loader (diffusers layout only), then is checked.
        variant: load `diffusion_pytorch_model.<variant>.safetensors`.
        cache_dir, revision, token, local_files_only, force_download, proxies: passed to the hub download.
    """
    torch_dtype = resolve_dtype(dtype, torch_dtype)
    hub_kwargs = {k: kwargs.pop(k) for k in HUB_DOWNLOAD_KWARGS if k in kwargs}
    delegated = {k: kwargs.pop(k) for k in _DELEGATED_ONLY if k in kwargs}
    if kwargs:
        raise TypeError(f"{cls.__name__}.from_pretrained got unexpected arguments: {sorted(kwargs)}.")
    if use_safetensors is False:
        raise ValueError("`use_safetensors=False`: this package loads safetensors weights only (never pickle).")
    if use_flashpack:
        raise ValueError("`use_flashpack=True` is not supported for Ideogram 4 transformers; leave it False.")

    folder = resolve_component_folder(pretrained_model_name_or_path, subfolder, **hub_kwargs)
    files = checkpoint_files(folder, variant)
    header = read_header(files)
    config = cls.load_config(folder)
    fp8 = is_fp8_checkpoint(header)

    single_device = (
        device_map is None
        or isinstance(device_map, (torch.device, int))
        or (isinstance(device_map, str) and device_map not in MULTI_DEVICE_MAPS)
    )
    config_quantized = "quantization_config" in config
    if fp8 and (quantization_config is not None or not single_device):
        raise ValueError(
            f"The checkpoint at {folder} is already quantized (fp8 release); drop `quantization_config` / multi-device "
            "`device_map`, or start from a bf16 checkpoint."
        )
    if uses_bitsandbytes(quantization_config) or uses_bitsandbytes(config.get("quantization_config")):
        require_cuda_for_bitsandbytes(str(folder))
    if quantization_config is not None or config_quantized or not single_device:
        return _load_through_diffusers(
            cls,
            folder,
            header,
            torch_dtype=torch_dtype,
            device_map=device_map,
            quantization_config=quantization_config,
            variant=variant,
            disable_mmap=disable_mmap,
            low_cpu_mem_usage=low_cpu_mem_usage,
            output_loading_info=output_loading_info,
            **delegated,
        )

    model = strict_load(
        lambda: cls.from_config(config),
        files,
        header,
        str(folder),
        torch_dtype=torch_dtype,
        key_plan=original_key_plan,
        disable_mmap=disable_mmap,
    )
    if device_map is not None:
        model.to(device_map)
    model.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
    model.eval()
    if output_loading_info:
        return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    return model


def strict_load(
    build_model,
    files: list[Path],
    header: dict,
    source: str,
    *,
    torch_dtype: torch.dtype | None,
    key_plan=None,
    ignore: re.Pattern | None = None,
    disable_mmap: bool = False,
):
    """Build a model on the meta device and fill it from safetensors files, every key consumed exactly once.

    Args:
        build_model: returns the model (called under `init_empty_weights`).
        files, header: the checkpoint files and `read_header(files)`.
        key_plan: maps a checkpoint key and shape to [(model key, row slice or None)]; default: the same key.
        ignore: checkpoint keys to skip entirely (e.g. a vision tower that is never used).
        torch_dtype: dtype of floating weights (default float32); fp8 weights and their scales keep theirs.
    """
    kept = {key: value for key, value in header.items() if not (ignore and ignore.search(key))}
    origin, renamed = rename_keys(kept, key_plan or (lambda key, shape: [(key, None)]), source)
    check_fp8_pairs(renamed, source)
    with init_empty_weights():
        model = build_model()
        # fp8 release: the Linears that come with a per-row scale hold float8 weights (SPEC 2.2).
        replace_linears_with_fp8(model, [key[: -len("_scale")] for key in renamed if key.endswith(SCALE_SUFFIX)])
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    check_keys(expected, {key: shape for key, (_, shape) in renamed.items()}, source)

    targets = {}
    for new_key, (key, rows) in origin.items():
        targets.setdefault(key, []).append((new_key, rows))
    state_dict = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key not in targets:
                    continue
                tensor = handle.get_tensor(key)
                if disable_mmap:
                    tensor = tensor.clone()
                for new_key, rows in targets[key]:
                    part = tensor if rows is None else tensor[rows]
                    state_dict[new_key] = _cast(part, torch_dtype or torch.float32, new_key)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def _cast(tensor: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    """Floating tensors go to `dtype`, except fp8 weights and their float32 scales, which stay as stored."""
    if tensor.is_floating_point() and tensor.dtype != FP8_DTYPE and not key.endswith(SCALE_SUFFIX):
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def resolve_dtype(dtype, torch_dtype):
    """`dtype` (diffusers >= 0.42, transformers 5) or its older name `torch_dtype`; never two that disagree."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"`dtype={dtype}` and `torch_dtype={torch_dtype}` disagree: pass only `dtype`.")
    return torch_dtype if dtype is None else dtype


def uses_bitsandbytes(quantization_config) -> bool:
    """Whether a model's quantization config (an object, a dict, or a backend name) uses bitsandbytes."""
    if quantization_config is None:
        return False
    if isinstance(quantization_config, str):
        method = quantization_config
    elif isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method", "")
    else:
        method = getattr(quantization_config, "quant_method", "")
    return "bitsandbytes" in str(getattr(method, "value", method)).lower()


def require_cuda_for_bitsandbytes(source: str) -> None:
    """nf4 (bitsandbytes) weights run on CUDA only; say so before anything is loaded, and what to use instead."""
    if not torch.cuda.is_available():
        raise ValueError(
            f"{source} is an nf4 (bitsandbytes) checkpoint or quantization, which needs a CUDA GPU, and this machine "
            "has none. Use the fp8 release instead (`ideogram-ai/ideogram-4-fp8`, weight-only, runs on CPU, MPS and "
            "CUDA), or a bf16 checkpoint."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ValueError(f'{source} needs bitsandbytes: `pip install "diffusers-ideogram4[bitsandbytes]"`.') from error


def _load_through_diffusers(cls, folder: Path, header, output_loading_info: bool, **kwargs):
    """Quantized or multi-device loads use diffusers' machinery; the result is still checked key by key."""
    from diffusers.models.modeling_utils import ModelMixin

    if is_original_layout(header):
        raise ValueError(
            f"The checkpoint at {folder} uses the original fused-attention layout, which diffusers' quantized / "
            "device-map loader cannot read. Convert it first: `python conversion/convert_ideogram4_to_diffusers.py "
            "--source SRC --output OUT`, or load it without `quantization_config` / `device_map`."
        )
    config = cls.load_config(folder)
    if "quantization_config" not in config:  # a pre-quantized checkpoint carries its quant state as extra keys
        with init_empty_weights():
            expected = {key: tuple(value.shape) for key, value in cls.from_config(config).state_dict().items()}
        check_keys(expected, {key: shape for key, (_, shape) in header.items()}, str(folder))
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model, info = ModelMixin.from_pretrained.__func__(cls, str(folder), output_loading_info=True, **kwargs)
    check_loading_info(info, folder)
    return (model, info) if output_loading_info else model
