"""Trainers' LoRA key formats beyond diffusers / PEFT and the original layout (SPEC 8, 10), read from each trainer's
own source:

- kohya-style flat names (musubi-tuner, OneTrainer's "kohya" output, LyCORIS' kohya wrapper): `lora_unet_` (LyCORIS'
  own wrapper: `lycoris_`) + the module path with every `.` turned into `_`, then `.lora_down.weight` /
  `.lora_up.weight` / `.alpha` (or LyCORIS factors). The flat name is mapped back through a table of the model's own
  Linear names (original and diffusers layouts), which flatten to distinct strings; it is never split on `_`.
- LyCORIS LoHa (`hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, `alpha`):
  dW = (w1_a w1_b) * (w2_a w2_b) * alpha / r.
- LyCORIS LoKr (`lokr_w1` or `lokr_w1_a` / `lokr_w1_b`, `lokr_w2` or `lokr_w2_a` / `lokr_w2_b`, `alpha`):
  dW = kron(w1, w2) * alpha / r when a factor is decomposed (r its rank), kron(w1, w2) when both are full matrices
  (alpha is then not used, as in LyCORIS; ai-toolkit stores a meaningless 1e10 there, `inf` in float16).
  Any prefix `lora_formats` accepts (`diffusion_model.`, `transformer.`, ...) or a flat one.
Both load through PEFT's own LoHa / LoKr layers (`LoHaConfig` / `LoKrConfig` with per-module `rank_pattern` /
`alpha_pattern`, `inject_adapter_in_model`, `set_peft_model_state_dict`), after a fused `attention.qkv` is split into
q/k/v: exactly, by rows of `w1_a` / `w2_a` for LoHa, and of `w1` for a LoKr whose Kronecker rows split in thirds into a
layout PEFT's LoKr can hold; anything else is refused by name.
"""

import math
import re
from dataclasses import dataclass

import torch
from peft.tuners.lokr.layer import factorization

from .loading import list_keys, raise_problems, split_names
from .lora_formats import (
    BLOCK_MODULES,
    GLOBAL_MODULES,
    ORIGINAL_BLOCK_MODULES,
    PEFT_CONFIG_NAME,
    by_component,
    config_patterns,
    group_factors,
    parse_lora_state_dict,
)


FLAT_PREFIXES = ("lora_unet_", "lycoris_")
LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
ALPHA = "alpha"
# LyCORIS tensors this package does not load: Tucker cores (convolutions only), weight decomposition (DoRA).
REFUSED_LYCORIS = {
    "hada_t1": "LoHa Tucker core",
    "hada_t2": "LoHa Tucker core",
    "lokr_t2": "LoKr Tucker core",
    "dora_scale": "DoRA",
}
LYCORIS_PARTS = {f".{name}": name for name in (*LOHA_TENSORS, *LOKR_TENSORS, ALPHA, *REFUSED_LYCORIS)}
_FLAT_BLOCK = re.compile(r"^layers_(?P<index>\d+)_(?P<module>.+)$")


# --------------------------------------------------------------------------------------------------------------------
# kohya flat names


# Distinct flat names (tests/test_lora_trainers.py counts them): the flat form maps back to exactly one module.
FLAT_GLOBAL_MODULES = {name.replace(".", "_"): name for name in GLOBAL_MODULES}
FLAT_BLOCK_MODULES = {name.replace(".", "_"): name for name in BLOCK_MODULES + ORIGINAL_BLOCK_MODULES}


def unflatten_module(flat: str) -> str | None:
    """`layers_3_attention_qkv` -> `layers.3.attention.qkv`; None when it names no Linear of the model."""
    if flat in FLAT_GLOBAL_MODULES:
        return FLAT_GLOBAL_MODULES[flat]
    match = _FLAT_BLOCK.match(flat)
    if match is None or match["module"] not in FLAT_BLOCK_MODULES:
        return None
    return f"layers.{int(match['index'])}.{FLAT_BLOCK_MODULES[match['module']]}"


# --------------------------------------------------------------------------------------------------------------------
# LoHa and LoKr factors


@dataclass
class LohaFactors:
    """dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r, r the rank (the module docstring has the formats)."""

    w1_a: torch.Tensor  # (out, r)
    w1_b: torch.Tensor  # (r, in)
    w2_a: torch.Tensor  # (out, r)
    w2_b: torch.Tensor  # (r, in)
    alpha: float

    kind = "LoHa"

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    @property
    def out_features(self) -> int:
        return self.w1_a.shape[0]

    @property
    def in_features(self) -> int:
        return self.w1_b.shape[1]

    def rows(self, part: slice) -> "LohaFactors":
        """The factors of rows `part` of dW (rows of the product come from rows of w1_a and w2_a)."""
        return LohaFactors(
            self.w1_a[part].clone(), self.w1_b.clone(), self.w2_a[part].clone(), self.w2_b.clone(), self.alpha
        )

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name.removeprefix("hada_")) for name in LOHA_TENSORS}


@dataclass
class LokrFactors:
    """dW = kron(w1, w2), times alpha / r when a factor is decomposed; each factor full or a product of two
    (a, r) @ (r, c) matrices."""

    w1: tuple[torch.Tensor, ...]  # (a, c), or (a, r) and (r, c)
    w2: tuple[torch.Tensor, ...]  # (b, d), or (b, r) and (r, d)
    alpha: float | None

    kind = "LoKr"

    @property
    def factor_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """((a, c), (b, d)): out = a * b, in = c * d."""
        return tuple((w[0].shape[0], w[-1].shape[1]) for w in (self.w1, self.w2))

    @property
    def out_features(self) -> int:
        (a, _), (b, _) = self.factor_shapes
        return a * b

    @property
    def in_features(self) -> int:
        (_, c), (_, d) = self.factor_shapes
        return c * d

    @property
    def rank(self) -> int | None:
        """The rank of the decomposed factor(s), None when both are full."""
        ranks = {w[0].shape[1] for w in (self.w1, self.w2) if len(w) == 2}
        return ranks.pop() if ranks else None

    def rows(self, part: slice) -> "LokrFactors":
        """The factors of rows `part` of dW, a whole number of w1's rows (kron rows come in a blocks of b): those
        rows of w1 (or w1_a), the same w2."""
        a = self.factor_shapes[0][0]
        rows = slice(part.start * a // self.out_features, part.stop * a // self.out_features)
        return LokrFactors((self.w1[0][rows].clone(), *self.w1[1:]), tuple(w.clone() for w in self.w2), self.alpha)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, w in (("lokr_w1", self.w1), ("lokr_w2", self.w2)):
            tensors.update({name: w[0]} if len(w) == 1 else {f"{name}_a": w[0], f"{name}_b": w[1]})
        return tensors


def is_lycoris(keys) -> bool:
    """Whether a LoRA file holds LyCORIS LoHa / LoKr factors."""
    return any(f".{name}" in key for key in keys for name in (*LOHA_TENSORS, *LOKR_TENSORS))


def parse_lycoris_state_dict(state_dict: dict[str, torch.Tensor], target: str | None = None) -> dict[str, dict]:
    """A LyCORIS LoHa or LoKr state dict -> `{component: {module (diffusers layout): LohaFactors | LokrFactors}}`.

    Raises ValueError naming every key that is not a LoHa / LoKr factor of a Linear of the model, unsupported
    tensors (Tucker cores, DoRA), incomplete or mis-shaped factors, a file mixing LoHa and LoKr, and a fused q/k/v LoKr
    that does not split."""
    pieces, problems = group_factors(state_dict, LYCORIS_PARTS, "LoHa / LoKr")
    refused = [
        f"{key} ({REFUSED_LYCORIS[part]})"
        for parts in pieces.values()
        for part, (key, _) in parts.items()
        if part in REFUSED_LYCORIS
    ]
    if refused:
        problems.append(f"unsupported LyCORIS tensors: {list_keys(refused)}")
    kinds = {
        module: {kind for kind, names in (("LoHa", LOHA_TENSORS), ("LoKr", LOKR_TENSORS)) if names & parts.keys()}
        for module, parts in pieces.items()
    }
    bare = [f"{prefix}{module}" for (prefix, module), found in kinds.items() if not found]
    if bare:
        problems.append(f"modules with an alpha but no LoHa / LoKr factors: {list_keys(bare)}")
    if len(set().union(*kinds.values())) > 1:
        problems.append("the file mixes LoHa and LoKr modules; PEFT holds one adapter kind per adapter")
    raise_problems(
        "The LyCORIS adapter has keys this loader does not understand; nothing was loaded.", problems, ValueError
    )
    return by_component(dict(sorted(pieces.items())), target, _lycoris_factors, "LyCORIS adapter")


def _lycoris_factors(prefix: str, module: str, parts: dict, source: str, problems: list):
    if any(name in parts for name in LOHA_TENSORS):
        return _loha(parts, source, problems)
    return _lokr(module, parts, source, problems)


def _alpha(parts: dict, source: str, problems: list, required: bool) -> float | None:
    if ALPHA not in parts:
        return None
    alpha = parts[ALPHA]
    if alpha.numel() != 1:
        problems.append(f"{source}: alpha must be one number, got shape {list(alpha.shape)}")
        return None
    value = float(alpha.float().item())
    if required and not math.isfinite(value):
        problems.append(f"{source}: alpha is {value}, which scales a decomposed factor; it must be a finite number")
        return None
    return value


def _loha(parts: dict, source: str, problems: list) -> LohaFactors | None:
    missing = [name for name in LOHA_TENSORS if name not in parts]
    if missing:
        problems.append(f"{source} lacks {missing}")
        return None
    w1_a, w1_b, w2_a, w2_b = (parts[name] for name in LOHA_TENSORS)
    shapes_ok = all(t.ndim == 2 for t in (w1_a, w1_b, w2_a, w2_b)) and (
        w1_a.shape[1] == w1_b.shape[0] == w2_a.shape[1] == w2_b.shape[0]
        and w1_a.shape[0] == w2_a.shape[0]
        and w1_b.shape[1] == w2_b.shape[1]
    )
    if not shapes_ok:
        problems.append(
            f"{source}: LoHa factors {[list(t.shape) for t in (w1_a, w1_b, w2_a, w2_b)]} are not (out, r), (r, in), "
            "(out, r), (r, in) with one rank"
        )
        return None
    alpha = _alpha(parts, source, problems, required=True)
    if ALPHA in parts and alpha is None:
        return None
    return LohaFactors(w1_a, w1_b, w2_a, w2_b, float(w1_b.shape[0]) if alpha is None else alpha)


def _lokr(module: str, parts: dict, source: str, problems: list) -> LokrFactors | None:
    factors = []
    for name in ("lokr_w1", "lokr_w2"):
        full, down, up = parts.get(name), parts.get(f"{name}_a"), parts.get(f"{name}_b")
        if (full is None) == (down is None and up is None) or (down is None) != (up is None):
            problems.append(f"{source} needs either `{name}` or both `{name}_a` and `{name}_b`")
            return None
        factor = (full,) if full is not None else (down, up)
        if any(t.ndim != 2 for t in factor) or (len(factor) == 2 and down.shape[1] != up.shape[0]):
            problems.append(
                f"{source}: `{name}` factors {[list(t.shape) for t in factor]} are not matrices (a, r), (r, c)"
            )
            return None
        factors.append(factor)
    lokr = LokrFactors(factors[0], factors[1], None)
    if len(factors[0]) == 2 and len(factors[1]) == 2 and factors[0][0].shape[1] != factors[1][0].shape[1]:
        problems.append(f"{source}: the two decomposed LoKr factors have different ranks")
        return None
    decomposed = lokr.rank is not None
    alpha = _alpha(parts, source, problems, required=decomposed)
    if decomposed and ALPHA in parts and alpha is None:
        return None
    (a, _), (b, _) = lokr.factor_shapes
    if a % len(split_names(module) or (module,)):
        problems.append(
            f"{source}: a LoKr on the fused q/k/v whose Kronecker rows ({a} blocks of {b}) do not split in thirds; "
            "it cannot be split into the q/k/v projections"
        )
        return None
    # LyCORIS: without alpha the scale is 1 (alpha = rank); with both factors full alpha is not used.
    lokr.alpha = (alpha if alpha is not None else float(lokr.rank)) if decomposed else None
    return lokr


# --------------------------------------------------------------------------------------------------------------------
# Through PEFT


def _lokr_layout(modules: dict[str, LokrFactors]) -> tuple[dict, list[str]]:
    """PEFT LoKrConfig arguments that make PEFT build exactly the file's factor shapes (PEFT derives them from one
    `decompose_factor`, one `decompose_both` flag and each module's rank) -> (arguments, problems)."""
    shapes = {name: f.factor_shapes for name, f in modules.items()}
    candidates = [-1, *sorted({a for (a, _), _ in shapes.values()} | {c for (_, c), _ in shapes.values()})]
    fitting = (
        f
        for f in candidates
        if all(
            factorization(a * b, f) == (a, b) and factorization(c * d, f) == (c, d)
            for (a, c), (b, d) in shapes.values()
        )
    )
    factor = next(fitting, None)
    if factor is None:
        layouts = {name: f"{a}x{b} rows, {c}x{d} columns" for name, ((a, c), (b, d)) in shapes.items()}
        return {}, [f"no single LoKr factorization gives these Kronecker factors (PEFT needs one): {layouts}"]
    decompose_both = any(len(m.w1) == 2 for m in modules.values())
    ranks, alphas, problems = {}, {}, []
    for name, m in modules.items():
        (a, c), (b, d) = m.factor_shapes
        rank = m.rank if m.rank is not None else max(a, b, c, d)
        peft_w1_full = not (decompose_both and rank < max(a, c) / 2)
        peft_w2_full = not rank < max(b, d) / 2
        if (peft_w1_full, peft_w2_full) != (len(m.w1) == 1, len(m.w2) == 1):
            problems.append(
                f"`{name}`: PEFT's LoKr would store w1 {'full' if peft_w1_full else 'decomposed'} and w2 "
                f"{'full' if peft_w2_full else 'decomposed'} at rank {rank}, the file does otherwise"
            )
        ranks[name] = rank
        alphas[name] = rank if m.rank is None else m.alpha  # both full: scale 1
    arguments = {"decompose_both": decompose_both, "decompose_factor": factor}
    return {"ranks": ranks, "alphas": alphas, **arguments}, problems


def lycoris_config(modules: dict):
    """The PEFT `LoHaConfig` / `LoKrConfig` of one component's LyCORIS modules (ranks and alphas per module)."""
    from peft import LoHaConfig, LoKrConfig

    if all(isinstance(m, LohaFactors) for m in modules.values()):
        config_class = LoHaConfig
        extra = {"ranks": {name: m.rank for name, m in modules.items()}}
        extra["alphas"] = {name: m.alpha for name, m in modules.items()}
    else:
        config_class, (extra, problems) = LoKrConfig, _lokr_layout(modules)
        raise_problems("The LoKr cannot be loaded into PEFT's LoKr layers; nothing was loaded.", problems, ValueError)
    kwargs = config_patterns(extra.pop("ranks"), extra.pop("alphas"))
    kwargs["alpha"] = kwargs.pop("lora_alpha")
    return config_class(**kwargs, **extra)


def parse_adapter_state_dict(
    state_dict: dict[str, torch.Tensor], metadata: dict | None = None, target: str | None = None
) -> dict[str, dict]:
    """Any adapter file this package reads -> `{component: {module: LoraFactors | LohaFactors | LokrFactors}}`:
    LyCORIS LoHa / LoKr (`parse_lycoris_state_dict`) or LoRA (`lora_formats.parse_lora_state_dict`)."""
    if is_lycoris(state_dict):
        if metadata:  # PEFT's alpha for LoHa / LoKr lives there; reading only the tensors would load another scale
            raise ValueError(
                f"This LoHa / LoKr adapter comes with PEFT metadata ({PEFT_CONFIG_NAME} or `metadata=`: "
                f"{sorted(metadata)[:6]}), which the LyCORIS loader does not apply: it reads alpha from each module's "
                "`.alpha` tensor. Nothing was loaded. Store the adapter in LyCORIS form (an `<module>.alpha` tensor "
                "per module), or apply it with PEFT itself."
            )
        return parse_lycoris_state_dict(state_dict, target)
    return parse_lora_state_dict(state_dict, metadata, target)
