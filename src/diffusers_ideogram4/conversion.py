"""Convert Ideogram 4 checkpoints between the original release layout and the hub's diffusers layout (SPEC 2.1, 2.2).

Check, write, verify, publish:

1. check: every transformer's safetensors header is renamed with the one rename table (`loading.original_key_plan`)
   and checked against the model its config.json describes, on the meta device, before a byte is written;
2. write: into a hidden staging folder beside the output, one file at a time, reading only the tensors of that file
   (sharding and the index as `huggingface_hub` splits them);
3. verify: each converted transformer is reloaded with `Ideogram4Transformer2DModel.from_pretrained` and compared with
   its source bit for bit; other rewritten tensors are read back; copies are compared byte for byte;
4. publish: the staging folder is moved into place with `os.replace`, and only then pushed to the Hub.

An interrupted run leaves at most a `.<name>.partial-*` folder, never a half folder at the output path.
"""

import ctypes
import errno
import filecmp
import inspect
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
from diffusers import __version__ as DIFFUSERS_VERSION
from diffusers.utils.logging import tqdm as diffusers_tqdm
from huggingface_hub import HfApi, split_torch_state_dict_into_shards
from huggingface_hub.serialization._base import parse_size_to_int
from safetensors.torch import save_file

from .constants import OFFICIAL_ENTRIES
from .fp8 import SCALE_SUFFIX, dequantize_fp8_weight, is_fp8_checkpoint, keeps_stored_dtype
from .layout import reference_latent_norm, variance_for_scale
from .loading import (
    REPO_ID,
    SAFETENSORS_DTYPES,
    STORED_NAMES,
    CheckpointMismatchError,
    check_fp8_pairs,
    check_header,
    checkpoint_files,
    fused_groups,
    list_keys,
    locate_tensors,
    open_safetensors,
    original_key_plan,
    raise_problems,
    read_header,
)
from .text_encoder import FP8_CONFIG_FLAG
from .transformer_ideogram4 import Ideogram4Transformer2DModel


MODEL_INDEX_NAME, CONFIG_NAME, MODEL_CARD_NAME = "model_index.json", "config.json", "README.md"
PIPELINE_CLASS_NAME = "Ideogram4Pipeline"
TRANSFORMER_CLASS_NAME = "Ideogram4Transformer2DModel"
TRANSFORMER_COMPONENTS = ("transformer", "unconditional_transformer")
TEXT_ENCODER_NAME = "text_encoder"
# diffusers' weight file names: diffusion_pytorch_model[-00001-of-00002].safetensors and its index.
WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "10GB"  # diffusers' `save_pretrained` default
# The reverse conversion writes one file per transformer under a name that diffusers' own loader does not pick up:
# a fused-layout file named `diffusion_pytorch_model.safetensors` is exactly what upstream diffusers loads with random
# attention weights and no error (SPEC 2.1). Our loader accepts any single safetensors file.
ORIGINAL_WEIGHTS_NAME = "model.safetensors"
SAFETENSORS_METADATA = {"format": "pt"}
# Written into every output's model_index.json (diffusers ignores `_`-keys): what makes an existing folder recognisably
# one of ours, which `overwrite` may replace.
CONVERSION_MARKER = "_diffusers_ideogram4_conversion"
# The fields of the config.json written for a transformer: its class's arguments, and diffusers' own.
TRANSFORMER_CONFIG_FIELDS = {
    *inspect.signature(Ideogram4Transformer2DModel.__init__).parameters,
    "_class_name",
    "_diffusers_version",
}
# The float dtypes written tensors are cast or dequantized to (the converters' and the extractor's `--dtype`).
WRITTEN_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# `--dtype` choices: None keeps every tensor's dtype (fp8 stays fp8 with its scales).
DTYPES = {"keep": None, **WRITTEN_DTYPES}
# `--vae-bn` choices: copy the VAE as it is, or write the reference release's latent normalisation into its `bn`.
VAE_BN_CHOICES = ("keep", "reference")
VAE_NAME = "vae"
# Top-level files of a source repo that are not carried over: the index is rewritten, the card describes another layout.
SKIPPED_TOP_LEVEL_FILES = (MODEL_INDEX_NAME, MODEL_CARD_NAME, ".gitattributes")
# bitsandbytes serialization (the nf4 release): cannot be re-laid out without bitsandbytes and a GPU.
BNB_KEY_MARKERS = (".absmax", ".quant_map", ".quant_state.", ".nested_absmax", ".nested_quant_map")
# Model cards (model_cards/*.md), filled by `render_model_card`.
DEFAULT_BASE_MODEL = "ideogram-ai/ideogram-4-fp8"  # the reference release on the Hub
LICENSE_NAME = "ideogram-4-non-commercial"
LICENSE_LINK = "https://huggingface.co/ideogram-ai/ideogram-4-fp8/blob/main/LICENSE.md"
NOT_MEASURED = "not measured yet"
_BINARY_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT])iB\s*$", re.IGNORECASE)


class ConversionVerificationError(RuntimeError):
    """The written output does not reload to the source tensors; nothing was moved into place or pushed."""


# --------------------------------------------------------------------------------------------------------------------
# Plans: what each output file will hold, computed from headers only


@dataclass(frozen=True)
class Recipe:
    """One output tensor: source rows `(file, key, rows or None)` concatenated along dim 0, stored as `dtype`; with
    `scale` (same form), fp8 source rows dequantized with those per-row scales; or the tensor `compute()` returns when
    it is written (a given value, or a weight dequantized from a loaded model, one at a time)."""

    key: str
    parts: tuple[tuple[Path, str, slice | None], ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    scale: tuple[Path, str, slice | None] | None = None
    compute: Callable[[], torch.Tensor] | None = field(default=None, compare=False)

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


@dataclass
class OutputFile:
    """One file of the output folder: a copy, a safetensors file built from recipes, or small text."""

    path: str  # relative to the output folder, with `/`
    copy_from: Path | None = None
    tensors: tuple[Recipe, ...] | None = None
    text: str | None = None

    @property
    def size(self) -> int:
        if self.copy_from is not None:
            return self.copy_from.stat().st_size
        if self.tensors is not None:
            return sum(t.nbytes for t in self.tensors)  # tensor bytes; the header adds a few KB
        return len(self.text.encode("utf-8"))


@dataclass
class ConversionPlan:
    direction: str
    source: str
    root: Path | None  # the source folder (None: single files only)
    components: list[str]
    dtype: str
    files: list[OutputFile] = field(default_factory=list)
    # transformer -> (model key -> the recipe of its source value, dtype to reload it in)
    checks: dict[str, tuple[dict[str, Recipe], torch.dtype]] = field(default_factory=dict)
    tensor_dtypes: set[str] = field(default_factory=set)  # dtypes of the transformers' written tensors
    notes: list[str] = field(default_factory=list)

    def add_transformer(self, name: str, weights: list[OutputFile], config: str, expected: dict[str, Recipe]) -> None:
        """A converted transformer's weight files and config.json, and the recipe of each value it must reload to."""
        self.files += [*weights, OutputFile(f"{name}/{CONFIG_NAME}", text=config)]
        self.checks[name] = (expected, _load_dtype(expected.values()))
        self.tensor_dtypes |= {str(r.dtype).removeprefix("torch.") for f in weights for r in f.tensors or ()}


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
    """Bytes: an int, huggingface_hub's decimal units ('5GB' -> 5_000_000_000), or binary ones ('10MiB')."""
    binary = _BINARY_SIZE.match(str(value))
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            size = value
        elif binary:
            size = int(float(binary[1]) * 1024 ** (1 + "KMGT".index(binary[2].upper())))
        else:
            size = parse_size_to_int(str(value).strip().upper())
    except ValueError:
        size = 0
    if size <= 0:
        raise ValueError(
            f"`max_shard_size={value!r}` is not a size; write it like '5GB', '500MB' or '10MiB' (a positive size)."
        )
    return size


def json_text(value, sort_keys: bool = True) -> str:
    """A JSON file's text as every conversion writes it: indented by 2, a newline at the end."""
    return json.dumps(value, indent=2, sort_keys=sort_keys) + "\n"


def format_size(size: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _sharded(recipes: list[Recipe], max_bytes: int, component: str) -> list[OutputFile]:
    """diffusers' file names, split by `huggingface_hub` (a larger tensor gets a file of its own), and the index."""
    meta = {r.key: torch.empty(r.shape, dtype=r.dtype, device="meta") for r in recipes}
    split = split_torch_state_dict_into_shards(meta, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_bytes)
    by_key = {r.key: r for r in recipes}
    files = [
        OutputFile(f"{component}/{name}", tensors=tuple(by_key[key] for key in keys))
        for name, keys in split.filename_to_tensors.items()
    ]
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        files.append(OutputFile(f"{component}/{WEIGHTS_INDEX_NAME}", text=json_text(index, sort_keys=False)))
    return files


# --------------------------------------------------------------------------------------------------------------------
# Planning


def _checked_transformer(plan: ConversionPlan, name: str, key_plan) -> tuple[dict[str, Recipe], str]:
    """Check a transformer's header against the model its config.json describes (strictly, reading no tensor) ->
    (model key -> recipe of its value as stored, the model's config.json text)."""
    folder = plan.root / name
    weights = checkpoint_files(folder)
    located = locate_tensors(weights)
    config = Ideogram4Transformer2DModel.load_config(folder)
    index = [p.name for p in folder.glob("*.safetensors.index.json")]
    others = sorted({p.name for p in folder.iterdir()} - {p.name for p in weights} - {CONFIG_NAME, *index})
    if others:
        plan.notes.append(f"{name}/: not part of the checkpoint, not carried over: {others}")
    bnb = sorted(key for key in located if any(marker in key for marker in BNB_KEY_MARKERS))
    if bnb or "quantization_config" in config:
        raise ValueError(
            f"{folder} is a bitsandbytes (nf4) checkpoint{' (e.g. ' + bnb[0] + ')' if bnb else ''}; it cannot be "
            "re-laid out tensor by tensor. Convert the bf16 or fp8 release instead, then quantize the result."
        )
    if config.get("_class_name", TRANSFORMER_CLASS_NAME) != TRANSFORMER_CLASS_NAME:
        raise ValueError(
            f"{folder / CONFIG_NAME} describes a `{config['_class_name']}`, not an {TRANSFORMER_CLASS_NAME}."
        )
    header = {key: (dtype, shape) for key, (_, dtype, shape) in located.items()}
    try:
        model, origin = check_header(lambda: Ideogram4Transformer2DModel.from_config(config), header, folder, key_plan)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"{error} Nothing was written.") from None
    recipes = {}
    for key, value in model.state_dict().items():  # the model's order: blocks stay together in shards
        source_key, rows = origin[key]
        file, dtype, _ = located[source_key]
        recipes[key] = Recipe(key, ((file, source_key, rows),), tuple(value.shape), SAFETENSORS_DTYPES[dtype])
    unknown = sorted(k for k in config if k not in TRANSFORMER_CONFIG_FIELDS)
    if unknown:
        plan.notes.append(f"{name}/config.json: fields {unknown} are not {TRANSFORMER_CLASS_NAME} arguments; dropped")
    return recipes, transformer_config_text(model)


def transformer_config_text(model: Ideogram4Transformer2DModel) -> str:
    """The config.json a converted transformer is written with: its config's TRANSFORMER_CONFIG_FIELDS."""
    config = {k: v for k, v in json.loads(model.to_json_string()).items() if k in TRANSFORMER_CONFIG_FIELDS}
    return json_text(config)


def _cast(recipe: Recipe, target: torch.dtype | None, scale: Recipe | None) -> Recipe:
    """The recipe stored as `target` (None: as it is): fp8 weights dequantized with `scale`, floats cast."""
    if scale is not None:
        return Recipe(recipe.key, recipe.parts, recipe.shape, target, scale.parts[0])
    if target is None or keeps_stored_dtype(recipe.key, recipe.dtype):
        return recipe
    return Recipe(recipe.key, recipe.parts, recipe.shape, target)


def _load_dtype(recipes: Iterable[Recipe]) -> torch.dtype:
    """The dtype to reload a written transformer in: its float dtype if it has one, else float32 (exact upcast)."""
    floats = {r.dtype for r in recipes if not keeps_stored_dtype(r.key, r.dtype)}
    return floats.pop() if len(floats) == 1 else torch.float32


def _plan_transformer_to_diffusers(plan: ConversionPlan, name: str, target, max_bytes: int) -> None:
    recipes, config = _checked_transformer(plan, name, original_key_plan)
    written = []
    for key, recipe in recipes.items():
        if target is not None and key.endswith(SCALE_SUFFIX):
            continue  # consumed with its weight
        scale = recipes.get(key + "_scale") if target is not None else None
        written.append(_cast(recipe, target, scale))
    plan.add_transformer(name, _sharded(written, max_bytes, name), config, {r.key: r for r in written})


def _plan_transformer_to_original(plan: ConversionPlan, name: str, weights_name: str) -> None:
    recipes, config = _checked_transformer(plan, name, None)
    unchanged, groups = fused_groups(recipes)
    fused = list(unchanged.values())
    for key, parts in groups.items():
        if len({part.dtype for part in parts}) > 1:
            raise CheckpointMismatchError(f"The parts of `{key}` in {name}/ have different dtypes.")
        shape = (sum(part.shape[0] for part in parts), *parts[0].shape[1:])
        fused.append(Recipe(key, tuple(p for part in parts for p in part.parts), shape, parts[0].dtype))
    # Verified by reloading the fused file and comparing each model tensor with the source tensor of the same key.
    plan.add_transformer(name, [OutputFile(f"{name}/{weights_name}", tensors=tuple(fused))], config, recipes)


def _copied(plan: ConversionPlan, folder: Path, name: str, skip: set[str] = frozenset()) -> list[OutputFile]:
    """Copies of a component folder's files (except `skip`), each checked to parse first (safetensors headers, JSON):
    a truncated or damaged file stops the conversion before anything is written. Hidden files are not copied, and
    the report says so."""
    files, hidden = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = f"{name}/{path.relative_to(folder).as_posix()}"
        if relative in skip:
            continue
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            hidden.append(relative)
            continue
        if path.suffix == ".safetensors":
            locate_tensors([path])
        elif path.suffix == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as error:
                raise ValueError(f"{path} is not valid JSON ({error}); nothing was written.") from None
        files.append(OutputFile(relative, copy_from=path))
    if hidden:
        plan.notes.append(f"hidden files not copied: {hidden}")
    return files


def _plan_copy(plan: ConversionPlan, name: str, target, vae_bn: str = "keep") -> None:
    """Copy a component byte for byte, except an fp8 text encoder when a float dtype is asked (dequantized) and the VAE
    with `vae_bn="reference"` (the reference's latent normalisation written into its `bn`)."""
    folder = plan.root / name
    if not folder.is_dir():
        raise FileNotFoundError(f"model_index.json lists `{name}`, but {folder} does not exist.")
    planned = len(plan.files)
    if target is not None and name == TEXT_ENCODER_NAME:
        _plan_dequantized_text_encoder(plan, folder, name, target)
    if vae_bn == "reference" and name == VAE_NAME:
        _plan_reference_bn(plan, folder, name)
    plan.files += _copied(plan, folder, name, {f.path for f in plan.files[planned:]})  # the rest, as they are


def _plan_dequantized_text_encoder(plan: ConversionPlan, folder: Path, name: str, target) -> None:
    """An fp8 text encoder (SPEC 2.2; fp8 as the loader tells it, from its weights) written in `target`: same files,
    each float8 weight dequantized with its scale, the scales dropped, every other floating tensor cast; config.json
    loses the fp8 flag. Other text encoders are left to be copied."""
    files = checkpoint_files(folder, name="model")
    located = locate_tensors(files)
    header = {key: (dtype, shape) for key, (_, dtype, shape) in located.items()}
    if not is_fp8_checkpoint(header):
        return
    check_fp8_pairs(header, str(folder))
    by_file: dict[Path, list[Recipe]] = {file: [] for file in files}
    for key, (file, dtype, shape) in located.items():
        if not key.endswith(SCALE_SUFFIX):
            recipe = Recipe(key, ((file, key, None),), shape, SAFETENSORS_DTYPES[dtype])
            scale = located.get(key + "_scale")
            scale = scale and Recipe(key + "_scale", ((scale[0], key + "_scale", None),), scale[2], torch.float32)
            by_file[file].append(_cast(recipe, target, scale))
    plan.files += [OutputFile(f"{name}/{file.name}", tensors=tuple(recipes)) for file, recipes in by_file.items()]
    for index_path in folder.glob("*.safetensors.index.json"):
        index = json.loads(index_path.read_text())
        index["weight_map"] = {r.key: file.name for file, group in by_file.items() for r in group}
        index.setdefault("metadata", {})["total_size"] = sum(r.nbytes for g in by_file.values() for r in g)
        plan.files.append(OutputFile(f"{name}/{index_path.name}", text=json_text(index, sort_keys=False)))
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.pop(FP8_CONFIG_FLAG, None)
    for dtype_field in ("dtype", "torch_dtype"):
        if dtype_field in config:
            config[dtype_field] = str(target).removeprefix("torch.")
    plan.files.append(OutputFile(f"{name}/{CONFIG_NAME}", text=json_text(config)))
    plan.notes.append(f"{name}: fp8 weights dequantized to {str(target).removeprefix('torch.')}")


def _plan_reference_bn(plan: ConversionPlan, folder: Path, name: str) -> None:
    """The VAE's files with `bn.running_mean` = the reference shift and `bn.running_var` = scale^2 - eps (to the
    bit), in token order: `z * sqrt(running_var + eps) + running_mean` is then the reference's `z * scale + shift`."""
    eps = json.loads((folder / CONFIG_NAME).read_text()).get("batch_norm_eps", 1e-4)
    scale, shift = reference_latent_norm()
    given = {"bn.running_mean": shift, "bn.running_var": variance_for_scale(scale, eps)}
    for file in checkpoint_files(folder):
        recipes = []
        for key, (_, dtype, shape) in locate_tensors([file]).items():
            if key in given and tuple(shape) != tuple(given[key].shape):
                raise ValueError(f"{file}: `{key}` has shape {list(shape)}; the reference vectors have 128 entries.")
            compute = (lambda value=given[key]: value) if key in given else None
            recipes.append(Recipe(key, ((file, key, None),), shape, SAFETENSORS_DTYPES[dtype], compute=compute))
        plan.files.append(OutputFile(f"{name}/{file.name}", tensors=tuple(recipes)))
    plan.notes.append(f"{name}: the reference latent normalisation written into `bn` (token order)")


def _read_model_index(root: Path) -> dict:
    path = root / MODEL_INDEX_NAME
    if not path.exists():
        raise FileNotFoundError(f"{root} has no {MODEL_INDEX_NAME}; give the root folder of an Ideogram 4 repo.")
    return json.loads(path.read_text())


def _is_transformer(name: str, entry) -> bool:
    """By class, or by folder name: a transformer named otherwise in model_index.json is still converted."""
    return name in TRANSFORMER_COMPONENTS or (isinstance(entry, (list, tuple)) and entry[1] == TRANSFORMER_CLASS_NAME)


def component_entries(index: dict) -> dict[str, list]:
    """model_index.json's components: the `name: [library, class]` entries, without the absent optional ones."""
    return {
        name: entry
        for name, entry in index.items()
        if not name.startswith("_") and isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None
    }


def model_index_file(plan: ConversionPlan, entries: dict[str, list]) -> OutputFile:
    """The model_index.json a conversion writes: the pipeline class, the marker that makes the folder recognisably
    one of ours (`overwrite` may replace it), and each component's `[library, class]` entry (as the hub names it)."""
    from . import __version__

    marker = {"direction": plan.direction, "source": plan.source, "version": __version__}
    index = {"_class_name": PIPELINE_CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION, CONVERSION_MARKER: marker}
    index.update({name: list(OFFICIAL_ENTRIES.get(entry[1], entry)) for name, entry in entries.items()})
    return OutputFile(MODEL_INDEX_NAME, text=json_text(index))


def _component_names(components: Iterable[str] | str) -> list[str]:
    """`components` as given (a list, or comma-separated strings) -> the names."""
    parts = [components] if isinstance(components, str) else components
    return [name.strip() for part in parts for name in part.split(",") if name.strip()]


def _select_components(index: dict, components: Iterable[str] | None, source: str) -> list[str]:
    available = list(component_entries(index))
    if components is None:
        return available
    components = _component_names(components)
    unknown = sorted(set(components) - set(available))
    if unknown or not components:
        raise ValueError(f"`components` {unknown or components} are not in {source}; it has {available}.")
    return [c for c in available if c in components]  # model_index order


def _plan(root: Path, source: str, direction: str, dtype: str, components, plan_transformer, target, vae_bn="keep"):
    """Every component's plan, then the top-level files and the hub's model_index.json; reads no tensor."""
    index = _read_model_index(root)
    selected = _select_components(index, components, source)
    plan = ConversionPlan(direction, source, root, selected, dtype)
    entries = {}
    for name in selected:
        entries[name] = index[name]
        if _is_transformer(name, index[name]):
            plan_transformer(plan, name)
            entries[name] = OFFICIAL_ENTRIES[TRANSFORMER_CLASS_NAME]
        else:
            _plan_copy(plan, name, target, vae_bn)
    # A LICENSE and other top-level files are carried over; the index is rewritten and the old card dropped.
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        if path.name not in SKIPPED_TOP_LEVEL_FILES and not path.name.startswith("."):
            plan.files.append(OutputFile(path.name, copy_from=path))
    plan.files.append(model_index_file(plan, entries))
    return plan


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"`{name}={value!r}` is not supported; use one of {list(choices)}.")


def resolve_source(
    source, components: Iterable[str] | None = None, revision: str | None = None, token: str | None = None
) -> Path:
    """A local folder, or a hub repo id downloaded with `huggingface_hub.snapshot_download` (at `revision`)."""
    path = Path(source)
    if path.is_dir():
        if revision is not None:
            raise ValueError(
                f"`revision={revision!r}` picks a commit of a hub repo, but `source={str(source)!r}` is a local "
                "folder; drop `revision`, or give the hub repo id."
            )
        return path
    if not REPO_ID.match(str(source)):
        raise FileNotFoundError(f"`source={source!r}` is neither a folder nor a hub repo id (`owner/name`).")
    from huggingface_hub import snapshot_download

    patterns = None
    if components is not None:
        patterns = ["*.json", "*.md", "LICENSE*"] + [f"{name}/*" for name in _component_names(components)]
    return Path(snapshot_download(str(source), revision=revision, token=token, allow_patterns=patterns))


# --------------------------------------------------------------------------------------------------------------------
# Writing and verifying


class _Reader(ExitStack):
    """Open safetensors files on demand, each once, for the life of a `with` block."""

    def __init__(self) -> None:
        super().__init__()
        self._handles = {}

    def _read(self, file: Path, key: str, rows: slice | None) -> torch.Tensor:
        if file not in self._handles:
            self._handles[file] = self.enter_context(open_safetensors(file))
        if rows is None:
            return self._handles[file].get_tensor(key)
        return self._handles[file].get_slice(key)[rows.start : rows.stop]  # only these rows are read

    def tensor(self, recipe: Recipe) -> torch.Tensor:
        """The value of one planned output tensor."""
        if recipe.compute is not None:
            return recipe.compute().to(recipe.dtype).contiguous()
        parts = [self._read(*part) for part in recipe.parts]
        value = parts[0] if len(parts) == 1 else torch.cat(parts)
        if recipe.scale is not None:
            value = dequantize_fp8_weight(value, self._read(*recipe.scale), recipe.dtype)
        return value.to(recipe.dtype).contiguous()


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
                for recipe in file.tensors:
                    tensors[recipe.key] = reader.tensor(recipe)
                    bar.update(1)
                save_file(tensors, str(target), metadata=SAFETENSORS_METADATA)
                del tensors
            else:
                target.write_text(file.text, encoding="utf-8")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


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
            planned = {r.key: (STORED_NAMES[r.dtype], r.shape) for r in file.tensors}
            got = read_header([path])
            if got != planned:
                bad = [k for k in set(got) | set(planned) if got.get(k) != planned.get(k)]
                problems.append(f"{file.path}: keys, dtypes or shapes differ from the plan: {list_keys(bad)}")
    if not problems:
        with _Reader() as reader:
            for component, (expected, load_dtype) in plan.checks.items():
                problems += _verify_transformer(component, expected, load_dtype, folder, reader)
            # Rewritten tensors outside the transformers (a dequantized text encoder): compared file by file.
            for file in plan.files:
                if file.tensors is None or file.path.split("/")[0] in plan.checks:
                    continue
                with open_safetensors(folder / file.path) as handle:
                    problems += [
                        f"{file.path}: `{r.key}` differs from its source value"
                        for r in file.tensors
                        if not _same_bits(handle.get_tensor(r.key), reader.tensor(r))
                    ]
    headline = "The converted output does not match its source; nothing was moved into place or pushed."
    raise_problems(headline, problems, ConversionVerificationError)


def _verify_transformer(component, expected: dict[str, Recipe], load_dtype, folder: Path, reader) -> list[str]:
    state = Ideogram4Transformer2DModel.from_pretrained(folder / component, dtype=load_dtype).state_dict()
    problems = []
    if set(state) != set(expected):
        problems.append(f"{component}: reloaded keys differ: {list_keys(set(state) ^ set(expected))}")
    for key, recipe in expected.items():
        value = reader.tensor(recipe)
        value = value if keeps_stored_dtype(key, value.dtype) else value.to(load_dtype)
        if key in state and not _same_bits(state[key], value):
            problems.append(f"{component}: `{key}` does not reload to its source value")
    return problems


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _publish(staging: Path, output: Path) -> None:
    """Move the finished folder into place. An existing output is swapped with it in one step where the system can
    (never nothing at `output`), else renamed aside and put back if the second rename fails; then deleted."""
    if not output.exists():
        os.replace(staging, output)
        return
    if _exchange(staging, output):
        shutil.rmtree(staging)  # the previous output, now
        return
    old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(output, old)
    try:
        os.replace(staging, output)
    except BaseException:
        os.replace(old, output)
        raise
    shutil.rmtree(old)


def _written_by_us(folder: Path) -> bool:
    index = folder / MODEL_INDEX_NAME
    try:
        return CONVERSION_MARKER in json.loads(index.read_text())
    except (OSError, ValueError):
        return False


def _check_output(output, overwrite: bool, replace_any_folder: bool = False, source: Path | None = None) -> Path:
    """The output folder, absolute; refused when it is or contains the source (symlinks resolved), or exists and may
    not be replaced: `overwrite` replaces a previous output of this converter, `replace_any_folder` any folder."""
    output = Path(output).absolute()
    if source is not None:
        real_output, real_source = output.resolve(), Path(source).resolve()
        if real_source == real_output or real_output in real_source.parents:
            raise ValueError(f"`output={str(output)!r}` is or contains the source {source}; choose another folder.")
    if not output.exists():
        return output
    if not overwrite and not replace_any_folder:
        raise FileExistsError(f"{output} exists; pass `overwrite=True` (`--overwrite`) to replace it.")
    if not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a folder; remove it or choose another output.")
    if not replace_any_folder and any(output.iterdir()) and not _written_by_us(output):
        raise FileExistsError(
            f"{output} is not a folder this converter wrote (its model_index.json has no `{CONVERSION_MARKER}`), so "
            "`overwrite` does not replace it; pass `replace_any_folder=True` (`--replace-any-folder`) to replace it "
            "anyway, or choose another output."
        )
    return output


def _execute(plan: ConversionPlan, output, dry_run, overwrite, replace_any_folder, verify, progress):
    output = _check_output(output, overwrite, replace_any_folder, plan.root)
    leftovers = [p for p in output.parent.glob(f".{output.name}.*") if ".partial-" in p.name or ".old-" in p.name]
    plan.notes += [f"left by an interrupted run, remove it when you no longer need it: {p}" for p in sorted(leftovers)]
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
        _publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


# --------------------------------------------------------------------------------------------------------------------
# Model cards and the Hub


def render_model_card(template: str, variables: dict[str, object]) -> str:
    """Fill every `{{ name }}` of a template with `huggingface_hub.ModelCard.from_template`; a name without a value
    raises, naming all of them, and the YAML front matter is parsed the way the Hub does, so a broken card fails here."""
    import jinja2.meta
    from huggingface_hub import ModelCard, ModelCardData

    needed = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template)) - {"card_data"}
    missing = sorted(needed - set(variables))
    if missing:
        raise KeyError(f"The model card template needs values for {missing}.")
    if not template.startswith("---\n"):
        raise ValueError("A model card must start with YAML front matter between `---` lines.")
    card = ModelCard.from_template(ModelCardData(), template_str=template, **{k: str(v) for k, v in variables.items()})
    return str(card) + "\n"


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
    from . import __version__

    if base_model is None:
        base_model = source if REPO_ID.match(source) and not Path(source).exists() else DEFAULT_BASE_MODEL
    for name, value in (("repo_id", repo_id), ("base_model", base_model)):
        if value is not None and not REPO_ID.match(value):
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
        "diffusers_version": DIFFUSERS_VERSION,
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
    if not REPO_ID.match(repo_id):
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
    vae_bn: str = "keep",
    model_card: str | os.PathLike | None = None,
    card_variables: dict | None = None,
    base_model: str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    replace_any_folder: bool = False,
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
        vae_bn: `"keep"` copies the VAE; `"reference"` writes the reference release's latent normalisation into its
            `bn` statistics, in token order, so that pipelines decoding with `bn` (diffusers' built-in one) decode
            like the reference. FLUX.2 pipelines read `bn` in another order: the folder's VAE is then for Ideogram 4.
        model_card: a template from model_cards/ to render into README.md; `card_variables` add or override values.
        base_model: the hub id in the card's `base_model` (default: the source when it is a hub id, else the release).
        dry_run: plan and check everything, write nothing; the report lists the files and sizes.
        overwrite: replace an existing `output` written by this converter (swapped in one step, once the new folder is
            complete and verified). `replace_any_folder`: replace any existing folder.
        verify: reload every converted transformer and compare it to the source before moving the folder into place.
        push_to_hub_id: upload the verified folder to this hub repo (created if needed, `private` if asked).
    """
    # Every argument is checked before anything is downloaded or written.
    if push_to_hub_id is not None and not verify:
        raise ValueError("`push_to_hub_id` needs `verify=True`: only a folder checked against its source is pushed.")
    if push_to_hub_id is not None and not REPO_ID.match(push_to_hub_id):
        raise ValueError(f"`push_to_hub_id={push_to_hub_id!r}` is not a hub repo id (`owner/name`).")
    for name, given, needed, needed_value in (  # an option that would do nothing is refused, not ignored
        ("private", private, "push_to_hub_id", push_to_hub_id),
        ("commit_message", commit_message is not None, "push_to_hub_id", push_to_hub_id),
        ("card_variables", bool(card_variables), "model_card", model_card),
        ("base_model", base_model is not None, "model_card", model_card),
    ):
        if given and needed_value is None:
            raise ValueError(f"`{name}` does nothing without `{needed}`; give `{needed}` too, or drop `{name}`.")
    _check_choice("dtype", dtype, DTYPES)
    _check_choice("vae_bn", vae_bn, VAE_BN_CHOICES)
    max_bytes = parse_size(max_shard_size)
    if model_card is not None and not Path(model_card).is_file():
        raise FileNotFoundError(f"`model_card={str(model_card)!r}` is not a file; pass a template from model_cards/.")
    _check_output(output, overwrite, replace_any_folder, source if Path(source).is_dir() else None)
    root = resolve_source(source, components, revision=revision, token=token)
    plan_transformer = partial(_plan_transformer_to_diffusers, target=DTYPES[dtype], max_bytes=max_bytes)
    plan = _plan(
        root, str(source), "original -> diffusers", dtype, components, plan_transformer, DTYPES[dtype], vae_bn
    )
    if model_card is not None:
        words = str(DTYPES[dtype]).removeprefix("torch.") if dtype != "keep" else ", ".join(sorted(plan.tensor_dtypes))
        variables = model_card_variables(
            source=plan.source,
            dtype=words or "as in the source",
            repo_id=push_to_hub_id,
            base_model=base_model,
            component_sizes={
                c: sum(f.size for f in plan.files if f.path.startswith(c + "/")) for c in plan.components
            },
            **(card_variables or {}),
        )
        card = render_model_card(Path(model_card).read_text(encoding="utf-8"), variables)
        plan.files.append(OutputFile(MODEL_CARD_NAME, text=card))
    report = _execute(plan, output, dry_run, overwrite, replace_any_folder, verify, progress)
    if push_to_hub_id is not None and dry_run:
        report.notes.append(f"dry run: nothing written, so nothing pushed to {push_to_hub_id}")
    elif push_to_hub_id is not None:
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
    replace_any_folder: bool = False,
    verify: bool = True,
    revision: str | None = None,
    token: str | None = None,
    progress: bool = True,
) -> ConversionReport:
    """Convert a diffusers-layout repo back to the original fused layout, one `weights_name` file per transformer.

    Every tensor is copied bit for bit (q/k/v rows concatenated in that order, fp8 scales likewise), so
    original -> diffusers -> original reproduces the source tensors exactly. The other components are copied.
    """
    if not weights_name.endswith(".safetensors") or "/" in weights_name:  # before a hub source is downloaded
        raise ValueError(f"`weights_name={weights_name!r}` must be a plain `*.safetensors` file name.")
    _check_output(output, overwrite, replace_any_folder, source if Path(source).is_dir() else None)
    root = resolve_source(source, components, revision=revision, token=token)
    plan_transformer = partial(_plan_transformer_to_original, weights_name=weights_name)
    plan = _plan(root, str(source), "diffusers -> original", "keep", components, plan_transformer, None)
    return _execute(plan, output, dry_run, overwrite, replace_any_folder, verify, progress)
