"""diffusers' cache hooks through a whole pipeline call: each config skips block (or attention) calls, keeps one state
per branch, and `disable_cache` gives back the uncached output bit for bit; configs that cannot apply are refused."""

import functools

import diffusers
import diffusers.hooks
import pytest
import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    TextKVCacheConfig,
)

from conftest import CAPTION, seeded
from diffusers_ideogram4.caches import hooked_modules
from diffusers_ideogram4.testing import tiny_pipeline
from diffusers_ideogram4.transformer_ideogram4 import Ideogram4AttnProcessor, Ideogram4TransformerBlock


STEPS = 6
CALL = dict(height=256, width=256, num_inference_steps=STEPS, guidance_scale=3.0, output_type="latent")
NUM_LAYERS = 2


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def counts(pipe):
    """Calls of the blocks' and attention processors' own code (what a cache skips), per branch. Patched once for the
    module, before any cache is enabled: a cache hook keeps the forward it wrapped, even after `disable_cache`."""
    calls = {"cond": {"block": 0, "attention": 0}, "uncond": {"block": 0, "attention": 0}}
    owner = {}
    for branch, transformer in (("cond", pipe.transformer), ("uncond", pipe.unconditional_transformer)):
        for module in transformer.modules():
            owner[id(module)] = branch
    forward = Ideogram4TransformerBlock.forward

    @functools.wraps(forward)  # diffusers reads the signature to find `hidden_states`
    def counting_forward(self, *args, **kwargs):
        calls[owner[id(self)]]["block"] += 1
        return forward(self, *args, **kwargs)

    processor_call = Ideogram4AttnProcessor.__call__

    def counting_call(self, attn, *args):
        calls[owner[id(attn)]]["attention"] += 1
        return processor_call(self, attn, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Ideogram4TransformerBlock, "forward", counting_forward)
        patch.setattr(Ideogram4AttnProcessor, "__call__", counting_call)
        yield calls


def run(pipe, counts):
    for branch in counts.values():
        branch.update(block=0, attention=0)
    return pipe(CAPTION, generator=seeded(0), **CALL).images


def enable(pipe, config):
    for transformer in (pipe.transformer, pipe.unconditional_transformer):
        transformer.enable_cache(config)


def disable(pipe):
    for transformer in (pipe.transformer, pipe.unconditional_transformer):
        transformer.disable_cache()


def configs(pipe):
    timestep = lambda: pipe.current_timestep  # noqa: E731
    return {
        "first-block": FirstBlockCacheConfig(threshold=1e9),
        "mag": MagCacheConfig(mag_ratios=[1.0] * STEPS, threshold=10.0, num_inference_steps=STEPS),
        "taylorseer": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1),
        "taylorseer-lite": TaylorSeerCacheConfig(use_lite_mode=True, cache_interval=2, disable_cache_before_step=1),
        "taylorseer-blocks": TaylorSeerCacheConfig(
            cache_interval=2, disable_cache_before_step=1, cache_identifiers=[r"layers\.\d+"]
        ),
        "pyramid-attention": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(0, 1000),
            current_timestep_callback=timestep,
        ),
    }


@pytest.mark.parametrize(
    "name", ["first-block", "mag", "taylorseer", "taylorseer-lite", "taylorseer-blocks", "pyramid-attention"]
)
def test_cache_skips_calls_in_a_pipeline_call_and_disable_restores_the_output(pipe, counts, name):
    baseline = run(pipe, counts)
    full = {branch: dict(count) for branch, count in counts.items()}
    assert full["cond"] == full["uncond"] == {"block": NUM_LAYERS * STEPS, "attention": NUM_LAYERS * STEPS}
    enable(pipe, configs(pipe)[name])
    try:
        cached = run(pipe, counts)
        again = run(pipe, counts)  # a second call starts from a fresh cache state
    finally:
        disable(pipe)
    assert torch.equal(again, cached)
    kind = "attention" if name in ("pyramid-attention", "taylorseer") else "block"
    for branch in ("cond", "uncond"):
        assert 0 < counts[branch][kind] < full[branch][kind], (branch, counts[branch])
    assert not torch.equal(cached, baseline)
    assert torch.equal(run(pipe, counts), baseline)
    assert counts == full


def test_first_block_cache_skips_every_block_after_the_first_once_its_residual_is_close(pipe, counts):
    """With a huge threshold, every step after the first runs only the first block, in each branch."""
    enable(pipe, FirstBlockCacheConfig(threshold=1e9))
    try:
        run(pipe, counts)
    finally:
        disable(pipe)
    expected = NUM_LAYERS + (STEPS - 1)
    assert counts["cond"]["block"] == counts["uncond"]["block"] == expected


def test_each_branch_keeps_its_own_cache_state(pipe):
    states = {}

    def record(pipe, step, tau, tensors):  # during the call: the pipeline clears the states when it ends
        for name in ("transformer", "unconditional_transformer"):
            hook = getattr(pipe, name).layers[0]._diffusers_hook.hooks["fbc_leader_block_hook"]
            states[name] = set(hook.state_manager._state_cache)

    enable(pipe, FirstBlockCacheConfig(threshold=0.0))
    try:
        pipe(CAPTION, callback_on_step_end=record, **CALL)
    finally:
        disable(pipe)
    assert states == {"transformer": {"cond"}, "unconditional_transformer": {"uncond"}}


def test_cache_state_is_reset_at_the_start_of_a_call(pipe, counts):
    """A call stopped by an exception leaves cache state behind; the next call must not reuse it."""
    enable(pipe, FirstBlockCacheConfig(threshold=1e9))
    try:
        fresh = run(pipe, counts)

        def fail_at_step_3(pipe, step, tau, tensors):
            if step == 3:
                raise RuntimeError("stopped")

        with pytest.raises(RuntimeError, match="stopped"):
            pipe(CAPTION, generator=seeded(5), callback_on_step_end=fail_at_step_3, **CALL)
        assert torch.equal(run(pipe, counts), fresh)
    finally:
        disable(pipe)


def test_current_timestep_is_the_step_start_in_diffusers_units(pipe):
    seen = []
    pipe(CAPTION, callback_on_step_end=lambda p, step, tau, t: seen.append((p.current_timestep, tau)), **CALL)
    assert [timestep for timestep, _ in seen] == [(1.0 - tau) * 1000 for _, tau in seen]
    assert pipe.current_timestep is None


@pytest.mark.parametrize(
    "config, reason",
    [
        (
            FasterCacheConfig(current_timestep_callback=lambda: 500),
            "it assumes one batched forward holding the unconditional and conditional inputs",
        ),
        pytest.param(
            "SeaCacheConfig",
            "its change indicator is computed on video latents",
            marks=pytest.mark.skipif(
                not hasattr(diffusers.hooks, "SeaCacheConfig"),
                reason=f"diffusers {diffusers.__version__} has no SeaCacheConfig (0.42 has)",
            ),
        ),
        (TextKVCacheConfig(), "it caches the text keys and values of dual-stream models"),
    ],
)
def test_caches_that_do_not_apply_are_refused_by_name(pipe, config, reason):
    config = getattr(diffusers.hooks, config)() if isinstance(config, str) else config
    with pytest.raises(ValueError, match=rf"^`{type(config).__name__}` does not apply to Ideogram 4: {reason}"):
        pipe.transformer.enable_cache(config)
    assert not pipe.transformer.is_cache_enabled


def test_a_config_that_hooks_nothing_is_refused_and_undone(pipe):
    """Pyramid Attention Broadcast with only a cross-attention range matches no module of a self-attention model."""
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=None,
        cross_attention_block_skip_range=2,
        current_timestep_callback=lambda: 500,
    )
    with pytest.raises(ValueError, match=r"hooks no module of the Ideogram 4 transformer, so it would change nothing"):
        pipe.transformer.enable_cache(config)
    assert not pipe.transformer.is_cache_enabled


def test_taylorseer_defaults_are_translated_without_changing_the_callers_config(pipe):
    config = TaylorSeerCacheConfig()
    pipe.transformer.enable_cache(config)
    try:
        assert pipe.transformer._cache_config.cache_identifiers == [r"layers\.\d+\.attention"]
        assert config.cache_identifiers is None
    finally:
        pipe.transformer.disable_cache()


def test_taylorseer_skip_patterns_alone_keep_the_translated_cache_defaults(pipe):
    # diffusers fills in its default cache patterns whenever `cache_identifiers` is unset, skip patterns given or
    # not; here they must be this model's attention modules, beside the skipped block.
    pipe.transformer.enable_cache(TaylorSeerCacheConfig(skip_predict_identifiers=[r"layers\.0"]))
    try:
        assert pipe.transformer._cache_config.cache_identifiers == [r"layers\.\d+\.attention"]
        assert hooked_modules(pipe.transformer) == ["layers.0", "layers.0.attention", "layers.1.attention"]
    finally:
        pipe.transformer.disable_cache()


def test_mag_cache_with_another_step_count_is_refused_before_model_work(pipe, counts):
    enable(pipe, MagCacheConfig(mag_ratios=[1.0] * 4, num_inference_steps=4))
    try:
        with pytest.raises(ValueError) as error:
            run(pipe, counts)
    finally:
        disable(pipe)
    assert str(error.value) == (
        "`transformer` has a MagCacheConfig(num_inference_steps=4), but this call runs that branch 6 times (steps "
        "whose guidance is 1.0 skip the unconditional branch). Enable it with `num_inference_steps=6` "
        "(`disable_cache()` first), or run that many steps."
    )
    assert counts["cond"]["block"] == 0
