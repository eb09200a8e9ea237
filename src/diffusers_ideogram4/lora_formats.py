"""LoRA key formats for Ideogram 4 (SPEC 8): parsing any supported file into one form, and writing it back out.

Published Ideogram 4 LoRAs come in two key formats, told apart here by their keys:
- diffusers / PEFT: `<module>.lora_A.weight` (down, (rank, in)) and `<module>.lora_B.weight` (up, (out, rank)) on the
  split attention (`attention.to_q/to_k/to_v/to_out.0`); alpha lives in diffusers' LoRA metadata (none: alpha = rank).
- original (ai-toolkit, kohya-style trainers): `lora_down.weight`, `lora_up.weight` and a scalar `alpha` on the fused
  attention (`attention.qkv`, rows [q; k; v], and `attention.o`).
Key prefixes: `transformer.`, `diffusion_model.`, `base_model.model.` or none name "the denoiser" (the conditional
transformer unless `target` says otherwise); `conditional_transformer.` and `unconditional_transformer.` name a branch.

kohya flat names (`lora_unet_layers_0_attention_qkv.lora_down.weight`) and LyCORIS LoHa / LoKr are read by
`diffusers_ideogram4.lora_trainers`. Every LoRA file is parsed into one form,
`{component: {module (diffusers layout): LoraFactors}}`. A per-module `alpha` tensor
(kohya style) is folded into the up factor (scale 1); alpha given as PEFT metadata stays a scale, which the diffusers
format carries as `lora_alpha` / `alpha_pattern` (the tensors are passed on unchanged). A fused qkv LoRA splits
exactly: the down matrix is shared by q, k and v, the up matrix is cut in row thirds. Keys that are not understood
raise a ValueError that names them; nothing is skipped. Loading into the transformers is `diffusers_ideogram4.lora`.
"""

import json
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft.utils.other import get_pattern_key
from safetensors.torch import save as save_safetensors_bytes

from .constants import FUSED_TO_SPLIT
from .files import write_atomically
from .loading import fused_groups, key_problems, list_keys, open_safetensors, raise_problems, split_names


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

PEFT_DOWN, PEFT_UP = ".lora_A.weight", ".lora_B.weight"
ORIGINAL_DOWN, ORIGINAL_UP = ".lora_down.weight", ".lora_up.weight"
ALPHA_SUFFIX = ".alpha"
# The endings of plain LoRA tensor names, and which part of a module's factors each one holds.
LORA_PARTS = {PEFT_DOWN: "down", ORIGINAL_DOWN: "down", PEFT_UP: "up", ORIGINAL_UP: "up", ALPHA_SUFFIX: "alpha"}

# The Linear layers of the model (SPEC 2.1), per block and global; the original layout fuses the attention.
UNCHANGED_BLOCK_MODULES = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaln_modulation")
BLOCK_MODULES = (*(split for parts in FUSED_TO_SPLIT.values() for split in parts), *UNCHANGED_BLOCK_MODULES)
ORIGINAL_BLOCK_MODULES = (*FUSED_TO_SPLIT, *UNCHANGED_BLOCK_MODULES)
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
    "lokr_": "LoKr (`load_lora_weights` loads it; it has no LoRA form to convert to)",
    "hada_": "LoHa (`load_lora_weights` loads it; it has no LoRA form to convert to)",
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


@dataclass
class LoraFactors:
    """One LoRA'd Linear: its weight changes by `scale * up @ down`."""

    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank)
    scale: float = 1.0  # alpha / rank

    kind = "LoRA"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def alpha(self) -> float:
        return self.scale * self.rank

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    def rows(self, part: slice) -> "LoraFactors":
        """The factors of rows `part` of the delta: the down factor copied (safetensors refuses to write tensors that
        share memory), those rows of up."""
        return LoraFactors(self.down.clone(), self.up[part].clone(), self.scale)

    def folded(self) -> "LoraFactors":
        """The same delta at scale 1: `up * scale` (computed in float32, stored in up's dtype)."""
        if self.scale == 1.0:
            return self
        return LoraFactors(self.down, (self.up.float() * self.scale).to(self.up.dtype))


# --------------------------------------------------------------------------------------------------------------------
# Parsing any format into {component: {module: LoraFactors}}


def is_known_module(name: str, diffusers_layout_only: bool = False) -> bool:
    """Whether `name` is a Linear of the Ideogram 4 transformer, in the diffusers or original layout."""
    if name in GLOBAL_MODULES:
        return True
    match = _BLOCK_MODULE.match(name)
    allowed = BLOCK_MODULES if diffusers_layout_only else BLOCK_MODULES + ORIGINAL_BLOCK_MODULES
    return match is not None and match["module"] in allowed


def split_prefix(key: str) -> tuple[str, str]:
    """`unconditional_transformer.layers.0...` -> (`unconditional_transformer.`, `layers.0...`); no prefix: ("", key).
    kohya flat names come back dotted: `lora_unet_layers_0_attention_qkv.alpha` -> (`lora_unet_`, `layers.0...`); a
    flat name that names no module is left as it is (then reported as an unknown module)."""
    from .lora_trainers import FLAT_PREFIXES, unflatten_module  # builds on this module

    for prefix in (*BRANCH_PREFIXES, *GENERIC_PREFIXES, *FLAT_PREFIXES):
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            if prefix in FLAT_PREFIXES:
                flat, dot, tail = rest.partition(".")
                rest = (unflatten_module(flat) or flat) + dot + tail
            return prefix, rest
    return "", key


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
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(
            f"{source}: the LoRA metadata gives `{module}` the alpha {alpha!r}; it must be a finite number."
        )
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


def split_fused(module: str, factors, source: str, problems: list) -> dict:
    """Original-layout module -> diffusers-layout module(s): `attention.o` renamed, a fused q/k/v cut in row thirds
    (`factors.rows`). LoRA, LoHa and LoKr factors alike."""
    names = split_names(module) or (module,)
    if len(names) == 1:
        return {names[0]: factors}
    if factors.out_features % len(names):
        problems.append(f"{source}: a fused q/k/v factor needs 3 x hidden rows, got {factors.out_features}")
        return {}
    rows = factors.out_features // len(names)
    return {name: factors.rows(slice(i * rows, (i + 1) * rows)) for i, name in enumerate(names)}


def group_factors(state_dict: dict[str, torch.Tensor], parts: dict[str, str], kind: str) -> tuple[dict, list[str]]:
    """An adapter's tensors -> ({(key prefix, module): {part: (key, tensor)}}, problems), `parts` mapping the endings
    of tensor names to the part each holds. The problems name every key without such an ending, for a module that is
    not a Linear of the model, or whose part is given twice."""
    pieces = defaultdict(dict)
    not_factors, unknown_module, repeated = [], [], []
    for key, tensor in state_dict.items():
        prefix, rest = split_prefix(key)
        suffix = next((suffix for suffix in parts if rest.endswith(suffix)), None)
        if suffix is None:
            not_factors.append(key)
            continue
        module, part = rest[: -len(suffix)], parts[suffix]
        if not is_known_module(module):
            unknown_module.append(key)
        elif part in pieces[prefix, module]:
            repeated.append(f"{key} (and {pieces[prefix, module][part][0]})")
        else:
            pieces[prefix, module][part] = (key, tensor)
    labelled = {
        f"keys that are not {kind} factors": not_factors,
        "keys for modules that are not Linear layers of an Ideogram 4 transformer": unknown_module,
        "factors given twice": repeated,
    }
    return pieces, key_problems(labelled)


def by_component(pieces: dict, target: str | None, factors_of, kind: str) -> dict[str, dict]:
    """Grouped tensors (`group_factors`) -> `{component: {module (diffusers layout): factors}}`, each module's factors
    made by `factors_of(prefix, module, {part: tensor}, source, problems)` (None when malformed) and split
    (`split_fused`). Raises a ValueError listing every problem, a module given twice included."""
    components = _resolve_components({prefix for prefix, _ in pieces}, target)
    parsed, problems = defaultdict(dict), []
    for (prefix, module), parts in pieces.items():
        source = f"`{prefix}{module}`"
        tensors = {part: tensor for part, (_, tensor) in parts.items()}
        factors = factors_of(prefix, module, tensors, source, problems)
        if factors is None:
            continue
        component = components[prefix]
        for name, split in split_fused(module, factors, source, problems).items():
            if name in parsed[component]:
                problems.append(f"`{component}.{name}` is given twice (again by {source})")
            parsed[component][name] = split
    raise_problems(f"The {kind} is malformed; nothing was loaded.", problems, ValueError)
    return dict(parsed)


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
    pieces, problems = group_factors(state_dict, LORA_PARTS, "LoRA")
    raise_problems("The LoRA has keys this loader does not understand; nothing was loaded.", problems, ValueError)

    key_prefixes = {prefix for prefix, _ in pieces}
    metadata_by_prefix = defaultdict(dict)  # `transformer.r`, `unconditional_transformer.lora_alpha`, or unprefixed
    for key, value in (metadata or {}).items():
        prefix, name = split_prefix(key)
        metadata_by_prefix[prefix][name] = value
    if set(metadata_by_prefix) == {""}:  # one unprefixed PEFT config: it describes every key
        metadata_by_prefix = dict.fromkeys(key_prefixes, metadata_by_prefix[""])
    unmatched = sorted(set(metadata_by_prefix) - key_prefixes)
    if unmatched:
        raise ValueError(
            f"The LoRA metadata is for key prefixes {unmatched}, but the LoRA's keys have {sorted(key_prefixes)}; "
            "its alpha would be lost. Pass metadata whose prefixes match the keys (or unprefixed PEFT config)."
        )

    def factors_of(prefix, module, parts, source, problems) -> LoraFactors | None:
        if "down" not in parts or "up" not in parts:
            absent = "up (lora_B / lora_up)" if "up" not in parts else "down (lora_A / lora_down)"
            problems.append(f"{source} has no {absent} factor")
            return None
        down, up = parts["down"], parts["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            problems.append(
                f"{source}: down {list(down.shape)} and up {list(up.shape)} are not (rank, in), (out, rank)"
            )
            return None
        if not (down.is_floating_point() and up.is_floating_point()):
            problems.append(f"{source}: factors must be floating point, got {down.dtype} and {up.dtype}")
            return None
        config = metadata_by_prefix.get(prefix)
        if "alpha" in parts:
            alpha = parts["alpha"]
            if alpha.numel() != 1 or not math.isfinite(float(alpha.flatten()[0])):
                problems.append(f"{source}: alpha must be one finite number, got {alpha.tolist()}")
                return None
            if config:
                problems.append(f"{source} has both an `alpha` key and LoRA metadata; give alpha one way only")
                return None
            # kohya style: folded into the up factor, so that the file's tensors alone carry the delta
            return LoraFactors(down, up, float(alpha.item()) / down.shape[0]).folded()
        if config:
            return LoraFactors(down, up, _scale_from_metadata(config, module, down.shape[0], source))
        return LoraFactors(down, up)

    return by_component(pieces, target, factors_of, "LoRA")


# --------------------------------------------------------------------------------------------------------------------
# Writing: PEFT / diffusers format and the original format


def lora_config_kwargs(modules: dict[str, LoraFactors]) -> dict:
    """PEFT `LoraConfig` arguments of the factors (`config_patterns`)."""
    return config_patterns(
        {name: f.rank for name, f in modules.items()}, {name: f.alpha for name, f in modules.items()}
    )


def config_patterns(ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    """PEFT config arguments (`LoraConfig`' names) of per-module ranks and alphas: the most common rank and alpha,
    every other one as a pattern."""

    def common_and_patterns(values: dict[str, float]) -> tuple[float, dict]:
        common = Counter(values.values()).most_common(1)[0][0]
        # PEFT matches pattern keys as regexes against the end of the module name; `^` pins them to the whole name.
        return common, {f"^{re.escape(name)}": value for name, value in sorted(values.items()) if value != common}

    rank, rank_pattern = common_and_patterns(ranks)
    alpha, alpha_pattern = common_and_patterns(alphas)
    return {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": sorted(ranks),
    }


def peft_state_dict(modules: dict[str, LoraFactors]) -> dict[str, torch.Tensor]:
    """`{module}.lora_A.weight` / `.lora_B.weight`, without prefix; alpha goes with `lora_config_kwargs`."""
    return {
        name + suffix: tensor.contiguous()
        for name, factors in sorted(modules.items())
        for suffix, tensor in ((PEFT_DOWN, factors.down), (PEFT_UP, factors.up))
    }


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
    which gives the same delta at the summed rank.
    """
    fused, groups = fused_groups(modules)
    for name, parts in groups.items():
        present = [part for part in parts if part is not None]
        first = present[0]
        if len(parts) == 1:  # to_out.0 -> attention.o
            fused[name] = first
        elif len(present) == 3 and all(
            torch.equal(p.down, first.down) and p.scale == first.scale and p.up.dtype == first.up.dtype
            for p in present
        ):
            fused[name] = LoraFactors(first.down, torch.cat([p.up for p in present]), first.scale)
        else:
            rows = first.up.shape[0]
            up = first.up.new_zeros(3 * rows, sum(p.rank for p in present))
            column = 0
            for index, part in enumerate(parts):
                if part is not None:
                    part = part.folded()
                    up[index * rows : (index + 1) * rows, column : column + part.rank] = part.up
                    column += part.rank
            fused[name] = LoraFactors(torch.cat([p.down for p in present]), up)
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
        to: "diffusers" (PEFT keys, `transformer.` / `unconditional_transformer.` prefixes, a kohya alpha folded, a
            PEFT alpha in the metadata) or "original" (`diffusion_model.` prefix, fused attention, lora_down / lora_up
            / alpha).
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
    with open_safetensors(path) as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        raw = (handle.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
    return tensors, json.loads(raw) if raw else None


def write_lora_file(
    path: str | os.PathLike, state_dict: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    """Write a LoRA safetensors file, with diffusers' LoRA metadata in its header when given; serialized in memory,
    then written completely or not at all (`files.write_atomically`)."""
    header = {"format": "pt"}
    if metadata:
        header[LORA_ADAPTER_METADATA_KEY] = json.dumps(metadata, indent=2, sort_keys=True)
    write_atomically(
        path, save_safetensors_bytes({key: value.contiguous() for key, value in state_dict.items()}, metadata=header)
    )


def convert_lora_file(input_path, output_path, to: str, target: str | None = None) -> dict[str, torch.Tensor]:
    """Convert a LoRA safetensors file to the "diffusers" or "original" format; returns the written tensors."""
    state_dict, metadata = read_lora_file(input_path)
    converted, converted_metadata = convert_lora_state_dict(state_dict, to=to, metadata=metadata, target=target)
    write_lora_file(output_path, converted, converted_metadata)
    return converted
