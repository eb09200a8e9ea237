"""Make the unconditional LoRA from the two transformers (SPEC 10): truncated SVD of (unconditional - conditional).

For every Linear of the released layout (fused `attention.qkv`, `attention.o`, the feed-forward, the modulations, the
global Linears) the difference D = W_unconditional - W_conditional is computed in float32 and split by a truncated SVD
into LoRA factors, `up = U_r sqrt(S_r)`, `down = sqrt(S_r) V_r^T` (alpha = r: scale 1), at a fixed rank or, per layer,
the smallest rank whose truncation error meets `max_rel_error`. The relative Frobenius error of each layer,
||D - up @ down|| / ||D|| with the factors as stored, and the total over all layers go into the report and into the
file's metadata.

Tensors outside the Linears' weights (RMSNorm and embedding weights, Linear biases) cannot be LoRA factors. Every one
that differs is reported and either stored as a float32 difference, `<module>.diff` / `<module>.diff_b` (ComfyUI's
names), which `load_unconditional_lora` adds in the unconditional pass, or refused by name (`non_linear="refuse"`).
`llm_cond_norm` and `llm_cond_proj` are left out, and said so: they act on text features, which the unconditional pass
never has.

The output is ai-toolkit's format, as the published unconditional LoRA uses it: `diffusion_model.` keys, fused
attention, lora_down / lora_up / alpha. The sources are read one module at a time, from either layout and from the fp8
release (dequantized), through the same header-checked plans as the converter (`conversion`): never both transformers,
nor one whole transformer, in memory. The file is checked by reading its bytes back before it is written, atomically.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers.utils.logging import tqdm as diffusers_tqdm
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .conversion import (
    TRANSFORMER_COMPONENTS,
    WRITTEN_DTYPES,
    ConversionPlan,
    Recipe,
    _cast,
    _check_choice,
    _checked_transformer,
    _Reader,
    _same_bits,
    resolve_source,
)
from .files import check_output_path, write_atomically
from .fp8 import SCALE_SUFFIX, linear_weight_keys
from .loading import fused_name, list_keys, open_safetensors, original_key_plan, split_names
from .lora_formats import ALPHA_SUFFIX, ORIGINAL_DOWN, ORIGINAL_PREFIXES, ORIGINAL_UP, parse_lora_state_dict
from .transformer_ideogram4 import Ideogram4Transformer2DModel
from .validation import finite_float, require_positive_int


PREFIX = ORIGINAL_PREFIXES["transformer"]  # `diffusion_model.`: ai-toolkit's keys for "the denoiser"
NON_LINEAR_CHOICES = ("store", "refuse")
DTYPES = WRITTEN_DTYPES  # of the LoRA factors
# Modules only the conditional pass runs: they project the text features, which the unconditional pass never has.
TEXT_ONLY_MODULES = ("llm_cond_norm", "llm_cond_proj")
TEXT_ONLY_REASON = "acts on text features, which the unconditional pass never has"
# The file's metadata key holding the report (JSON).
METADATA_KEY = "ideogram4_unconditional_lora"


@dataclass
class LayerReport:
    module: str  # original-layout name
    shape: tuple[int, int]  # (out, in)
    rank: int  # 0: the two weights are identical, no factors
    rel_error: float  # ||D - up @ down||_F / ||D||_F, factors as stored
    diff_norm: float  # ||D||_F

    @property
    def abs_error(self) -> float:
        return self.rel_error * self.diff_norm


@dataclass
class ExtractionReport:
    """What an extraction wrote: each layer's rank and error, the weight differences, what was left out."""

    source: str
    output: str
    rank: int | None
    max_rel_error: float | None
    dtype: str
    layers: list[LayerReport] = field(default_factory=list)
    weight_diffs: dict[str, float] = field(default_factory=dict)  # stored key -> ||d|| / ||w_unconditional||
    left_out: dict[str, str] = field(default_factory=dict)  # tensor -> why
    num_bytes: int = 0

    @property
    def total_rel_error(self) -> float:
        """sqrt(sum of squared layer errors) / sqrt(sum of squared ||D||), over every Linear."""
        norm = math.sqrt(sum(layer.diff_norm**2 for layer in self.layers))
        return math.sqrt(sum(layer.abs_error**2 for layer in self.layers)) / norm if norm else 0.0

    def metadata(self) -> dict:
        return {
            "source": self.source,
            "rank": self.rank,
            "max_rel_error": self.max_rel_error,
            "dtype": self.dtype,
            "total_rel_error": self.total_rel_error,
            "layers": {layer.module: {"rank": layer.rank, "rel_error": layer.rel_error} for layer in self.layers},
            "weight_diffs": self.weight_diffs,
            "left_out": self.left_out,
        }

    def summary(self) -> str:
        lines = [
            f"{self.source} -> {self.output}: unconditional LoRA, ai-toolkit format, {self.dtype}, "
            f"{self.num_bytes / 1e6:.1f} MB",
            "",
            "| module | shape | rank | rel. error |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {layer.module} | {layer.shape[0]}x{layer.shape[1]} | {layer.rank} | {layer.rel_error:.3e} |"
            for layer in self.layers
        ]
        ranks = [layer.rank for layer in self.layers]
        lines += [
            "",
            f"total relative Frobenius error {self.total_rel_error:.3e} over {len(self.layers)} Linears "
            f"(ranks {min(ranks)}..{max(ranks)})",
        ]
        if self.weight_diffs:
            shown = list_keys(f"{key} ({value:.2e})" for key, value in self.weight_diffs.items())
            lines.append(
                f"stored {len(self.weight_diffs)} non-Linear differences as float32 `.diff` / `.diff_b` tensors "
                f"(||d|| / ||w||): {shown}"
            )
        lines += [f"left out: {key}: {why}" for key, why in sorted(self.left_out.items())]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# The math, one layer


def choose_rank(singular_values: torch.Tensor, rank: int | None, max_rel_error: float | None) -> int:
    """The rank to keep of a difference with these singular values (descending): `rank`, or the smallest rank whose
    truncation error sqrt(sum of the dropped S^2) is at most `max_rel_error` x ||D|| (capped at `rank` when both)."""
    full = singular_values.numel()
    if max_rel_error is None:
        return min(rank, full)
    squares = singular_values.double() ** 2
    tail = squares.flip(0).cumsum(0).flip(0).sqrt()  # tail[r]: the error of keeping r values, r < full
    norm = float(tail[0]) if full else 0.0
    within = (tail <= max_rel_error * norm).nonzero()
    chosen = int(within[0]) if within.numel() else full
    return chosen if rank is None else min(chosen, rank)


def lora_factors(
    difference: torch.Tensor, norm: float, rank: int | None, max_rel_error: float | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down (r, in), up (out, r), relative error of `up @ down` as stored in `dtype`) of a float32 difference whose
    Frobenius norm is `norm`."""
    U, S, Vh = torch.linalg.svd(difference, full_matrices=False)
    keep = choose_rank(S, rank, max_rel_error)
    root = S[:keep].sqrt()
    up = (U[:, :keep] * root).to(dtype)
    down = (root[:, None] * Vh[:keep]).to(dtype)
    error = float(torch.linalg.matrix_norm(difference - up.float() @ down.float()))
    return down.cpu(), up.cpu(), error / norm


# --------------------------------------------------------------------------------------------------------------------
# Reading both transformers, a module at a time


def _weight_recipes(plan: ConversionPlan, name: str) -> dict[str, Recipe]:
    """Each model tensor of a transformer folder (diffusers-layout keys, either source layout), as float32 recipes:
    fp8 weights dequantized with their row scales."""
    recipes, _ = _checked_transformer(plan, name, original_key_plan)
    return {
        key: _cast(recipe, torch.float32, recipes.get(key + "_scale"))
        for key, recipe in recipes.items()
        if not key.endswith(SCALE_SUFFIX)
    }


def _linear_modules(config: dict) -> dict[str, tuple[str, ...]]:
    """Original-layout Linear -> the diffusers-layout weight keys its rows come from, in row order (model order)."""
    with init_empty_weights():
        model = Ideogram4Transformer2DModel.from_config(config)
    modules = {}
    for key in linear_weight_keys(model):
        fused = fused_name(key)
        module = fused[0] if fused else key
        modules.setdefault(module.removesuffix(".weight"), split_names(module) or (module,))
    return modules


def _module_of(key: str) -> str:
    return key.rpartition(".")[0]


def extract_unconditional_lora(
    source,
    output,
    rank: int | None = None,
    max_rel_error: float | None = None,
    *,
    dtype: str = "bf16",
    non_linear: str = "store",
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    revision: str | None = None,
    token: str | None = None,
    progress: bool = True,
) -> ExtractionReport:
    r"""
    Write the unconditional LoRA of an Ideogram 4 repo: `pipe.load_unconditional_lora(output)` then computes the
    unconditional pass on the conditional transformer.

    Args:
        source: a folder or hub repo id with `transformer/` and `unconditional_transformer/` (either layout, bf16 /
            fp32 or the fp8 release; never nf4).
        output: the `.safetensors` file to write.
        rank (`int`, *optional*): the rank of every layer; with `max_rel_error`, the highest rank a layer may get.
        max_rel_error (`float`, *optional*): per layer, the smallest rank whose truncation error is at most this
            fraction of ||D||, in (0, 1).
        dtype (`str`, defaults to "bf16"): "bf16" or "fp32" for the factors (the reported errors include the rounding).
        non_linear (`str`, defaults to "store"): what to do with non-Linear tensors that differ: "store" them as
            float32 differences, or "refuse" (a ValueError naming them, before any SVD).
        device: where the SVDs run ("cuda" is much faster for the full-size model).
        overwrite (`bool`): replace an existing `output`.
        revision, token: for a hub repo.
        progress (`bool`): a progress bar over the layers.

    Returns the `ExtractionReport` (also in the file's metadata under "ideogram4_unconditional_lora").
    """
    if rank is None and max_rel_error is None:
        raise ValueError("Pass `rank` (every layer), `max_rel_error` (rank per layer), or both (a cap on the rank).")
    if rank is not None:
        require_positive_int("rank", rank)
    if max_rel_error is not None:
        max_rel_error = finite_float("max_rel_error", max_rel_error)
        if not 0 < max_rel_error < 1:
            raise ValueError(
                f"`max_rel_error={max_rel_error}` must be in (0, 1): the error allowed per layer, as a fraction of "
                "||unconditional - conditional||."
            )
    _check_choice("dtype", dtype, DTYPES)
    _check_choice("non_linear", non_linear, NON_LINEAR_CHOICES)
    device = torch.device(device)
    output = Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"`output={str(output)!r}` must be a `.safetensors` file.")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass `overwrite=True` (`--overwrite`) to replace it.")
    check_output_path(output)

    root = resolve_source(source, TRANSFORMER_COMPONENTS, revision, token)
    missing = [name for name in TRANSFORMER_COMPONENTS if not (root / name).is_dir()]
    if missing:
        raise ValueError(f"{source} has no {missing} folder; the extraction needs both transformers.")
    plan = ConversionPlan("extract", str(source), root, list(TRANSFORMER_COMPONENTS), dtype)
    conditional, unconditional = (_weight_recipes(plan, name) for name in TRANSFORMER_COMPONENTS)
    shapes = [{key: recipe.shape for key, recipe in recipes.items()} for recipes in (conditional, unconditional)]
    if shapes[0] != shapes[1]:
        differing = sorted(k for k in shapes[0].keys() | shapes[1].keys() if shapes[0].get(k) != shapes[1].get(k))
        raise ValueError(
            f"The two transformers of {source} are not the same architecture: {list_keys(differing)} differ."
        )
    modules = _linear_modules(Ideogram4Transformer2DModel.load_config(root / TRANSFORMER_COMPONENTS[0]))
    linear_keys = {key for keys in modules.values() for key in keys}
    report = ExtractionReport(str(source), str(output), rank, max_rel_error, dtype)
    tensors = {}
    with _Reader() as reader:
        # 1. Everything that is not a Linear weight (small): differences stored, or refused, before any SVD.
        differing = {}
        for key in sorted(set(conditional) - linear_keys):
            if _module_of(key) in TEXT_ONLY_MODULES:
                report.left_out[key] = TEXT_ONLY_REASON
                continue
            difference = reader.tensor(unconditional[key]) - reader.tensor(conditional[key])
            if bool(difference.any()):
                differing[key] = difference
        if differing and non_linear == "refuse":
            raise ValueError(
                f"The transformers differ in tensors that are not Linear weights: {list_keys(differing)}. A LoRA "
                "cannot hold them; pass `non_linear='store'` (`--non-linear store`) to store them as float32 "
                "differences, which `load_unconditional_lora` applies in the unconditional pass. Nothing was written."
            )
        for key, difference in differing.items():
            stored = PREFIX + _module_of(key) + (".diff_b" if key.endswith(".bias") else ".diff")
            tensors[stored] = difference.contiguous()
            norm = float(reader.tensor(unconditional[key]).norm())
            report.weight_diffs[stored] = float(difference.norm()) / norm if norm else math.inf

        # 2. Each Linear: D in float32 on `device`, its SVD, factors kept on the CPU.
        bar = diffusers_tqdm(total=len(modules), unit="layer", desc="Extracting", disable=not progress)
        with bar:
            for module, keys in modules.items():
                bar.update(1)
                if module in TEXT_ONLY_MODULES:
                    report.left_out[module + ".weight"] = TEXT_ONLY_REASON
                    continue
                weights = [
                    torch.cat([reader.tensor(recipes[key]) for key in keys]).to(device)
                    for recipes in (conditional, unconditional)
                ]
                difference = weights[1] - weights[0]
                del weights
                norm = float(torch.linalg.matrix_norm(difference))
                shape = tuple(difference.shape)
                if norm == 0:
                    report.layers.append(LayerReport(module, shape, 0, 0.0, 0.0))
                    continue
                down, up, error = lora_factors(difference, norm, rank, max_rel_error, DTYPES[dtype])
                del difference
                tensors[PREFIX + module + ORIGINAL_DOWN] = down.contiguous()
                tensors[PREFIX + module + ORIGINAL_UP] = up.contiguous()
                tensors[PREFIX + module + ALPHA_SUFFIX] = torch.tensor(float(down.shape[0]))
                report.layers.append(LayerReport(module, shape, down.shape[0], error, norm))
    if not any(key.endswith(ORIGINAL_DOWN) for key in tensors):
        raise ValueError(
            f"The two transformers of {source} have identical Linear weights: there is no unconditional LoRA to "
            "extract (a CFG-distilled or duplicated repo?). Nothing was written."
        )

    # 3. The file: its bytes read back and parsed as an unconditional LoRA before they are written, atomically.
    metadata = {"format": "pt", METADATA_KEY: json.dumps(report.metadata(), sort_keys=True)}
    data = save_safetensors_bytes(tensors, metadata=metadata)
    _verify(data, tensors)
    write_atomically(output, data)
    report.num_bytes = len(data)
    return report


def _verify(data: bytes, tensors: dict[str, torch.Tensor]) -> None:
    """The serialized bytes hold exactly `tensors`, bit for bit, and parse as a LoRA with weight differences."""
    from .unconditional_lora import split_weight_diffs

    read = load_safetensors_bytes(data)
    if read.keys() != tensors.keys() or not all(_same_bits(read[key], value) for key, value in tensors.items()):
        raise RuntimeError("The serialized unconditional LoRA does not read back to its tensors; nothing was written.")
    lora, _ = split_weight_diffs(read)
    parse_lora_state_dict(lora, None, "unconditional_transformer")


def read_extraction_report(path) -> dict | None:
    """The report an extraction stored in a LoRA file's metadata, or None."""
    with open_safetensors(path) as handle:
        raw = (handle.metadata() or {}).get(METADATA_KEY)
    return None if raw is None else json.loads(raw)
