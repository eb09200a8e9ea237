"""Strict checkpoint loading for the Ideogram 4 transformer, in either key layout (SPEC 2.1).

Every key of the checkpoint is consumed exactly once. The key names and shapes are read from the safetensors
headers and checked against the model before a single tensor is read, so a wrong checkpoint fails fast, by name,
and can never leave randomly initialised weights behind.
"""

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
# Original-release keys that the diffusers layout stores differently; every other key is shared.
FUSED_QKV_SUFFIX = "attention.qkv.weight"
FUSED_OUT_SUFFIX = "attention.o.weight"
SPLIT_QKV_SUFFIXES = ("attention.to_q.weight", "attention.to_k.weight", "attention.to_v.weight")
SPLIT_OUT_SUFFIX = "attention.to_out.0.weight"
# Keys that mark the quantized releases (SPEC 2.2).
FP8_SCALE_SUFFIX = ".weight_scale"
BNB_STATE_MARKERS = (".absmax", ".quant_map", ".quant_state.")
# How many offending keys an error message lists before it summarises.
MAX_KEYS_IN_MESSAGE = 12


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the model it is loaded into."""


# --------------------------------------------------------------------------------------------------------------------
# Key layouts


def is_original_layout(keys: Iterable[str]) -> bool:
    """True when the keys use the original release's fused attention (`attention.qkv` / `attention.o`)."""
    return any(key.endswith(FUSED_QKV_SUFFIX) or key.endswith(FUSED_OUT_SUFFIX) for key in keys)


def original_key_plan(key: str, shape: tuple[int, ...]) -> list[tuple[str, slice | None]]:
    """Where one original-layout tensor goes in the diffusers layout: a list of (new key, row slice or None)."""
    if key.endswith(FUSED_QKV_SUFFIX):
        prefix = key[: -len(FUSED_QKV_SUFFIX)]
        if len(shape) != 2 or shape[0] % 3:
            raise CheckpointMismatchError(
                f"`{key}` has shape {list(shape)}; a fused q/k/v weight needs 3 * hidden rows (contiguous [q; k; v])."
            )
        rows = shape[0] // 3
        return [(prefix + suffix, slice(i * rows, (i + 1) * rows)) for i, suffix in enumerate(SPLIT_QKV_SUFFIXES)]
    if key.endswith(FUSED_OUT_SUFFIX):
        return [(key[: -len(FUSED_OUT_SUFFIX)] + SPLIT_OUT_SUFFIX, None)]
    return [(key, None)]


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
        if key.endswith(SPLIT_OUT_SUFFIX):
            converted[key[: -len(SPLIT_OUT_SUFFIX)] + FUSED_OUT_SUFFIX] = tensor
        elif key.endswith(SPLIT_QKV_SUFFIXES[0]):
            prefix = key[: -len(SPLIT_QKV_SUFFIXES[0])]
            parts = [state_dict[prefix + suffix] for suffix in SPLIT_QKV_SUFFIXES]
            converted[prefix + FUSED_QKV_SUFFIX] = torch.cat(parts, dim=0)
        elif not key.endswith(SPLIT_QKV_SUFFIXES[1:]):
            converted[key] = tensor
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


def checkpoint_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors files of one component: the diffusers names, an index, or a single original-release file."""
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
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


def read_header(files: list[Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Key -> (safetensors dtype, shape) of every tensor in the files, without reading any tensor."""
    header = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key in header:
                    raise CheckpointMismatchError(f"`{key}` appears in more than one shard (again in {file.name}).")
                view = handle.get_slice(key)
                header[key] = (view.get_dtype(), tuple(view.get_shape()))
    return header


def _listing(keys: list) -> str:
    shown = ", ".join(str(k) for k in keys[:MAX_KEYS_IN_MESSAGE])
    more = len(keys) - MAX_KEYS_IN_MESSAGE
    return shown + (f" and {more} more" if more > 0 else "")


def check_keys(
    expected: dict[str, tuple[int, ...]], provided: dict[str, tuple[int, ...]], source: str
) -> None:
    """Raise CheckpointMismatchError naming every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(provided))
    unexpected = sorted(set(provided) - set(expected))
    mismatched = sorted(
        f"{key} (checkpoint {list(provided[key])}, model {list(expected[key])})"
        for key in set(expected) & set(provided)
        if tuple(provided[key]) != tuple(expected[key])
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"mis-shaped keys: {_listing(mismatched)}")
    if problems:
        raise CheckpointMismatchError(
            f"The checkpoint at {source} does not match the model config; nothing was loaded.\n  - "
            + "\n  - ".join(problems)
            + "\nCheck that the checkpoint and config.json belong together (and that this is an Ideogram 4 "
            "transformer checkpoint)."
        )


# --------------------------------------------------------------------------------------------------------------------
# The transformer loader

_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
# Arguments diffusers' pipeline loader passes to every model; they only matter on the delegated path below.
_DELEGATED_ONLY = ("max_memory", "offload_folder", "offload_state_dict")


def _quantized_release_error(header_keys, source: str) -> None:
    if any(key.endswith(FP8_SCALE_SUFFIX) for key in header_keys):
        raise ValueError(
            f"The checkpoint at {source} is in the fp8 release format (`*.weight_scale` keys). Loading it is not "
            "supported yet by this version of diffusers-ideogram4; use the bf16 or nf4 release."
        )


def load_transformer(
    cls,
    pretrained_model_name_or_path,
    *,
    subfolder: str | None = None,
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
        torch_dtype: dtype of the floating-point weights (default float32, like diffusers).
        device_map: a single device (`"cuda"`, `torch.device`) to place the model on; any other device map, or a
            `quantization_config`, goes through diffusers' own loader (diffusers layout only), then is checked.
        variant: load `diffusion_pytorch_model.<variant>.safetensors`.
        cache_dir, revision, token, local_files_only, force_download, proxies: passed to the hub download.
    """
    hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
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
    _quantized_release_error(header, str(folder))

    single_device = device_map is None or isinstance(device_map, (torch.device, int)) or (
        isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential")
    )
    config_quantized = "quantization_config" in config
    if quantization_config is not None or config_quantized or not single_device:
        return _load_through_diffusers(
            cls, folder, header, torch_dtype=torch_dtype, device_map=device_map,
            quantization_config=quantization_config, variant=variant, disable_mmap=disable_mmap,
            low_cpu_mem_usage=low_cpu_mem_usage, output_loading_info=output_loading_info, **delegated,
        )

    with init_empty_weights():
        model = cls.from_config(config)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    plans = {key: original_key_plan(key, shape) for key, (_, shape) in header.items()}
    provided = {}
    for key, plan in plans.items():
        shape = header[key][1]
        for new_key, rows in plan:
            if new_key in provided:
                raise CheckpointMismatchError(f"`{new_key}` is given twice in {folder} (once via `{key}`).")
            provided[new_key] = shape if rows is None else (rows.stop - rows.start, *shape[1:])
    check_keys(expected, provided, str(folder))

    state_dict = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if disable_mmap:
                    tensor = tensor.clone()
                for new_key, rows in plans[key]:
                    part = tensor if rows is None else tensor[rows]
                    state_dict[new_key] = _cast(part, torch_dtype or torch.float32)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if device_map is not None:
        model.to(device_map)
    model.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
    model.eval()
    if output_loading_info:
        return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    return model


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return tensor.contiguous()


def _load_through_diffusers(cls, folder: Path, header, output_loading_info: bool, **kwargs):
    """Quantized or multi-device loads use diffusers' machinery; the result is still checked key by key."""
    from diffusers.models.modeling_utils import ModelMixin

    if is_original_layout(header):
        raise ValueError(
            f"The checkpoint at {folder} uses the original fused-attention layout, which diffusers' quantized / "
            "device-map loader cannot read. Convert it first: `python conversion/convert_ideogram4_to_diffusers.py "
            "--source SRC --output OUT`, or load it without `quantization_config` / `device_map`."
        )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model, info = ModelMixin.from_pretrained.__func__(cls, str(folder), output_loading_info=True, **kwargs)
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if problems:
        raise CheckpointMismatchError(f"The checkpoint at {folder} does not match the model: {problems}.")
    return (model, info) if output_loading_info else model
