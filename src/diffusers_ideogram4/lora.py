"""LoRA adapters on both Ideogram 4 transformers (SPEC 8, 9), through diffusers' LoRA machinery and PEFT.

Published Ideogram 4 LoRAs come in two key formats, told apart here by their keys:
- diffusers / PEFT: `<module>.lora_A.weight` (down, (rank, in)) and `<module>.lora_B.weight` (up, (out, rank)) on the
  split attention (`attention.to_q/to_k/to_v/to_out.0`); alpha lives in diffusers' LoRA metadata (none: alpha = rank).
- original (ai-toolkit, kohya-style trainers): `lora_down.weight`, `lora_up.weight` and a scalar `alpha` on the fused
  attention (`attention.qkv`, rows [q; k; v], and `attention.o`).
Key prefixes: `transformer.`, `diffusion_model.`, `base_model.model.` or none name "the denoiser" (the conditional
transformer unless `target` says otherwise); `conditional_transformer.` and `unconditional_transformer.` name a branch.

Every file is parsed into one form, `{component: {module (diffusers layout): LoraFactors}}`, which is then written as
a PEFT state dict with alpha / rank folded into lora_B and loaded by PEFT with scaling 1 (`lora_alpha = r`). A fused
qkv LoRA splits exactly: the down matrix is shared by q, k and v, the up matrix is cut in row thirds. Keys that are
not understood raise a ValueError that names them; nothing is skipped.
"""

import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
import torch.nn as nn
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LoraBaseMixin, _fetch_state_dict
from diffusers.utils import USE_PEFT_BACKEND
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import save_file

from .constants import FUSED_OUT, FUSED_QKV, SPLIT_OUT, SPLIT_QKV
from .fp8 import FP8Linear
from .loading import HUB_DOWNLOAD_KWARGS, list_keys, raise_problems


COMPONENTS = ("transformer", "unconditional_transformer")
DEFAULT_COMPONENT = "transformer"
# Prefixes that name a branch; every other accepted prefix means "the denoiser" and goes to `target`.
BRANCH_PREFIXES = {
    "conditional_transformer.": "transformer",
    "unconditional_transformer.": "unconditional_transformer",
}
# PEFT's own `save_pretrained` writes this prefix, and the adapter's alpha only into PEFT_CONFIG_NAME beside it.
PEFT_SAVE_PREFIX, PEFT_CONFIG_NAME = "base_model.model.", "adapter_config.json"
GENERIC_PREFIXES = ("transformer.", "diffusion_model.", PEFT_SAVE_PREFIX)
# Prefixes written by the converter's original format, per component.
ORIGINAL_PREFIXES = {"transformer": "diffusion_model.", "unconditional_transformer": "unconditional_transformer."}

DOWN_SUFFIXES = (".lora_A.weight", ".lora_down.weight")
UP_SUFFIXES = (".lora_B.weight", ".lora_up.weight")
ALPHA_SUFFIX = ".alpha"
PEFT_DOWN, PEFT_UP = DOWN_SUFFIXES[0], UP_SUFFIXES[0]
ORIGINAL_DOWN, ORIGINAL_UP = DOWN_SUFFIXES[1], UP_SUFFIXES[1]

# The Linear layers of the model (SPEC 2.1), per block and global; the original layout fuses the attention.
FEED_FORWARD = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
BLOCK_MODULES = (*SPLIT_QKV, SPLIT_OUT, *FEED_FORWARD, "adaln_modulation")
ORIGINAL_BLOCK_MODULES = (FUSED_QKV, FUSED_OUT, *FEED_FORWARD, "adaln_modulation")
GLOBAL_MODULES = (
    "input_proj",
    "llm_cond_proj",
    "adaln_proj",
    "t_embedding.mlp_in",
    "t_embedding.mlp_out",
    "final_layer.linear",
    "final_layer.adaln_modulation",
)
_BLOCK_MODULE = re.compile(r"^layers\.(?P<index>\d+)\.(?P<module>.+)$")

# Adapter kinds PEFT-LoRA loading cannot represent, recognised by a piece of their key names.
UNSUPPORTED_KEY_MARKERS = {
    "lokr_": "LoKr",
    "hada_": "LoHa",
    "lora_magnitude_vector": "DoRA",
    "dora_scale": "DoRA",
    ".lora_mid.": "LoCon (`lora_mid`)",
    "lora_B.bias": "LoRA with biases (`lora_B.bias`)",
    "lora_up.bias": "LoRA with biases (`lora_up.bias`)",
}
UNSUPPORTED_KEY_ENDINGS = {
    ".diff": "full weight differences (`.diff`)",
    ".diff_b": "full bias differences (`.diff_b`)",
}
# Saved beside the base weight of a LoRA layer while an adapter is fused, so that unfusing restores it bit for bit.
_UNFUSED_STATE = "_ideogram4_unfused_state"
HUB_KWARGS = (*HUB_DOWNLOAD_KWARGS, "subfolder")


@dataclass
class LoraFactors:
    """One LoRA'd Linear: its weight changes by `scale * up @ down`."""

    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank)
    scale: float = 1.0  # alpha / rank

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def folded_up(self) -> torch.Tensor:
        """`up * scale`, so that the delta is `folded_up @ down` (computed in float32, stored in up's dtype)."""
        if self.scale == 1.0:
            return self.up
        return (self.up.float() * self.scale).to(self.up.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Parsing any format into {component: {module: LoraFactors}}


def is_known_module(name: str, layout: str = "any") -> bool:
    """Whether `name` is a Linear of the Ideogram 4 transformer, in the diffusers or original layout."""
    if name in GLOBAL_MODULES:
        return True
    match = _BLOCK_MODULE.match(name)
    if match is None:
        return False
    allowed = {"diffusers": BLOCK_MODULES, "original": ORIGINAL_BLOCK_MODULES}.get(layout)
    return match.group("module") in (allowed or BLOCK_MODULES + ORIGINAL_BLOCK_MODULES)


def split_prefix(key: str) -> tuple[str, str]:
    """`unconditional_transformer.layers.0...` -> (`unconditional_transformer.`, `layers.0...`); no prefix: ("", key)."""
    for prefix in (*BRANCH_PREFIXES, *GENERIC_PREFIXES):
        if key.startswith(prefix):
            return prefix, key[len(prefix) :]
    return "", key


def _split_suffix(key: str) -> tuple[str, str] | None:
    """`layers.0.attention.qkv.lora_down.weight` -> (`layers.0.attention.qkv`, "down"); None when not a LoRA key."""
    for suffixes, part in ((DOWN_SUFFIXES, "down"), (UP_SUFFIXES, "up"), ((ALPHA_SUFFIX,), "alpha")):
        for suffix in suffixes:
            if key.endswith(suffix):
                return key[: -len(suffix)], part
    return None


def refuse_unsupported(keys) -> None:
    """Raise a ValueError naming the adapter kind (LoKr, LoHa, DoRA, ...) when any key belongs to one."""
    found = defaultdict(list)
    for key in keys:
        for marker, kind in UNSUPPORTED_KEY_MARKERS.items():
            if marker in key:
                found[kind].append(key)
        for ending, kind in UNSUPPORTED_KEY_ENDINGS.items():
            if key.endswith(ending):
                found[kind].append(key)
    if found:
        kinds = "; ".join(f"{kind}: {list_keys(found_keys)}" for kind, found_keys in sorted(found.items()))
        raise ValueError(
            f"This adapter format is not supported: only plain LoRA (lora_A/lora_B or lora_down/lora_up with alpha) "
            f"loads into Ideogram 4 transformers, and nothing is skipped. Unsupported keys - {kinds}."
        )


def _resolve_components(prefixes, target: str | None) -> dict[str, str]:
    """Which component each key prefix of a file goes to."""
    if target is not None and target not in COMPONENTS:
        raise ValueError(f"`target={target!r}` is not a LoRA-loadable component; use one of {list(COMPONENTS)}.")
    default = {prefix: BRANCH_PREFIXES.get(prefix, DEFAULT_COMPONENT) for prefix in prefixes}
    if target is None:
        return default
    if len(set(default.values())) > 1:
        raise ValueError(
            f"`target={target!r}` was given, but the LoRA holds adapters for both transformers (key prefixes "
            f"{sorted(prefixes)}); drop `target` to load each part into its own transformer."
        )
    conflicting = sorted(p for p in prefixes if p in BRANCH_PREFIXES and BRANCH_PREFIXES[p] != target)
    if conflicting:
        raise ValueError(
            f"`target={target!r}` conflicts with the LoRA's key prefix {conflicting[0]!r}, which names the "
            f"{BRANCH_PREFIXES[conflicting[0]]!r} branch. Drop `target`, or convert the file to an unprefixed one."
        )
    return dict.fromkeys(prefixes, target)


def _metadata_by_prefix(metadata: dict | None) -> dict[str, dict]:
    """diffusers' LoRA metadata (`transformer.r`, `unconditional_transformer.lora_alpha`, or unprefixed) per prefix."""
    grouped = defaultdict(dict)
    for key, value in (metadata or {}).items():
        prefix, name = split_prefix(key)
        grouped[prefix][name] = value
    return grouped


def _scale_from_metadata(config: dict, module: str, rank: int, source: str) -> float:
    """alpha / rank of one module under a PEFT LoraConfig dict (its rank_pattern / alpha_pattern rules)."""
    if config.get("use_dora"):
        raise ValueError(f"{source} is a DoRA adapter (`use_dora` in its metadata); DoRA is not supported.")
    if config.get("lora_bias"):
        raise ValueError(f"{source} has LoRA biases (`lora_bias` in its metadata); they are not supported.")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    configured_rank = rank_pattern.get(get_pattern_key(rank_pattern, module), config.get("r", rank))
    if configured_rank != rank:
        raise ValueError(
            f"{source}: `{module}` has rank {rank} but the LoRA metadata says {configured_rank}; the file's metadata "
            f"does not belong to its tensors."
        )
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern, module), config.get("lora_alpha", rank))
    return float(alpha) / (rank**0.5 if config.get("use_rslora") else rank)


def _peft_adapter_config(path: str, subfolder: str | None) -> dict:
    """The `adapter_config.json` PEFT's `save_pretrained` writes beside `adapter_model.safetensors`: its alpha."""
    folder = os.path.join(path, subfolder or "") if os.path.isdir(path) else os.path.dirname(path)
    config = os.path.join(folder, PEFT_CONFIG_NAME)
    if not os.path.isfile(config):
        raise ValueError(
            f"{path} holds a PEFT adapter (`{PEFT_SAVE_PREFIX}` keys) without its {PEFT_CONFIG_NAME}, so its "
            f"`lora_alpha` is unknown. Put {PEFT_CONFIG_NAME} beside the weights, or pass `metadata=` (the "
            "LoraConfig as a dict)."
        )
    with open(config, encoding="utf-8") as handle:
        return json.load(handle)


def _split_attention(name: str, factors: LoraFactors) -> dict[str, LoraFactors]:
    """Original-layout module -> diffusers-layout module(s). qkv: shared down, up cut in row thirds, same scale."""
    match = _BLOCK_MODULE.match(name)
    if match is None or match.group("module") not in (FUSED_QKV, FUSED_OUT):
        return {name: factors}
    layer = f"layers.{match.group('index')}."
    if match.group("module") == FUSED_OUT:
        return {layer + SPLIT_OUT: factors}
    rows = factors.up.shape[0] // 3
    return {
        layer + split: _without_zero_rank(
            LoraFactors(factors.down.clone(), factors.up[i * rows : (i + 1) * rows].clone(), factors.scale)
        )
        for i, split in enumerate(SPLIT_QKV)
    }


def _without_zero_rank(factors: LoraFactors) -> LoraFactors:
    """Drop rank components whose up column is zero: they change nothing. A qkv fused from separately trained q, k and
    v (block-diagonal up) thus splits back to the original ranks. All-zero adapters are kept whole."""
    keep = factors.up.any(dim=0)
    if bool(keep.all()) or not bool(keep.any()):
        return factors
    return LoraFactors(factors.down[keep].contiguous(), factors.up[:, keep].contiguous(), factors.scale)


def parse_lora_state_dict(
    state_dict: dict[str, torch.Tensor], metadata: dict | None = None, target: str | None = None
) -> dict[str, dict[str, LoraFactors]]:
    """Any supported LoRA state dict -> `{component: {module (diffusers layout): LoraFactors}}`.

    Args:
        state_dict: LoRA tensors in any supported format (module docstring).
        metadata: diffusers' LoRA adapter metadata (the PEFT config per component), when the file has it.
        target: the component for unprefixed / generic keys (default "transformer").

    Raises ValueError naming every key that is not understood, every module that is not a Linear of the model,
    incomplete or mis-shaped factors, and unsupported adapter kinds (LoKr, LoHa, DoRA, biases, weight diffs).
    """
    if not state_dict:
        raise ValueError("The LoRA state dict is empty.")
    refuse_unsupported(state_dict)
    pieces = defaultdict(dict)  # (prefix, module) -> {"down"|"up"|"alpha": (key, tensor)}
    not_lora, unknown_module, repeated = [], [], []
    for key, tensor in state_dict.items():
        prefix, rest = split_prefix(key)
        split = _split_suffix(rest)
        if split is None:
            not_lora.append(key)
            continue
        module, part = split
        if not is_known_module(module):
            unknown_module.append(key)
        elif part in pieces[prefix, module]:
            repeated.append(f"{key} (and {pieces[prefix, module][part][0]})")
        else:
            pieces[prefix, module][part] = (key, tensor)
    problems = []
    if not_lora:
        problems.append(f"keys that are not LoRA factors: {list_keys(not_lora)}")
    if unknown_module:
        problems.append(
            f"keys for modules that are not Linear layers of an Ideogram 4 transformer: {list_keys(unknown_module)}"
        )
    if repeated:
        problems.append(f"factors given twice: {list_keys(repeated)}")
    raise_problems("The LoRA has keys this loader does not understand; nothing was loaded.", problems, ValueError)

    key_prefixes = {prefix for prefix, _ in pieces}
    components = _resolve_components(key_prefixes, target)
    metadata_by_prefix = _metadata_by_prefix(metadata)
    if set(metadata_by_prefix) == {""}:  # one unprefixed PEFT config: it describes every key
        metadata_by_prefix = dict.fromkeys(key_prefixes, metadata_by_prefix[""])
    unmatched = sorted(set(metadata_by_prefix) - key_prefixes)
    if unmatched:
        raise ValueError(
            f"The LoRA metadata is for key prefixes {unmatched}, but the LoRA's keys have {sorted(key_prefixes)}; "
            "its alpha would be lost. Pass metadata whose prefixes match the keys (or unprefixed PEFT config)."
        )
    parsed = defaultdict(dict)
    for (prefix, module), parts in pieces.items():
        source = f"`{prefix}{module}`"
        if "down" not in parts or "up" not in parts:
            absent = "up (lora_B / lora_up)" if "up" not in parts else "down (lora_A / lora_down)"
            problems.append(f"{source} has no {absent} factor")
            continue
        down, up = parts["down"][1], parts["up"][1]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            problems.append(
                f"{source}: down {list(down.shape)} and up {list(up.shape)} are not (rank, in), (out, rank)"
            )
            continue
        if module.endswith(FUSED_QKV) and up.shape[0] % 3:
            problems.append(f"{source}: a fused qkv up factor needs 3 x hidden rows, got {list(up.shape)}")
            continue
        if "alpha" in parts:
            alpha = parts["alpha"][1]
            if alpha.numel() != 1:
                problems.append(f"{source}: alpha must be one number, got shape {list(alpha.shape)}")
                continue
            if metadata_by_prefix.get(prefix):
                problems.append(f"{source} has both an `alpha` key and LoRA metadata; give alpha one way only")
                continue
            scale = float(alpha.item()) / down.shape[0]
        elif metadata_by_prefix.get(prefix):
            scale = _scale_from_metadata(metadata_by_prefix[prefix], module, down.shape[0], source)
        else:
            scale = 1.0
        component = components[prefix]
        for name, factors in _split_attention(module, LoraFactors(down, up, scale)).items():
            if name in parsed[component]:
                problems.append(f"`{component}.{name}` is given twice (again by {source})")
            parsed[component][name] = factors
    raise_problems("The LoRA is malformed; nothing was loaded.", problems, ValueError)
    return dict(parsed)


# --------------------------------------------------------------------------------------------------------------------
# Writing: PEFT / diffusers format and the original format


def lora_config_kwargs(modules: dict[str, LoraFactors]) -> dict:
    """PEFT `LoraConfig` arguments for folded factors: every module at scaling 1 (lora_alpha = rank), ranks exact."""
    ranks = {name: factors.rank for name, factors in modules.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    # PEFT matches pattern keys as regexes against the end of the module name; `^` pins them to the whole name.
    pattern = {f"^{re.escape(name)}": value for name, value in sorted(ranks.items()) if value != rank}
    return {
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(modules),
    }


def peft_state_dict(modules: dict[str, LoraFactors]) -> dict[str, torch.Tensor]:
    """`{module}.lora_A.weight` / `.lora_B.weight` with alpha / rank folded into lora_B, without prefix."""
    state_dict = {}
    for name, factors in sorted(modules.items()):
        state_dict[name + PEFT_DOWN] = factors.down.contiguous()
        state_dict[name + PEFT_UP] = factors.folded_up().contiguous()
    return state_dict


def to_diffusers_format(components: dict[str, dict[str, LoraFactors]]) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (state dict with `transformer.` / `unconditional_transformer.` prefixes, diffusers' LoRA metadata)."""
    state_dict, metadata = {}, {}
    for component, modules in components.items():
        state_dict.update({f"{component}.{key}": value for key, value in peft_state_dict(modules).items()})
        metadata.update({f"{component}.{key}": value for key, value in lora_config_kwargs(modules).items()})
    return state_dict, metadata


def _fuse_attention(modules: dict[str, LoraFactors]) -> dict[str, LoraFactors]:
    """Diffusers-layout modules -> original layout: to_q/to_k/to_v become one `attention.qkv`, to_out.0 `attention.o`.

    q, k and v sharing one down factor and one scale fuse as they were trained (up rows stacked); otherwise the down
    factors are stacked and the up factor is block-diagonal (scales folded in, a missing projection is a zero block),
    which gives the same delta at a larger rank.
    """
    fused, layers = {}, defaultdict(dict)
    for name, factors in modules.items():
        match = _BLOCK_MODULE.match(name)
        module = match.group("module") if match else None
        if module in SPLIT_QKV:
            layers[match.group("index")][module] = factors
        elif module == SPLIT_OUT:
            fused[f"layers.{match.group('index')}.{FUSED_OUT}"] = factors
        else:
            fused[name] = factors
    for index, parts in layers.items():
        present = [parts[split] for split in SPLIT_QKV if split in parts]
        first = present[0]
        if len(present) == 3 and all(
            torch.equal(p.down, first.down) and p.scale == first.scale and p.up.dtype == first.up.dtype
            for p in present
        ):
            fused[f"layers.{index}.{FUSED_QKV}"] = LoraFactors(
                first.down, torch.cat([p.up for p in present]), first.scale
            )
            continue
        rows = first.up.shape[0]
        up = first.up.new_zeros(3 * rows, sum(p.rank for p in present))
        column = 0
        for slot, split in enumerate(SPLIT_QKV):
            if split in parts:
                part = parts[split]
                up[slot * rows : (slot + 1) * rows, column : column + part.rank] = part.folded_up()
                column += part.rank
        fused[f"layers.{index}.{FUSED_QKV}"] = LoraFactors(torch.cat([p.down for p in present]), up, 1.0)
    return fused


def to_original_format(components: dict[str, dict[str, LoraFactors]]) -> dict[str, torch.Tensor]:
    """-> original-format state dict: `diffusion_model.` (or `unconditional_transformer.`) prefix, fused attention,
    `lora_down` / `lora_up` and a float32 `alpha` = scale x rank per module."""
    state_dict = {}
    for component, modules in components.items():
        prefix = ORIGINAL_PREFIXES[component]
        for name, factors in sorted(_fuse_attention(modules).items()):
            state_dict[prefix + name + ORIGINAL_DOWN] = factors.down.contiguous()
            state_dict[prefix + name + ORIGINAL_UP] = factors.up.contiguous()
            state_dict[prefix + name + ALPHA_SUFFIX] = torch.tensor(factors.scale * factors.rank, dtype=torch.float32)
    return state_dict


LORA_FORMATS = ("diffusers", "original")


def convert_lora_state_dict(
    state_dict: dict[str, torch.Tensor], to: str, metadata: dict | None = None, target: str | None = None
) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Convert a LoRA between formats; the delta of every weight is kept (exactly, up to the rounding of folding
    alpha / rank into the up factor). Returns (state dict, diffusers LoRA metadata or None for the original format).

    Args:
        state_dict: a LoRA in any supported format.
        to: "diffusers" (PEFT keys, `transformer.` / `unconditional_transformer.` prefixes, alpha folded, metadata)
            or "original" (`diffusion_model.` prefix, fused attention, lora_down / lora_up / alpha).
        metadata: diffusers' LoRA metadata of the input, if it has some.
        target: the component of unprefixed / generic keys (default "transformer").
    """
    if to not in LORA_FORMATS:
        raise ValueError(f"`to={to!r}` is not a LoRA format; use one of {list(LORA_FORMATS)}.")
    components = parse_lora_state_dict(state_dict, metadata, target)
    if to == "diffusers":
        return to_diffusers_format(components)
    return to_original_format(components), None


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A LoRA safetensors file -> (tensors, diffusers' LoRA metadata or None)."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        raw = (handle.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
    return tensors, json.loads(raw) if raw else None


def write_lora_file(
    path: str | os.PathLike, state_dict: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    """Write a LoRA safetensors file, with diffusers' LoRA metadata in its header when given."""
    header = {"format": "pt"}
    if metadata:
        header[LORA_ADAPTER_METADATA_KEY] = json.dumps(metadata, indent=2, sort_keys=True)
    save_file({key: value.contiguous() for key, value in state_dict.items()}, str(path), metadata=header)


def convert_lora_file(input_path, output_path, to: str, target: str | None = None) -> dict[str, torch.Tensor]:
    """Convert a LoRA safetensors file to the "diffusers" or "original" format; returns the written tensors."""
    state_dict, metadata = read_lora_file(input_path)
    converted, converted_metadata = convert_lora_state_dict(state_dict, to=to, metadata=metadata, target=target)
    write_lora_file(output_path, converted, converted_metadata)
    return converted


# --------------------------------------------------------------------------------------------------------------------
# Checks against the loaded model


def base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def check_lora_fits(component: str, model: nn.Module, modules: dict[str, LoraFactors]) -> None:
    """Raise a ValueError naming every module the LoRA targets that the model lacks, cannot wrap, or has another shape.

    fp8 weight-only layers (`FP8Linear`) are Linears: the adapter runs beside the dequantized weight.
    """
    found = dict(model.named_modules())
    missing, unsupported, mis_shaped = [], [], []
    for name, factors in sorted(modules.items()):
        if name not in found:
            missing.append(f"{component}.{name}")
            continue
        layer = base_layer(found[name])
        if not isinstance(layer, nn.Linear):
            unsupported.append(f"{component}.{name} ({type(layer).__name__})")
        elif factors.down.shape[1] != layer.in_features or factors.up.shape[0] != layer.out_features:
            mis_shaped.append(
                f"{component}.{name} (LoRA {factors.up.shape[0]}x{factors.down.shape[1]}, model "
                f"{layer.out_features}x{layer.in_features})"
            )
    problems = []
    if missing:
        problems.append(f"modules the model does not have: {list_keys(missing)}")
    if unsupported:
        problems.append(f"modules PEFT cannot wrap with LoRA: {list_keys(unsupported)}")
    if mis_shaped:
        problems.append(f"modules of another shape: {list_keys(mis_shaped)}")
    raise_problems(
        "The LoRA does not fit the model (a LoRA for another model or size?); nothing was loaded.",
        problems,
        ValueError,
    )


# --------------------------------------------------------------------------------------------------------------------
# The pipeline mixin


class Ideogram4LoraLoaderMixin(LoraBaseMixin):
    r"""
    LoRA loading for `Ideogram4Pipeline`, on both transformers: `load_lora_weights`, `save_lora_weights`,
    `save_lora_adapter`, `fuse_lora` / `unfuse_lora` (bit-exact), and diffusers' `set_adapters`, `disable_lora`,
    `enable_lora`, `delete_adapters`, `unload_lora_weights`. The adapters are PEFT LoRA layers; a runtime scale goes
    through `pipe(..., attention_kwargs={"scale": s})`.
    """

    _lora_loadable_modules = list(COMPONENTS)

    @classmethod
    def lora_state_dict(
        cls,
        pretrained_model_name_or_path_or_dict,
        target: str | None = None,
        return_lora_metadata: bool = False,
        **kwargs,
    ):
        r"""
        Read a LoRA in any supported format and return it in the diffusers format: keys
        `transformer.<module>.lora_A.weight` / `.lora_B.weight` (and `unconditional_transformer.`), split attention,
        alpha / rank folded into lora_B.

        Args:
            pretrained_model_name_or_path_or_dict: a hub repo id, a folder, a `.safetensors` file or a state dict.
            target (`str`, *optional*): component for keys without a branch prefix (default "transformer").
            return_lora_metadata (`bool`): also return diffusers' LoRA metadata (the PEFT config per component).
            weight_name, subfolder, cache_dir, revision, token, local_files_only, force_download, proxies: where to find
                the file. metadata: diffusers' LoRA metadata that goes with a state dict passed in memory.
        """
        state_dict, metadata = cls._read_lora(pretrained_model_name_or_path_or_dict, **kwargs)
        converted, converted_metadata = to_diffusers_format(parse_lora_state_dict(state_dict, metadata, target))
        return (converted, converted_metadata) if return_lora_metadata else converted

    @staticmethod
    def _read_lora(pretrained_model_name_or_path_or_dict, weight_name=None, metadata=None, **kwargs):
        unknown = sorted(set(kwargs) - set(HUB_KWARGS))
        if unknown:
            raise TypeError(
                f"Unexpected arguments {unknown}; LoRA loading accepts `weight_name`, `metadata` and {list(HUB_KWARGS)}."
            )
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            return dict(pretrained_model_name_or_path_or_dict), metadata
        if weight_name is not None and not weight_name.endswith(".safetensors"):
            raise ValueError(f"`weight_name={weight_name!r}`: LoRA weights are read from safetensors files only.")
        path = str(pretrained_model_name_or_path_or_dict)
        if os.path.isfile(path) and not path.endswith(".safetensors"):
            raise ValueError(f"{path}: LoRA weights are read from safetensors files only.")
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict,
            weight_name=weight_name,
            use_safetensors=True,
            local_files_only=kwargs.get("local_files_only"),
            cache_dir=kwargs.get("cache_dir"),
            force_download=kwargs.get("force_download", False),
            proxies=kwargs.get("proxies"),
            token=kwargs.get("token"),
            revision=kwargs.get("revision"),
            subfolder=kwargs.get("subfolder"),
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            allow_pickle=False,
            metadata=metadata,
        )
        if metadata is None and any(key.startswith(PEFT_SAVE_PREFIX) for key in state_dict):
            metadata = _peft_adapter_config(path, kwargs.get("subfolder"))
        return state_dict, metadata

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict,
        adapter_name: str | None = None,
        target: str | None = None,
        hotswap: bool = False,
        low_cpu_mem_usage: bool = False,
        **kwargs,
    ) -> None:
        r"""
        Load a LoRA, in any supported format (detected from its keys), into the transformer(s) it is for.

        Args:
            pretrained_model_name_or_path_or_dict: a hub repo id, a folder, a `.safetensors` file or a state dict.
            adapter_name (`str`, *optional*): name of the adapter, for `set_adapters` & co.; default `default_<n>`.
            target (`str`, *optional*): "transformer" or "unconditional_transformer": where keys without a branch
                prefix (`transformer.`, `diffusion_model.`, none) go. Default: the conditional transformer. Keys
                prefixed `unconditional_transformer.` always go to the unconditional transformer.
            hotswap (`bool`): replace the weights of the already loaded adapter `adapter_name` in place.
            low_cpu_mem_usage (`bool`): let PEFT skip the random initialisation of the LoRA layers.
            weight_name, subfolder, cache_dir, revision, token, local_files_only, force_download, proxies: where to find
                the file. metadata: diffusers' LoRA metadata that goes with a state dict passed in memory.

        Raises ValueError, before touching the model, for keys that are not understood, modules the transformer does
        not have or cannot wrap (fp8 layers), mis-shaped factors and unsupported adapter kinds.
        """
        if not USE_PEFT_BACKEND:
            raise ValueError("LoRA loading needs the PEFT backend: `pip install peft`.")
        state_dict, metadata = self._read_lora(pretrained_model_name_or_path_or_dict, **kwargs)
        components = parse_lora_state_dict(state_dict, metadata, target)
        for component, modules in components.items():
            model = getattr(self, component, None)
            if model is None:
                raise ValueError(
                    f"The LoRA has weights for `{component}`, which this pipeline does not have (a CFG-distilled "
                    f"checkpoint?). Load the pipeline with its `{component}`, or pass `target=` another component."
                )
            check_lora_fits(component, model, modules)
        adapter_name = adapter_name or self._unused_adapter_name()
        # Per component, as in diffusers: one name may cover a LoRA for each branch, loaded from two files.
        loaded_names = self.get_list_adapters()
        in_use = [c for c in components if adapter_name in loaded_names.get(c, [])]
        if in_use and not hotswap:
            raise ValueError(
                f"An adapter named {adapter_name!r} is already loaded in {in_use}; pass another "
                f"`adapter_name`, `hotswap=True` to replace its weights, or `delete_adapters({adapter_name!r})` first."
            )
        try:
            for component, modules in components.items():
                model = getattr(self, component)
                self.load_lora_into_transformer(
                    peft_state_dict(modules),
                    transformer=model,
                    adapter_name=adapter_name,
                    metadata=lora_config_kwargs(modules),
                    _pipeline=self,
                    low_cpu_mem_usage=low_cpu_mem_usage,
                    hotswap=hotswap,
                )
                _check_loaded(component, model, modules, adapter_name)
        except Exception:
            if not hotswap:  # leave the pipeline as it was, also when the failure came after PEFT's injection
                for component in components:
                    if adapter_name in getattr(getattr(self, component), "peft_config", {}):
                        getattr(self, component).delete_adapters(adapter_name)
            raise

    @classmethod
    def load_lora_into_transformer(
        cls,
        state_dict: dict[str, torch.Tensor],
        transformer,
        adapter_name: str | None = None,
        metadata: dict | None = None,
        _pipeline=None,
        low_cpu_mem_usage: bool = False,
        hotswap: bool = False,
    ) -> None:
        """Load an unprefixed PEFT LoRA state dict (with its LoraConfig arguments as `metadata`) into one transformer,
        through the model's `PeftAdapterMixin.load_lora_adapter`."""
        transformer.load_lora_adapter(
            state_dict,
            prefix=None,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=_pipeline,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    def _unused_adapter_name(self) -> str:
        taken = {name for names in self.get_list_adapters().values() for name in names}
        index = len(taken)
        while f"default_{index}" in taken:
            index += 1
        return f"default_{index}"

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.Tensor] | None = None,
        unconditional_transformer_lora_layers: dict[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function=None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: dict | None = None,
        unconditional_transformer_lora_adapter_metadata: dict | None = None,
    ) -> None:
        r"""
        Save LoRA layers of either or both transformers in the diffusers format (`transformer.` /
        `unconditional_transformer.` prefixes), with diffusers' LoRA metadata (the PEFT config, which holds alpha).

        Args:
            save_directory: folder to write `pytorch_lora_weights.safetensors` (or `weight_name`) into.
            transformer_lora_layers, unconditional_transformer_lora_layers: PEFT state dicts
                (`peft.utils.get_peft_model_state_dict(pipe.transformer, adapter_name=...)`).
            transformer_lora_adapter_metadata, unconditional_transformer_lora_adapter_metadata: the adapters'
                `peft_config[name].to_dict()`. Without it the file is read back with alpha = rank, so pass it
                whenever lora_alpha differs from r (`save_lora_adapter` does it for you).
        """
        layers = {
            "transformer": transformer_lora_layers,
            "unconditional_transformer": unconditional_transformer_lora_layers,
        }
        metadata = {
            "transformer": transformer_lora_adapter_metadata,
            "unconditional_transformer": unconditional_transformer_lora_adapter_metadata,
        }
        layers = {component: value for component, value in layers.items() if value}
        if not layers:
            raise ValueError("Pass `transformer_lora_layers` and/or `unconditional_transformer_lora_layers`.")
        storages = set()
        for component, state_dict in layers.items():
            _check_peft_layers(component, state_dict)
            # The same tensors for both transformers (one LoRA on both branches) must be written twice.
            unshared = {}
            for key, tensor in state_dict.items():
                storage = tensor.untyped_storage().data_ptr()
                unshared[key] = tensor.clone() if storage in storages else tensor
                storages.add(storage)
            layers[component] = unshared
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers=layers,
            lora_metadata={component: metadata[component] for component in layers},
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def save_lora_adapter(self, save_directory: str | os.PathLike, adapter_name: str, weight_name: str | None = None):
        """Save one loaded adapter, from whichever transformers hold it, in the diffusers format with its metadata."""
        arguments = {}
        for component in COMPONENTS:
            model = getattr(self, component, None)
            if model is not None and adapter_name in getattr(model, "peft_config", {}):
                arguments[f"{component}_lora_layers"] = get_peft_model_state_dict(model, adapter_name=adapter_name)
                arguments[f"{component}_lora_adapter_metadata"] = model.peft_config[adapter_name].to_dict()
        if not arguments:
            raise ValueError(f"No adapter named {adapter_name!r} is loaded; loaded: {self.get_list_adapters()}.")
        self.save_lora_weights(save_directory, weight_name=weight_name, **arguments)

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        exact_unfuse: bool = True,
        **kwargs,
    ) -> None:
        r"""
        Merge the active adapters (or `adapter_names`) into the weights of both transformers, times `lora_scale`.

        Args:
            components (`list[str]`, *optional*): default both transformers.
            lora_scale (`float`): multiplies the adapters' deltas.
            safe_fusing (`bool`): check the fused weights for NaN first.
            adapter_names (`list[str]`, *optional*): adapters to fuse; default the active ones.
            exact_unfuse (`bool`, defaults to True): keep a CPU copy of every weight about to change, so that
                `unfuse_lora` restores it bit for bit (PEFT's own unmerge subtracts the delta again, which leaves
                rounding residue). Costs CPU memory for the targeted weights; False uses PEFT's subtraction. Either
                way `unfuse_lora` restores every adapter's scaling (diffusers leaves all of them multiplied by
                `lora_scale`), and a weight keeps what its first fuse chose until it is unfused.
        """
        components = list(COMPONENTS) if components is None else components
        fp8 = [
            f"{component}.{name}"
            for component in components
            for name, layer in _named_tuner_layers(getattr(self, component, None))
            if isinstance(base_layer(layer), FP8Linear)
        ]
        if fp8:
            raise ValueError(
                f"`fuse_lora` cannot fold adapters into fp8 weight-only layers: {list_keys(fp8)}. Their weights stay "
                "float8; run the adapters unfused (they apply at run time, `set_adapters` / `attention_kwargs` "
                "scale them), or load the bf16 checkpoint to fuse."
            )
        for component in components:
            model = getattr(self, component, None)
            if model is not None:
                _keep_unfused_state(model, adapter_names, exact=exact_unfuse)
        super().fuse_lora(
            components=components,
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        """Undo `fuse_lora`: weights (and adapter scaling) are restored exactly as they were before fusing."""
        components = list(COMPONENTS) if components is None else components
        unknown = sorted(set(components) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"`components` has {unknown}; LoRA-loadable components are {list(COMPONENTS)}.")
        # Only components with fused layers: PEFT warns for every layer that has nothing to unmerge.
        fused = [c for c in components if any(m.merged for m in _tuner_layers(getattr(self, c, None)))]
        if fused:
            super().unfuse_lora(components=fused, **kwargs)
        for component in components:  # scaling was changed in every LoRA layer, merged or not
            _restore_unfused_state(getattr(self, component, None))


def _check_peft_layers(component: str, state_dict: dict[str, torch.Tensor]) -> None:
    """The layers `save_lora_weights` writes must be an unprefixed PEFT state dict of the diffusers layout."""
    wrong = []
    for key in state_dict:
        suffix = PEFT_DOWN if key.endswith(PEFT_DOWN) else PEFT_UP if key.endswith(PEFT_UP) else None
        if suffix is None or not is_known_module(key[: -len(suffix)], layout="diffusers"):
            wrong.append(key)
    if wrong:
        raise ValueError(
            f"`{component}_lora_layers` must be a PEFT state dict of the transformer "
            f"(`<module>.lora_A.weight` / `.lora_B.weight`, split attention, no prefix), as returned by "
            f"`peft.utils.get_peft_model_state_dict`; these keys are not: {list_keys(wrong)}. Convert other formats with "
            f"`convert_lora_state_dict(..., to='diffusers')`."
        )


def _check_loaded(component: str, model: nn.Module, modules: dict[str, LoraFactors], adapter_name: str) -> None:
    """After PEFT's load: every module of the LoRA carries the adapter (diffusers only warns about leftovers)."""
    found = dict(model.named_modules())
    absent = [
        f"{component}.{name}"
        for name in modules
        if not (isinstance(found.get(name), BaseTunerLayer) and adapter_name in found[name].lora_A)
    ]
    if absent:
        raise ValueError(f"PEFT did not load the whole LoRA: modules without the adapter: {list_keys(absent)}.")


def _named_tuner_layers(model: nn.Module | None) -> list[tuple[str, BaseTunerLayer]]:
    return [] if model is None else [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _tuner_layers(model: nn.Module | None) -> list[BaseTunerLayer]:
    return [layer for _, layer in _named_tuner_layers(model)]


def _keep_unfused_state(model: nn.Module, adapter_names: list[str] | None, exact: bool) -> None:
    """Before fusing: every LoRA layer's scaling (diffusers' fuse rescales all of them by `lora_scale`) and, with
    `exact`, a CPU copy of each weight about to change. A layer keeps the state of the first fuse until unfused."""
    for module in _tuner_layers(model):
        if hasattr(module, _UNFUSED_STATE):
            continue
        wanted = adapter_names if adapter_names is not None else module.active_adapters
        merging = any(adapter in module.lora_A and adapter not in module.merged_adapters for adapter in wanted)
        weight = module.get_base_layer().weight
        copy = weight.detach().to("cpu", copy=True) if exact and merging and weight.is_floating_point() else None
        setattr(module, _UNFUSED_STATE, (copy, dict(module.scaling)))


def _restore_unfused_state(model: nn.Module | None) -> None:
    for module in _tuner_layers(model):
        state = getattr(module, _UNFUSED_STATE, None)
        if state is None or module.merged:
            continue
        copy, scaling = state
        if copy is not None:
            with torch.no_grad():
                module.get_base_layer().weight.copy_(copy)
        module.scaling.update(scaling)
        delattr(module, _UNFUSED_STATE)
