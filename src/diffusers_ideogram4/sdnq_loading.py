"""SDNQ checkpoints (SD.Next's quantization engine, the `sdnq` package), such as `Disty0/Ideogram-4-SDNQ-FP8`.

A component whose config.json says `"quantization_config": {"quant_method": "sdnq", ...}` loads through the host's
own `from_pretrained`: diffusers and transformers hand it to the `sdnq` package's quantizer once `sdnq` is imported
(importing it registers it with both), and this package's classes need nothing else. What this module adds, for the
one loading rule (`loading.load_pretrained`):
- a clear error when `sdnq` is not installed;
- a header check before the host loads (diffusers models): every key is a model key, or an SDNQ tensor (`scale`,
  `zero_point`, `svd_up`, ... as the `sdnq` package names them) of a module of the model, and no model key is
  missing; anything else is refused by name before the model is built;
- a refusal of SDNQ checkpoints in the original fused-attention layout, which the host's quantizer cannot split.
"""

import json
from pathlib import Path

from accelerate import init_empty_weights

from .loading import check_keys, is_original_layout


SDNQ_METHOD = "sdnq"
INSTALL_HINT = "pip install 'diffusers-ideogram4[sdnq]'"


def stored_quantization_config(folder: Path) -> dict | None:
    """The `quantization_config` of a component folder's config.json, if it has one."""
    config_path = Path(folder) / "config.json"
    quantization = json.loads(config_path.read_text()).get("quantization_config") if config_path.is_file() else None
    if quantization is not None and not isinstance(quantization, dict):
        raise ValueError(
            f'{config_path}: `quantization_config` must be an object such as {{"quant_method": "sdnq", ...}}, got '
            f"{type(quantization).__name__} {str(quantization)[:80]}; fix or remove it."
        )
    return quantization


def host_reads_sdnq() -> bool:
    """Whether the installed diffusers knows SDNQ itself (its `SDNQConfig`, diffusers >= 0.39): the `sdnq` package
    also registers a quantizer when imported, but older diffusers lack the rest of the path (tested on 0.38)."""
    from diffusers.quantizers import quantization_config

    return hasattr(quantization_config, "SDNQConfig")


def check_sdnq_checkpoint(build_model, header: dict, source, hint: str = "", check_names: bool = True) -> None:
    """Before the host loads an SDNQ component: a diffusers that reads SDNQ, `sdnq` importable, split attention, and
    (with `check_names`) the header against the model built on the meta device (module docstring)."""
    if not host_reads_sdnq():
        import diffusers

        raise ImportError(
            f"{source} is quantized with SDNQ, which diffusers {diffusers.__version__} cannot load (its quantizers do "
            "not include `sdnq`); upgrade diffusers (`pip install -U diffusers`, 0.39 or newer)."
        )
    try:  # importing `sdnq` also registers its quantizer with diffusers and transformers
        import sdnq  # noqa: F401
        from sdnq.common import sdnq_keys
    except ImportError:
        raise ImportError(
            f"This checkpoint is quantized with SDNQ; loading it needs the `sdnq` package: {INSTALL_HINT}."
        ) from None
    extra = set(sdnq_keys) - {"weight"}  # the per-module tensors an SDNQ checkpoint adds beside `weight`
    if is_original_layout(header):
        raise ValueError(
            f"{source} is an SDNQ checkpoint in the original fused-attention layout (`attention.qkv`); the SDNQ "
            "quantizer loads the diffusers layout only and cannot split quantized q/k/v rows. Load an SDNQ repo in "
            "the diffusers layout (`attention.to_q/to_k/to_v`), or convert the bf16 / fp8 checkpoint to the diffusers "
            "layout (`conversion/convert_ideogram4_to_diffusers.py`) and quantize that with `SDNQConfig`."
        )
    if not check_names:
        return
    with init_empty_weights():
        model = build_model()
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    modules = {name for name, _ in model.named_modules()}
    sdnq_tensors = {
        key
        for key in header
        if key not in expected and (parts := key.rpartition("."))[0] in modules and parts[2] in extra
    }
    quantized = {key.rpartition(".")[0] for key in sdnq_tensors}
    # A quantized module's weight is stored packed or in another shape; every other tensor keeps the model's shape.
    provided = {
        key: expected.get(key, shape) if key.rpartition(".")[0] in quantized else shape
        for key, (_, shape) in header.items()
        if key not in sdnq_tensors
    }
    check_keys(expected, provided, source, hint)
