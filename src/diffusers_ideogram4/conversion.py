"""Convert Ideogram 4 checkpoints between the original release layout and the hub's diffusers layout (SPEC 2.1, 2.2).

Plan, then write, then verify, then publish:

1. plan: every component's safetensors header is read and checked against the model built from its config.json
   (meta device) before one byte is written, so a stray, missing or mis-shaped key stops the conversion by name;
2. write: into a hidden temporary folder beside the output, tensor by tensor;
3. verify: each converted transformer is reloaded with `Ideogram4Transformer2DModel.from_pretrained` and compared to
   the source bit for bit, every written file's header is checked, copied files are compared byte for byte;
4. publish: the temporary folder is moved into place with `os.replace`, and only then pushed to the Hub.

An interrupted run leaves at most a `.<name>.partial-*` folder, never a half folder at the output path.
"""

import filecmp
import inspect
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers.utils.logging import get_logger
from diffusers.utils.logging import tqdm as diffusers_tqdm
from huggingface_hub import HfApi
from safetensors import safe_open
from safetensors.torch import save_file

from .fp8 import FP8_DTYPE, SCALE_SUFFIX, dequantize_fp8_weight, replace_linears_with_fp8
from .loading import (
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointMismatchError,
    check_fp8_pairs,
    check_keys,
    checkpoint_files,
    diffusers_to_original,
    locate_tensors,
    original_key_plan,
    read_header,
)
from .pipeline_ideogram4 import OFFICIAL_ENTRIES
from .text_encoder import FP8_CONFIG_FLAG
from .transformer_ideogram4 import Ideogram4Transformer2DModel


logger = get_logger(__name__)

MODEL_INDEX_NAME = "model_index.json"
CONFIG_NAME = "config.json"
MODEL_CARD_NAME = "README.md"
PIPELINE_CLASS_NAME = "Ideogram4Pipeline"
TRANSFORMER_LIBRARY, TRANSFORMER_CLASS_NAME = "diffusers", "Ideogram4Transformer2DModel"
TRANSFORMER_COMPONENTS = ("transformer", "unconditional_transformer")
TEXT_ENCODER_NAME = "text_encoder"
# Sharded diffusers weights: diffusion_pytorch_model-00001-of-00002.safetensors (diffusers' own naming).
SHARD_NAME = "diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"
DEFAULT_MAX_SHARD_SIZE = "10GB"  # diffusers' `save_pretrained` default
# The reverse conversion writes one file per transformer under a name that diffusers' own loader does not pick up:
# a fused-layout file named `diffusion_pytorch_model.safetensors` is exactly what upstream diffusers loads with random
# attention weights and no error (SPEC 2.1). Our loader accepts any single safetensors file.
ORIGINAL_WEIGHTS_NAME = "model.safetensors"
SAFETENSORS_METADATA = {"format": "pt"}
# `--dtype` choices: None keeps every tensor's dtype (fp8 stays fp8 with its scales).
DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp32": torch.float32}
# Top-level files of a source repo that are not carried over: the index is rewritten, the card describes another layout.
SKIPPED_TOP_LEVEL_FILES = (MODEL_INDEX_NAME, MODEL_CARD_NAME, ".gitattributes")
# bitsandbytes serialization (the nf4 release): cannot be re-laid out without bitsandbytes and a GPU.
BNB_KEY_MARKERS = (".absmax", ".quant_map", ".quant_state.", ".nested_absmax", ".nested_quant_map")

# Model cards (model_cards/*.md), filled by `render_model_card`.
DEFAULT_BASE_MODEL = "ideogram-ai/ideogram-4-fp8"  # the reference release on the Hub
LICENSE_NAME = "ideogram-4-non-commercial"
LICENSE_LINK = "https://huggingface.co/ideogram-ai/ideogram-4-fp8/blob/main/LICENSE.md"
NOT_MEASURED = "not measured yet"
_TEMPLATE_VARIABLE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SAFETENSORS_DTYPES = {
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


class ConversionVerificationError(RuntimeError):
    """The written output does not reload to the source tensors; nothing was moved into place or pushed."""


# --------------------------------------------------------------------------------------------------------------------
# Plans: what each output file will hold, computed from headers only


@dataclass(frozen=True)
class SourceSlice:
    """Rows of one source tensor (all rows when `rows` is None)."""

    file: Path
    key: str
    rows: slice | None = None


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its source rows (concatenated along dim 0), its dtype, and an fp8 scale to apply."""

    key: str
    parts: tuple[SourceSlice, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    scale: tuple[SourceSlice, ...] = ()  # dequantize the fp8 parts with these per-row scales

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.dtype.itemsize


@dataclass
class OutputFile:
    """One file of the output folder: a copy, a safetensors file built from tensor plans, or small text."""

    path: str  # relative to the output folder, with `/`
    copy_from: Path | None = None
    tensors: tuple[TensorPlan, ...] | None = None
    text: str | None = None

    @property
    def size(self) -> int:
        if self.copy_from is not None:
            return self.copy_from.stat().st_size
        if self.tensors is not None:
            return sum(t.nbytes for t in self.tensors)  # tensor bytes; the header adds a few KB
        return len(self.text.encode("utf-8"))


@dataclass
class TransformerCheck:
    """How to verify one written transformer: reload it and compare every model tensor to its source."""

    component: str
    expected: dict[str, TensorPlan]  # model state-dict key -> where its value comes from
    load_dtype: torch.dtype


@dataclass
class ConversionPlan:
    direction: str
    source: str
    root: Path
    components: list[str]
    dtype: str
    files: list[OutputFile] = field(default_factory=list)
    checks: list[TransformerCheck] = field(default_factory=list)
    tensor_dtypes: set[str] = field(default_factory=set)  # dtypes of the transformers' written tensors
    notes: list[str] = field(default_factory=list)

    def component_size(self, component: str) -> int:
        return sum(f.size for f in self.files if f.path.startswith(component + "/"))


@dataclass
class ConversionReport:
    """What a conversion wrote (or, with `dry_run`, would write)."""

    direction: str
    source: str
    output: Path
    dtype: str
    components: list[str]
    files: list[tuple[str, int]]
    num_tensors: int
    dry_run: bool
    verified: bool = False
    pushed_to: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def summary(self) -> str:
        verb = "would write" if self.dry_run else "wrote"
        lines = [f"{self.direction}: {self.source} -> {self.output} (dtype {self.dtype})"]
        lines += [f"  {format_size(size):>10}  {path}" for path, size in self.files]
        lines.append(f"{verb} {len(self.files)} files, {self.num_tensors} tensors, {format_size(self.total_bytes)}")
        if self.verified:
            lines.append("verified: every converted transformer reloads to its source tensors, bit for bit")
        if self.pushed_to:
            lines.append(f"pushed to https://huggingface.co/{self.pushed_to}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def parse_size(value: int | str) -> int:
    """'5GB' -> 5_000_000_000, '10MiB' -> 10_485_760, 1000 -> 1000 (bytes)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = value, ""
    else:
        match = _SIZE.match(str(value))
        if match is None or match.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"`max_shard_size={value!r}` is not a size; write it like '5GB', '500MB' or '10MiB'.")
        number, unit = float(match.group(1)), match.group(2).upper()
    size = int(number * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"`max_shard_size={value!r}` must be positive.")
    return size


def format_size(size: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _torch_dtype(name: str) -> torch.dtype:
    if name not in _SAFETENSORS_DTYPES:
        raise ValueError(f"Unsupported safetensors dtype {name}.")
    return _SAFETENSORS_DTYPES[name]


def _rows(shape: tuple[int, ...], rows: slice | None) -> tuple[int, ...]:
    return shape if rows is None else (rows.stop - rows.start, *shape[1:])


def _refuse_bitsandbytes(keys: Iterable[str], config: dict, source: str) -> None:
    bnb = sorted(k for k in keys if any(marker in k for marker in BNB_KEY_MARKERS))
    if bnb or "quantization_config" in config:
        raise ValueError(
            f"{source} is a bitsandbytes (nf4) checkpoint{' (e.g. ' + bnb[0] + ')' if bnb else ''}; it cannot be "
            "re-laid out tensor by tensor. Convert the bf16 or fp8 release instead, then quantize the result."
        )


def _tensor_plan(key, origin, dtype_name, target, scale_origin=None) -> TensorPlan:
    """The output tensor `key` read from `origin` = (file, source key, rows, source shape), stored as `dtype_name`;
    floats cast to `target` (None keeps them); with `scale_origin` (same form) an fp8 weight is dequantized."""
    file, source_key, rows, shape = origin
    stored = _torch_dtype(dtype_name)
    if scale_origin is not None:  # fp8 weight, float output: dequantize
        scale = (SourceSlice(*scale_origin[:3]),)
        return TensorPlan(key, (SourceSlice(file, source_key, rows),), _rows(shape, rows), target, scale)
    dtype = stored
    if target is not None and stored.is_floating_point and stored != FP8_DTYPE and not key.endswith(SCALE_SUFFIX):
        dtype = target
    return TensorPlan(key, (SourceSlice(file, source_key, rows),), _rows(shape, rows), dtype)


def _shard(tensors: list[TensorPlan], max_bytes: int, component: str) -> list[OutputFile]:
    """Group tensors in order into files of at most `max_bytes` (a larger tensor gets a file of its own)."""
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    if len(groups) == 1:
        return [OutputFile(f"{component}/{WEIGHTS_NAME}", tensors=tuple(tensors))]
    names = [SHARD_NAME.format(index=i + 1, count=len(groups)) for i in range(len(groups))]
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors)},
        "weight_map": {t.key: name for name, group in zip(names, groups) for t in group},
    }
    files = [OutputFile(f"{component}/{name}", tensors=tuple(group)) for name, group in zip(names, groups)]
    return files + [OutputFile(f"{component}/{WEIGHTS_INDEX_NAME}", text=json.dumps(index, indent=2) + "\n")]


def _meta_transformer(folder: Path, scaled_weight_keys: list[str]):
    """The model its config.json describes, on the meta device, with fp8 layers where the checkpoint has scales;
    and the config fields that are not model arguments."""
    config = Ideogram4Transformer2DModel.load_config(folder)
    if config.get("_class_name", TRANSFORMER_CLASS_NAME) != TRANSFORMER_CLASS_NAME:
        raise ValueError(
            f"{folder / CONFIG_NAME} describes a `{config['_class_name']}`, not an {TRANSFORMER_CLASS_NAME}."
        )
    with init_empty_weights():
        model = Ideogram4Transformer2DModel.from_config(config)
        replace_linears_with_fp8(model, scaled_weight_keys)
    known = set(inspect.signature(Ideogram4Transformer2DModel.__init__).parameters) | {
        "_class_name",
        "_diffusers_version",
    }
    return model, sorted(k for k in config if k not in known)


def _load_dtype(plans: Iterable[TensorPlan]) -> torch.dtype:
    """The dtype to reload a written transformer in: its float dtype if it has one, else float32 (exact upcast)."""
    floats = {
        p.dtype
        for p in plans
        if p.dtype.is_floating_point and p.dtype != FP8_DTYPE and not p.key.endswith(SCALE_SUFFIX)
    }
    return floats.pop() if len(floats) == 1 else torch.float32


# --------------------------------------------------------------------------------------------------------------------
# Planning the two directions


def _checked_transformer(plan: ConversionPlan, name: str, key_plan):
    """Read a transformer's headers, rename its keys with `key_plan` and check them against the model its config.json
    describes (meta device). Returns (origin: new key -> (file, source key, rows, source shape), renamed: new key ->
    (safetensors dtype, shape), the meta model, config fields it does not take). Reads no tensor."""
    folder = plan.root / name
    located = locate_tensors(checkpoint_files(folder))
    source = str(folder)
    _refuse_bitsandbytes(located, Ideogram4Transformer2DModel.load_config(folder), source)
    origin, renamed = {}, {}
    for key, (file, dtype, shape) in located.items():
        try:
            targets = key_plan(key, shape)
        except CheckpointMismatchError as error:
            raise CheckpointMismatchError(f"{source}: {error} Nothing was written.") from None
        for new_key, rows in targets:
            if new_key in origin:
                raise CheckpointMismatchError(f"`{new_key}` is given twice in {source} (once via `{key}`).")
            origin[new_key] = (file, key, rows, shape)
            renamed[new_key] = (dtype, _rows(shape, rows))
    check_fp8_pairs(renamed, source)
    model, unknown = _meta_transformer(folder, [k[: -len("_scale")] for k in renamed if k.endswith(SCALE_SUFFIX)])
    expected_shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    check_keys(expected_shapes, {k: shape for k, (_, shape) in renamed.items()}, source)
    if unknown:
        plan.notes.append(f"{name}/config.json: fields {unknown} are not {TRANSFORMER_CLASS_NAME} arguments; dropped")
    return origin, renamed, model, unknown


def _same_key(key: str, shape: tuple[int, ...]) -> list[tuple[str, None]]:
    return [(key, None)]


def _plan_transformer_to_diffusers(plan: ConversionPlan, name: str, target, max_bytes: int) -> None:
    # Original-layout keys -> diffusers keys: fused q/k/v (and their fp8 scales) split by rows.
    origin, renamed, model, unknown = _checked_transformer(plan, name, original_key_plan)
    dequantize = target is not None
    tensors = []
    for key in model.state_dict():  # the model's own order: blocks stay together in shards
        if dequantize and key.endswith(SCALE_SUFFIX):
            continue  # consumed with its weight
        dtype_name = renamed[key][0]
        scale = origin[key + "_scale"] if dequantize and dtype_name.startswith("F8") else None
        tensors.append(_tensor_plan(key, origin[key], dtype_name, target, scale))

    plan.files += _shard(tensors, max_bytes, name)
    plan.files.append(OutputFile(f"{name}/{CONFIG_NAME}", text=_transformer_config(model, unknown)))
    plan.checks.append(TransformerCheck(name, {t.key: t for t in tensors}, _load_dtype(tensors)))
    plan.tensor_dtypes |= {str(t.dtype).removeprefix("torch.") for t in tensors}


def _transformer_config(model, unknown: list[str]) -> str:
    """The model's config.json: every argument (defaults filled in), without fields the class does not take."""
    config = json.loads(model.to_json_string())
    for name in ["_name_or_path", *unknown]:
        config.pop(name, None)
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _plan_transformer_to_original(plan: ConversionPlan, name: str, weights_name: str) -> None:
    origin, renamed, model, unknown = _checked_transformer(plan, name, _same_key)
    # The fused keys and shapes come from `diffusers_to_original` run on empty tensors; the rows each fused tensor
    # takes from its parts come from `original_key_plan`, the split it reverses.
    fused = diffusers_to_original({k: torch.empty(shape, device="meta") for k, (_, shape) in renamed.items()})
    tensors, consumed = [], []
    for key, meta in fused.items():
        parts = []
        for split_key, _ in original_key_plan(key, tuple(meta.shape)):
            parts.append(SourceSlice(origin[split_key][0], split_key))
            consumed.append(split_key)
        dtypes = {renamed[p.key][0] for p in parts}
        if len(dtypes) > 1:
            raise CheckpointMismatchError(f"The parts of `{key}` in {name}/ have different dtypes: {sorted(dtypes)}.")
        tensors.append(TensorPlan(key, tuple(parts), tuple(meta.shape), _torch_dtype(dtypes.pop())))
    if sorted(consumed) != sorted(renamed):
        raise CheckpointMismatchError(
            f"Fusing {name}/ would not use every key exactly once: {sorted(set(renamed) ^ set(consumed))}."
        )
    plan.files.append(OutputFile(f"{name}/{weights_name}", tensors=tuple(tensors)))
    plan.files.append(OutputFile(f"{name}/{CONFIG_NAME}", text=_transformer_config(model, unknown)))
    # Verified by reloading the fused file and comparing each model tensor with the source tensor of the same key.
    identity = {key: _tensor_plan(key, origin[key], dtype, None) for key, (dtype, _) in renamed.items()}
    plan.checks.append(TransformerCheck(name, identity, _load_dtype(identity.values())))
    plan.tensor_dtypes |= {str(t.dtype).removeprefix("torch.") for t in tensors}


def _plan_copy(plan: ConversionPlan, name: str, target) -> None:
    """Copy a component byte for byte, except an fp8 text encoder when a float dtype is asked: dequantized."""
    folder = plan.root / name
    if not folder.is_dir():
        raise FileNotFoundError(f"model_index.json lists `{name}`, but {folder} does not exist.")
    config_path = folder / CONFIG_NAME
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    if target is not None and name == TEXT_ENCODER_NAME and config.get(FP8_CONFIG_FLAG):
        _plan_dequantized_text_encoder(plan, folder, name, config, target)
        return
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder))):
        plan.files.append(OutputFile(f"{name}/{path.relative_to(folder).as_posix()}", copy_from=path))


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _plan_dequantized_text_encoder(plan: ConversionPlan, folder: Path, name: str, config: dict, target) -> None:
    """The fp8 text encoder (SPEC 2.2) written in `target`: same files, each float8 weight dequantized with its
    scale, the scales dropped, every other floating tensor cast; config.json loses the fp8 flag."""
    files = checkpoint_files(folder, name="model")
    located = locate_tensors(files)
    header = {key: (dtype, shape) for key, (_, dtype, shape) in located.items()}
    check_fp8_pairs(header, str(folder))
    by_file: dict[Path, list[TensorPlan]] = {file: [] for file in files}
    for key, (file, dtype, shape) in located.items():
        if key.endswith(SCALE_SUFFIX):
            continue  # consumed with its weight
        scale = None
        if dtype.startswith("F8"):
            scale_file, _, scale_shape = located[key + "_scale"]
            scale = (scale_file, key + "_scale", None, scale_shape)
        by_file[file].append(_tensor_plan(key, (file, key, None, shape), dtype, target, scale))
    for file, tensors in by_file.items():
        plan.files.append(OutputFile(f"{name}/{file.name}", tensors=tuple(tensors)))
    index_files = [p for p in folder.glob("*.safetensors.index.json")]
    for index_path in index_files:
        index = json.loads(index_path.read_text())
        index["weight_map"] = {t.key: file.name for file, group in by_file.items() for t in group}
        index.setdefault("metadata", {})["total_size"] = sum(t.nbytes for g in by_file.values() for t in g)
        plan.files.append(OutputFile(f"{name}/{index_path.name}", text=json.dumps(index, indent=2) + "\n"))
    config = {k: v for k, v in config.items() if k != FP8_CONFIG_FLAG}
    for dtype_field in ("dtype", "torch_dtype"):
        if dtype_field in config:
            config[dtype_field] = str(target).removeprefix("torch.")
    plan.files.append(OutputFile(f"{name}/{CONFIG_NAME}", text=json.dumps(config, indent=2, sort_keys=True) + "\n"))
    written = (
        {f"{name}/{file.name}" for file in files}
        | {f"{name}/{p.name}" for p in index_files}
        | {f"{name}/{CONFIG_NAME}"}
    )
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder))):
        relative = f"{name}/{path.relative_to(folder).as_posix()}"
        if relative not in written:
            plan.files.append(OutputFile(relative, copy_from=path))
    plan.notes.append(f"{name}: fp8 weights dequantized to {str(target).removeprefix('torch.')}")


def _read_model_index(root: Path) -> dict:
    path = root / MODEL_INDEX_NAME
    if not path.exists():
        raise FileNotFoundError(f"{root} has no {MODEL_INDEX_NAME}; give the root folder of an Ideogram 4 repo.")
    return json.loads(path.read_text())


def _is_transformer(name: str, entry) -> bool:
    """By class, or by folder name: a transformer named otherwise in model_index.json is still converted."""
    return name in TRANSFORMER_COMPONENTS or (isinstance(entry, (list, tuple)) and entry[1] == TRANSFORMER_CLASS_NAME)


def _select_components(index: dict, components: Iterable[str] | None, source: str) -> list[str]:
    available = [
        k
        for k, v in index.items()
        if not k.startswith("_") and isinstance(v, (list, tuple)) and len(v) == 2 and v[0] is not None
    ]
    if components is None:
        return available
    parts = [components] if isinstance(components, str) else components
    components = [c.strip() for part in parts for c in part.split(",") if c.strip()]
    unknown = sorted(set(components) - set(available))
    if unknown or not components:
        raise ValueError(f"`components` {unknown or components} are not in {source}; it has {available}.")
    return [c for c in available if c in components]  # model_index order


def _output_model_index(index: dict, components: list[str]) -> str:
    """The hub's model_index.json: a plain `_class_name` and the official library/class entries."""
    from diffusers import __version__ as diffusers_version

    result = {"_class_name": PIPELINE_CLASS_NAME, "_diffusers_version": diffusers_version}
    for name in components:
        entry = list(index[name])
        if _is_transformer(name, entry):
            entry = [TRANSFORMER_LIBRARY, TRANSFORMER_CLASS_NAME]
        result[name] = list(OFFICIAL_ENTRIES.get(entry[1], entry))
    return json.dumps(result, indent=2, sort_keys=True) + "\n"


def _top_level_files(plan: ConversionPlan) -> None:
    """Carry a LICENSE and other top-level files over; the index is rewritten and the old card dropped."""
    for path in sorted(p for p in plan.root.iterdir() if p.is_file()):
        if path.name not in SKIPPED_TOP_LEVEL_FILES and not path.name.startswith("."):
            plan.files.append(OutputFile(path.name, copy_from=path))


def resolve_source(
    source, components: Iterable[str] | None = None, revision: str | None = None, token: str | None = None
) -> Path:
    """A local folder, or a hub repo id downloaded with `huggingface_hub.snapshot_download`."""
    path = Path(source)
    if path.is_dir():
        return path
    if not _REPO_ID.match(str(source)):
        raise FileNotFoundError(f"`source={source!r}` is neither a folder nor a hub repo id (`owner/name`).")
    from huggingface_hub import snapshot_download

    patterns = None
    if components is not None:
        names = [c for part in ([components] if isinstance(components, str) else components) for c in part.split(",")]
        patterns = ["*.json", "*.md", "LICENSE*"] + [f"{c.strip()}/*" for c in names if c.strip()]
    return Path(snapshot_download(str(source), revision=revision, token=token, allow_patterns=patterns))


def plan_original_to_diffusers(
    root: Path, source: str, dtype: str = "keep", components=None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> ConversionPlan:
    """Check every component's header against its model and list the files to write; reads no tensor."""
    if dtype not in DTYPES:
        raise ValueError(f"`dtype={dtype!r}` is not supported; use one of {list(DTYPES)}.")
    target, max_bytes = DTYPES[dtype], parse_size(max_shard_size)
    index = _read_model_index(root)
    selected = _select_components(index, components, source)
    plan = ConversionPlan("original -> diffusers", source, root, selected, dtype)
    for name in selected:
        if _is_transformer(name, index[name]):
            _plan_transformer_to_diffusers(plan, name, target, max_bytes)
        else:
            _plan_copy(plan, name, target)
    _top_level_files(plan)
    plan.files.append(OutputFile(MODEL_INDEX_NAME, text=_output_model_index(index, selected)))
    return plan


def plan_diffusers_to_original(
    root: Path, source: str, components=None, weights_name: str = ORIGINAL_WEIGHTS_NAME
) -> ConversionPlan:
    """Like `plan_original_to_diffusers`, the other way: one fused-attention file per transformer, bit-exact."""
    if not weights_name.endswith(".safetensors") or "/" in weights_name:
        raise ValueError(f"`weights_name={weights_name!r}` must be a plain `*.safetensors` file name.")
    index = _read_model_index(root)
    selected = _select_components(index, components, source)
    plan = ConversionPlan("diffusers -> original", source, root, selected, "keep")
    for name in selected:
        if _is_transformer(name, index[name]):
            _plan_transformer_to_original(plan, name, weights_name)
        else:
            _plan_copy(plan, name, None)
    _top_level_files(plan)
    plan.files.append(OutputFile(MODEL_INDEX_NAME, text=_output_model_index(index, selected)))
    return plan


# --------------------------------------------------------------------------------------------------------------------
# Writing and verifying


class _Reader:
    """Open safetensors files on demand, each once, for the life of a `with` block."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._handles = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _read(self, part: SourceSlice) -> torch.Tensor:
        if part.file not in self._handles:
            self._handles[part.file] = self._stack.enter_context(safe_open(str(part.file), framework="pt"))
        handle = self._handles[part.file]
        if part.rows is None:
            return handle.get_tensor(part.key)
        return handle.get_slice(part.key)[part.rows.start : part.rows.stop]  # only these rows are read

    def tensor(self, plan: TensorPlan) -> torch.Tensor:
        """The value of one planned output tensor."""
        parts = [self._read(part) for part in plan.parts]
        value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if plan.scale:
            scales = [self._read(part) for part in plan.scale]
            scale = scales[0] if len(scales) == 1 else torch.cat(scales, dim=0)
            value = dequantize_fp8_weight(value, scale, plan.dtype)
        return value.to(plan.dtype).contiguous()


def _write(plan: ConversionPlan, staging: Path, progress: bool) -> None:
    num_tensors = sum(len(f.tensors) for f in plan.files if f.tensors is not None)
    bar = diffusers_tqdm(total=num_tensors, unit="tensor", desc="Writing tensors", disable=not progress)
    with bar, _Reader() as reader:
        # Weights first, model_index.json last: a folder without it is never mistaken for a pipeline.
        for file in sorted(plan.files, key=lambda f: f.path == MODEL_INDEX_NAME):
            target = staging / file.path
            target.parent.mkdir(parents=True, exist_ok=True)
            if file.copy_from is not None:
                shutil.copyfile(file.copy_from, target)
            elif file.tensors is not None:
                tensors = {}
                for tensor in file.tensors:
                    tensors[tensor.key] = reader.tensor(tensor)
                    bar.update(1)
                save_file(tensors, str(target), metadata=SAFETENSORS_METADATA)
                del tensors
            else:
                target.write_text(file.text, encoding="utf-8")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def verify_output(plan: ConversionPlan, folder: Path) -> None:
    """Check a written folder against its plan; raise ConversionVerificationError naming every difference.

    Every converted transformer is reloaded with `Ideogram4Transformer2DModel.from_pretrained` and each tensor compared
    bit for bit with its source; other rewritten tensors are read back and compared; copies are compared byte for
    byte; every safetensors header must hold exactly the planned keys, dtypes and shapes.
    """
    problems = []
    written = {f.path for f in plan.files}
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    if found != written:
        problems.append(f"files differ from the plan: {sorted(found ^ written)}")
    for file in plan.files:
        path = folder / file.path
        if not path.exists():
            continue
        if file.copy_from is not None and not filecmp.cmp(file.copy_from, path, shallow=False):
            problems.append(f"{file.path} differs from {file.copy_from}")
        elif file.tensors is not None:
            header = read_header([path])
            planned = {t.key: (str(t.dtype), t.shape) for t in file.tensors}
            got = {k: (str(_torch_dtype(d)), tuple(s)) for k, (d, s) in header.items()}
            if got != planned:
                bad = sorted(k for k in set(got) | set(planned) if got.get(k) != planned.get(k))
                problems.append(f"{file.path}: keys, dtypes or shapes differ from the plan: {bad[:12]}")
    if not problems:
        with _Reader() as reader:
            for check in plan.checks:
                problems += _verify_transformer(check, folder, reader)
            # Rewritten tensors outside the transformers (a dequantized text encoder): compared file by file.
            checked = {check.component for check in plan.checks}
            for file in plan.files:
                if file.tensors is None or file.path.split("/")[0] in checked:
                    continue
                with safe_open(str(folder / file.path), framework="pt") as handle:
                    problems += [
                        f"{file.path}: `{t.key}` differs from its source value"
                        for t in file.tensors
                        if not _same_bits(handle.get_tensor(t.key), reader.tensor(t))
                    ]
    if problems:
        raise ConversionVerificationError(
            "The converted output does not match its source; nothing was moved into place or pushed.\n  - "
            + "\n  - ".join(problems)
        )


def _verify_transformer(check: TransformerCheck, folder: Path, reader: _Reader) -> list[str]:
    model = Ideogram4Transformer2DModel.from_pretrained(folder / check.component, dtype=check.load_dtype)
    state = model.state_dict()
    problems = []
    if set(state) != set(check.expected):
        problems.append(f"{check.component}: reloaded keys differ: {sorted(set(state) ^ set(check.expected))[:12]}")
    for key, expected_plan in check.expected.items():
        if key not in state:
            continue
        expected = reader.tensor(expected_plan)
        if expected.is_floating_point() and expected.dtype != FP8_DTYPE and not key.endswith(SCALE_SUFFIX):
            expected = expected.to(check.load_dtype)
        if not _same_bits(state[key], expected):
            problems.append(f"{check.component}: `{key}` does not reload to its source value")
    return problems


def _publish(staging: Path, output: Path, overwrite: bool) -> None:
    """Move the finished folder into place; an existing output (with `overwrite`) is swapped out, then deleted."""
    if not output.exists():
        os.replace(staging, output)
        return
    if not overwrite or not output.is_dir():
        raise FileExistsError(f"{output} exists; pass `overwrite=True` (`--overwrite`) to replace it.")
    old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(output, old)
    os.replace(staging, output)
    shutil.rmtree(old)


def _check_output(output, overwrite: bool) -> Path:
    output = Path(output).absolute()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass `overwrite=True` (`--overwrite`) to replace it.")
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a folder; remove it or choose another output.")
    return output


def _execute(plan: ConversionPlan, output, *, dry_run, overwrite, verify, progress) -> ConversionReport:
    output = _check_output(output, overwrite)
    files = sorted(plan.files, key=lambda f: f.path)
    report = ConversionReport(
        plan.direction,
        plan.source,
        output,
        plan.dtype,
        plan.components,
        [(f.path, f.size) for f in files],
        num_tensors=sum(len(f.tensors) for f in files if f.tensors is not None),
        dry_run=dry_run,
        notes=plan.notes,
    )
    if dry_run:
        return report
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output folder gets the usual permissions
    try:
        _write(plan, staging, progress)
        if verify:
            verify_output(plan, staging)
            report.verified = True
        report.files = [(f.path, (staging / f.path).stat().st_size) for f in files]
        _publish(staging, output, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


# --------------------------------------------------------------------------------------------------------------------
# Model cards and the Hub


def render_model_card(template: str, variables: dict[str, object]) -> str:
    """Fill every `{{ name }}` of a template; a name without a value raises, naming all of them. The result's YAML
    front matter is parsed the way the Hub does (`huggingface_hub.ModelCard`), so a broken card fails here."""
    from huggingface_hub import ModelCard

    missing = sorted({name for name in _TEMPLATE_VARIABLE.findall(template) if name not in variables})
    if missing:
        raise KeyError(f"The model card template needs values for {missing}.")
    rendered = _TEMPLATE_VARIABLE.sub(lambda m: str(variables[m.group(1)]), template)
    if not rendered.startswith("---\n"):
        raise ValueError("A model card must start with YAML front matter between `---` lines.")
    ModelCard(rendered, ignore_metadata_errors=False)
    return rendered


def model_card_variables(
    *,
    source: str,
    dtype: str,
    component_sizes: dict[str, int],
    repo_id: str | None = None,
    base_model: str | None = None,
    **overrides,
) -> dict[str, str]:
    """The values the templates in model_cards/ use; `overrides` (measured numbers, LoRA details) add or win.

    Args:
        source: where the weights came from (hub id or folder).
        dtype: the weights' dtype, in words (`"bfloat16"`).
        component_sizes: bytes on disk per component, for the size table.
        repo_id: the hub repo the card is for.
        base_model: hub id for `base_model` (default: `source` when it is a hub id, else the reference release).
    """
    from diffusers import __version__ as diffusers_version

    from . import __version__

    if base_model is None:
        base_model = source if _REPO_ID.match(source) and not Path(source).exists() else DEFAULT_BASE_MODEL
    for name, value in (("repo_id", repo_id), ("base_model", base_model)):
        if value is not None and not _REPO_ID.match(value):
            raise ValueError(f"`{name}={value!r}` is not a hub repo id (`owner/name`).")
    total = sum(component_sizes.values())
    rows = [f"| `{name}` | {format_size(size)} |" for name, size in component_sizes.items()]
    variables = {
        "repo_id": repo_id or "<your-name>/<repo>",
        "base_model": base_model,
        "source": source,
        "dtype": dtype,
        "components": ", ".join(f"`{name}`" for name in component_sizes),
        "sizes_table": "\n".join(rows + [f"| total | {format_size(total)} |"]),
        "total_size": format_size(total),
        "date": datetime.now(timezone.utc).date().isoformat(),
        "package_version": __version__,
        "diffusers_version": diffusers_version,
        "license_name": LICENSE_NAME,
        "license_link": LICENSE_LINK,
        "peak_memory": NOT_MEASURED,
        "seconds_per_step": NOT_MEASURED,
    }
    variables.update({k: str(v) for k, v in overrides.items()})
    return variables


def folder_sizes(folder) -> dict[str, int]:
    """Bytes on disk per top-level entry of a folder (a component folder, or a file such as an adapter)."""
    folder = Path(folder)
    sizes = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name == MODEL_CARD_NAME:
            continue
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        sizes[entry.name] = sum(p.stat().st_size for p in files)
    return sizes


def _dtype_words(plan: ConversionPlan) -> str:
    """`bfloat16`, or with `dtype="keep"` the dtypes found in the transformers (`bfloat16, float32, float8_e4m3fn`)."""
    if plan.dtype != "keep":
        return str(DTYPES[plan.dtype]).removeprefix("torch.")
    return ", ".join(sorted(plan.tensor_dtypes)) or "as in the source"


def push_to_hub(
    report: ConversionReport,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Create the repo if needed and upload the verified output folder; returns the repo id."""
    if not report.verified or report.dry_run:
        raise ConversionVerificationError(
            f"{report.output} was not verified against its source; it is not pushed. Convert without `verify=False`."
        )
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"`repo_id={repo_id!r}` is not a hub repo id (`owner/name`).")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(report.output),
        repo_id=repo_id,
        commit_message=commit_message or f"Ideogram 4 in the diffusers layout ({report.dtype}), from {report.source}",
    )
    report.pushed_to = repo_id
    return repo_id


# --------------------------------------------------------------------------------------------------------------------
# The two conversions


def convert_original_to_diffusers(
    source,
    output,
    *,
    dtype: str = "keep",
    components: Iterable[str] | str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    model_card: str | os.PathLike | None = None,
    card_variables: dict | None = None,
    base_model: str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    verify: bool = True,
    push_to_hub_id: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    progress: bool = True,
) -> ConversionReport:
    """Convert a repo in the original release layout into the hub's diffusers layout.

    Args:
        source: a local folder or a hub repo id with model_index.json, `transformer/`, `unconditional_transformer/`
            (fused `attention.qkv` / `attention.o`, one file or sharded with an index) and the other components.
        output: the folder to create. It appears only once complete and verified.
        dtype: `"keep"` (every tensor as stored; fp8 stays fp8 with its scales), `"bf16"` or `"fp32"` (transformer
            weights cast; fp8 weights of the transformers and of an fp8 text encoder dequantized). The other
            components are copied byte for byte.
        components: a subset of model_index.json's components (list or comma-separated string); default all.
        max_shard_size: shard a transformer's weights above this size (`"5GB"`, `"10MB"`, bytes).
        model_card: a template from model_cards/ to render into README.md; `card_variables` add or override values.
        base_model: the hub id in the card's `base_model` (default: the source when it is a hub id, else the release).
        dry_run: plan and check everything, write nothing; the report lists the files and sizes.
        overwrite: replace an existing `output` (swapped out only after the new folder is complete).
        verify: reload every converted transformer and compare it to the source before moving the folder into place.
        push_to_hub_id: upload the verified folder to this hub repo (created if needed, `private` if asked).
    """
    # Every argument is checked before anything is downloaded or written.
    if push_to_hub_id is not None and not verify:
        raise ValueError("`push_to_hub_id` needs `verify=True`: only a folder checked against its source is pushed.")
    if push_to_hub_id is not None and not _REPO_ID.match(push_to_hub_id):
        raise ValueError(f"`push_to_hub_id={push_to_hub_id!r}` is not a hub repo id (`owner/name`).")
    if dtype not in DTYPES:
        raise ValueError(f"`dtype={dtype!r}` is not supported; use one of {list(DTYPES)}.")
    parse_size(max_shard_size)
    if model_card is not None and not Path(model_card).is_file():
        raise FileNotFoundError(f"`model_card={str(model_card)!r}` is not a file; pass a template from model_cards/.")
    _check_output(output, overwrite)
    root = resolve_source(source, components, revision=revision, token=token)
    plan = plan_original_to_diffusers(root, str(source), dtype, components, max_shard_size)
    if model_card is not None:
        variables = model_card_variables(
            source=plan.source,
            dtype=_dtype_words(plan),
            repo_id=push_to_hub_id,
            base_model=base_model,
            component_sizes={c: plan.component_size(c) for c in plan.components},
            **(card_variables or {}),
        )
        card = render_model_card(Path(model_card).read_text(encoding="utf-8"), variables)
        plan.files.append(OutputFile(MODEL_CARD_NAME, text=card))
    report = _execute(plan, output, dry_run=dry_run, overwrite=overwrite, verify=verify, progress=progress)
    if push_to_hub_id is not None and not dry_run:
        push_to_hub(report, push_to_hub_id, private=private, commit_message=commit_message, token=token)
    return report


def convert_diffusers_to_original(
    source,
    output,
    *,
    components: Iterable[str] | str | None = None,
    weights_name: str = ORIGINAL_WEIGHTS_NAME,
    dry_run: bool = False,
    overwrite: bool = False,
    verify: bool = True,
    revision: str | None = None,
    token: str | None = None,
    progress: bool = True,
) -> ConversionReport:
    """Convert a diffusers-layout repo back to the original fused layout, one `weights_name` file per transformer.

    Every tensor is copied bit for bit (q/k/v rows concatenated in that order, fp8 scales likewise), so
    original -> diffusers -> original reproduces the source tensors exactly. The other components are copied.
    """
    _check_output(output, overwrite)
    root = resolve_source(source, components, revision=revision, token=token)
    plan = plan_diffusers_to_original(root, str(source), components, weights_name)
    return _execute(plan, output, dry_run=dry_run, overwrite=overwrite, verify=verify, progress=progress)
