"""diffusers' cache hooks on Ideogram 4 (`transformer.enable_cache(config)`): the ones that apply, made to hook this
model's modules, and the others refused by name. A config that would hook nothing is an error, never a silent no-op.

| config | what it hooks here |
|---|---|
| `FirstBlockCacheConfig` | the blocks `layers.N` (the first block's residual decides whether the others run) |
| `MagCacheConfig` | the blocks `layers.N`; its `num_inference_steps` must equal the steps the branch runs |
| `TaylorSeerCacheConfig` | by default the attention modules `layers.N.attention` (diffusers' default patterns name other models' modules); lite mode: blocks skipped, `final_layer` predicted; or the `cache_identifiers` given |
| `PyramidAttentionBroadcastConfig` | the attention modules `layers.N.attention` (spatial self-attention), with `current_timestep_callback=lambda: pipe.current_timestep` |
| `FasterCacheConfig`, `SeaCacheConfig`, `TextKVCacheConfig` | refused, see `REFUSED_CACHES` |

Each branch keeps its own cache state: the pipeline runs every transformer call inside `cache_context("cond")` or
`cache_context("uncond")` and resets the state of both transformers at the start of each call.
"""

import dataclasses
import functools

import torch.nn as nn


# diffusers' default TaylorSeer patterns (`^blocks.*attn`, ...) and lite-mode patterns (`^proj_out$`, blocks inside a
# container named "*block*") match no module of this model; these are their counterparts here.
TAYLORSEER_DEFAULT_IDENTIFIERS = [r"layers\.\d+\.attention"]
TAYLORSEER_LITE_IDENTIFIERS = dict(cache_identifiers=[r"final_layer"], skip_predict_identifiers=[r"layers\.\d+"])
REFUSED_CACHES = {
    "FasterCacheConfig": (
        "it assumes one batched forward holding the unconditional and conditional inputs, while Ideogram 4 runs its "
        "two branches as separate calls (on two transformers), and its attention hooks match only modules named "
        "`blocks` / `transformer_blocks`, not this model's `layers`"
    ),
    "SeaCacheConfig": "its change indicator is computed on video latents (C, T, H, W) of the video models it supports",
    "TextKVCacheConfig": (
        "it caches the text keys and values of dual-stream models, whose text tokens pass the blocks unchanged; in "
        "this single-stream model the text tokens change at every block and step"
    ),
}


@functools.cache
def register_cache_blocks() -> None:
    """Tell diffusers' cache hooks where the hidden states are in a block's arguments and output (the first of each,
    one tensor out). Done once, on first use: the registry imports every model diffusers ships (over a second)."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    from .transformer_ideogram4 import Ideogram4TransformerBlock

    metadata = TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None)
    TransformerBlockRegistry.register(Ideogram4TransformerBlock, metadata)


def adapt_cache_config(config):
    """The config to apply to this model: TaylorSeer's default and lite-mode patterns translated to this model's
    module names (a copy; the caller's config is left alone); every other config as given. diffusers uses its default
    cache patterns whenever `cache_identifiers` is unset (or empty), skip patterns given or not."""
    if type(config).__name__ in REFUSED_CACHES:
        raise ValueError(
            f"`{type(config).__name__}` does not apply to Ideogram 4: {REFUSED_CACHES[type(config).__name__]}. Use "
            "FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig or PyramidAttentionBroadcastConfig."
        )
    if type(config).__name__ == "TaylorSeerCacheConfig":
        if config.use_lite_mode:
            return dataclasses.replace(config, use_lite_mode=False, **TAYLORSEER_LITE_IDENTIFIERS)
        if not config.cache_identifiers:
            return dataclasses.replace(config, cache_identifiers=list(TAYLORSEER_DEFAULT_IDENTIFIERS))
    return config


def hooked_modules(model: nn.Module) -> list[str]:
    """Names of the submodules (not the model itself) that carry a diffusers hook."""
    return [
        name
        for name, module in model.named_modules()
        if name and getattr(getattr(module, "_diffusers_hook", None), "_hook_order", None)
    ]


def apply_cache(model: nn.Module, config, host_enable_cache) -> None:
    """`enable_cache` for Ideogram 4: register the blocks, adapt the config, let diffusers apply it, and refuse (and
    undo) a config that hooked no module of this model."""
    config = adapt_cache_config(config)
    register_cache_blocks()
    host_enable_cache(config)
    forget_hooked_submodules(model)
    if not hooked_modules(model):
        model.disable_cache()
        raise ValueError(
            f"{config!r} hooks no module of the Ideogram 4 transformer, so it would change nothing. Its patterns or "
            "ranges must name this model's modules: blocks `layers.N`, attention `layers.N.attention`, output "
            "`final_layer` (for PyramidAttentionBroadcastConfig: `spatial_attention_block_skip_range`)."
        )


def forget_hooked_submodules(model: nn.Module) -> None:
    """diffusers before 0.42 notes which submodules carry hooks the first time a `cache_context` is entered and never
    looks again, and the pipeline enters one at every call: a cache enabled afterwards would never see its context.
    Make every hook registry of the model look again (diffusers 0.42 does the same in `enable_cache`)."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            registry._child_registries_cache = None


def check_cache_steps(*branches: tuple[str, nn.Module | None, int]) -> None:
    """A MagCache counts the calls of its transformer and restarts its schedule after `num_inference_steps` of them:
    refuse a call whose branch runs another number of steps. `branches`: (name, transformer, steps it runs) each."""
    for name, transformer, steps in branches:
        config = getattr(transformer, "_cache_config", None)
        if type(config).__name__ == "MagCacheConfig" and steps and config.num_inference_steps != steps:
            raise ValueError(
                f"`{name}` has a MagCacheConfig(num_inference_steps={config.num_inference_steps}), but this call runs "
                f"that branch {steps} times (steps whose guidance is 1.0 skip the unconditional branch). Enable it "
                f"with `num_inference_steps={steps}` (`disable_cache()` first), or run that many steps."
            )


def reset_caches(*transformers: nn.Module | None) -> None:
    """Forget what the cache hooks kept from an earlier call (or one stopped by an exception or an interrupt)."""
    for transformer in transformers:
        if transformer is not None and transformer.is_cache_enabled:
            transformer._reset_stateful_cache()
