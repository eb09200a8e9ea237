"""diffusers' cache hooks on Ideogram 4 in one run, CPU: steps per second of a whole pipeline call without a cache and
with each cache that applies, the fraction of block (and attention) calls they skip, and how far the final latents
move. Both branches carry the cache (guidance 7, so the unconditional transformer runs at every step).

The transformer is random and wider than the test one (`--layers`, `--hidden`), so that the skipped work dominates
Python overhead; what a cache skips depends on the weights and thresholds, so these fractions say what the hooks do,
not what they would skip on the released model. MagCache's ratios come from a calibration run of this model first.

Run: `python benchmarks/bench_caches.py` (prints a Markdown table).
"""

import argparse
import ast
import contextlib
import functools
import io
import json
import time

import torch


CAPTION = json.dumps(
    {
        "high_level_description": "A retro travel poster for a seaside town.",
        "style_description": {"aesthetics": "vintage", "lighting": "flat", "medium": "print", "art_style": "deco"},
        "compositional_deconstruction": {"background": "a calm sea", "elements": []},
    },
    separators=(",", ":"),
)


def build_pipeline(layers: int, hidden: int):
    """The tiny pipeline with a deeper, wider random transformer pair (same text features and token channels)."""
    from diffusers_ideogram4 import Ideogram4Pipeline, Ideogram4Transformer2DModel
    from diffusers_ideogram4.constants import TRANSFORMER_SIZES
    from diffusers_ideogram4.testing import tiny_components

    size = dict(
        TRANSFORMER_SIZES["tiny"],
        num_layers=layers,
        num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden,
        adaln_dim=128,
    )
    components = tiny_components(seed=0)
    for seed, name in enumerate(("transformer", "unconditional_transformer")):
        torch.manual_seed(seed)
        components[name] = Ideogram4Transformer2DModel(**size).eval()
    pipe = Ideogram4Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_calls(pipe) -> dict:
    """Count the calls of the blocks' and attention processors' own code (what the caches skip)."""
    from diffusers_ideogram4.transformer_ideogram4 import Ideogram4AttnProcessor, Ideogram4TransformerBlock

    calls = {"block": 0, "attention": 0}
    forward, processor_call = Ideogram4TransformerBlock.forward, Ideogram4AttnProcessor.__call__

    @functools.wraps(forward)  # diffusers reads the signature to find `hidden_states`
    def counting_forward(self, *args, **kwargs):
        calls["block"] += 1
        return forward(self, *args, **kwargs)

    def counting_call(self, *args):
        calls["attention"] += 1
        return processor_call(self, *args)

    Ideogram4TransformerBlock.forward = counting_forward
    Ideogram4AttnProcessor.__call__ = counting_call
    return calls


def calibrated_mag_ratios(pipe, call) -> list[list[float]]:
    """MagCache's per-step magnitude ratios of each branch, from a calibration run (diffusers prints them)."""
    from diffusers.hooks import MagCacheConfig

    transformers = (pipe.transformer, pipe.unconditional_transformer)
    for transformer in transformers:
        transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=call["num_inference_steps"]))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        pipe(CAPTION, **call)
    for transformer in transformers:
        transformer.disable_cache()
    lists = [line for line in printed.getvalue().splitlines() if line.startswith("[") and line.endswith("]")]
    return [ast.literal_eval(line) for line in lists]  # conditional first: it runs first at every step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256, help="a multiple of 64 (heads of 64)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers.hooks import (
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    pipe = build_pipeline(args.layers, args.hidden)
    calls = count_calls(pipe)
    call = dict(
        height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=7.0, output_type="latent"
    )
    ratios = calibrated_mag_ratios(pipe, call)
    timestep = lambda: pipe.current_timestep  # noqa: E731
    configs = {
        "none": None,
        "FirstBlockCacheConfig(threshold=0.05)": FirstBlockCacheConfig(threshold=0.05),
        "FirstBlockCacheConfig(threshold=0.5)": FirstBlockCacheConfig(threshold=0.5),
        "MagCacheConfig(calibrated ratios)": [
            MagCacheConfig(mag_ratios=branch, num_inference_steps=args.steps) for branch in ratios
        ],
        "TaylorSeerCacheConfig()": TaylorSeerCacheConfig(),
        "TaylorSeerCacheConfig(use_lite_mode=True)": TaylorSeerCacheConfig(use_lite_mode=True),
        "PyramidAttentionBroadcastConfig(spatial 2, (100, 800))": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=timestep,
        ),
    }
    rows, reference = [], None
    for name, config in configs.items():
        branch_configs = config if isinstance(config, list) else [config, config]
        if config is not None:
            for transformer, branch_config in zip((pipe.transformer, pipe.unconditional_transformer), branch_configs):
                transformer.enable_cache(branch_config)
        best = float("inf")
        for _ in range(args.repeats):
            calls.update(block=0, attention=0)
            start = time.perf_counter()
            latents = pipe(CAPTION, generator=torch.Generator().manual_seed(0), **call).images
            best = min(best, time.perf_counter() - start)
        counted = dict(calls)
        if config is not None:
            for transformer in (pipe.transformer, pipe.unconditional_transformer):
                transformer.disable_cache()
        if reference is None:
            reference, full, base_speed = latents, counted, args.steps / best
        speed = args.steps / best
        rows.append(
            f"| {name} | {speed:.2f} | {speed / base_speed:.2f}x | {1 - counted['block'] / full['block']:.0%} | "
            f"{1 - counted['attention'] / full['attention']:.0%} | {(latents - reference).abs().max().item():.3g} |"
        )

    import diffusers

    print(
        f"Random transformers ({args.layers} blocks, hidden {args.hidden}), {args.size}x{args.size}, {args.steps} "
        f"steps, guidance 7 (both branches), CPU, {args.threads} thread(s), best of {args.repeats}, torch "
        f"{torch.__version__}, diffusers {diffusers.__version__}.\n"
    )
    print(
        "| cache (both branches) | steps/s | speed | block calls skipped | attention calls skipped | max abs change |"
    )
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
