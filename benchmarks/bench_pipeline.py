"""One call of our pipeline vs diffusers' built-in `Ideogram4Pipeline`, identical tiny weights, same caption, CPU.

Both run their default sampler settings (48 steps, two branches) at the same size. The built-in pipeline pads every
prompt to 2048 text tokens and builds a dense attention mask at every step; ours pads to the longest prompt and
lets SDPA run without a mask. Run: `python benchmarks/bench_pipeline.py` (prints a Markdown table).
"""

import argparse
import json
import time

import torch


CAPTION = json.dumps(
    {
        "high_level_description": "A retro travel poster for a seaside town.",
        "style_description": {
            "aesthetics": "vintage, bold",
            "lighting": "flat",
            "medium": "screen print",
            "art_style": "art deco",
            "color_palette": ["#F2C14E", "#F78154", "#4D9078"],
        },
        "compositional_deconstruction": {
            "background": "a calm sea under a striped sky",
            "elements": [
                {"type": "text", "bbox": [40, 100, 200, 900], "text": "VISIT SEASIDE", "desc": "bold serif title"},
                {"type": "obj", "bbox": [300, 200, 900, 800], "desc": "a lighthouse on a rock"},
            ],
        },
    },
    separators=(",", ":"),
)


def timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import diffusers

    from diffusers_ideogram4.testing import tiny_pipeline
    from diffusers_ideogram4.text_encoder import tokenize_prompt

    ours = tiny_pipeline(seed=0)
    peer_transformers = {}
    for name in ("transformer", "unconditional_transformer"):
        model = getattr(ours, name)
        peer_transformers[name] = diffusers.Ideogram4Transformer2DModel(**model.config).eval()
        peer_transformers[name].load_state_dict(model.state_dict())
    peer = diffusers.Ideogram4Pipeline(
        scheduler=ours.scheduler,
        vae=ours.vae,
        text_encoder=ours.text_encoder,
        tokenizer=ours.tokenizer,
        **peer_transformers,
    )
    peer.set_progress_bar_config(disable=True)
    size = dict(height=args.size, width=args.size)
    num_text = len(tokenize_prompt(ours.tokenizer, CAPTION))
    num_image = (args.size // 16) ** 2

    ours_s = timed(lambda: ours(CAPTION, generator=torch.Generator().manual_seed(0), **size), args.repeats)
    peer_s = timed(lambda: peer(CAPTION, generator=torch.Generator().manual_seed(0), **size), args.repeats)

    print(
        f"Tiny random weights, {args.size}x{args.size}, default settings (48 steps, 2 branches), "
        f"CPU, {args.threads} thread(s), best of {args.repeats}.\n"
    )
    print("| pipeline | tokens per conditional step | seconds | speed-up |")
    print("|---|---|---|---|")
    print(f"| diffusers.Ideogram4Pipeline {diffusers.__version__} | 2048 + {num_image} | {peer_s:.2f} | 1.00x |")
    print(
        f"| diffusers_ideogram4.Ideogram4Pipeline | {num_text} + {num_image} | {ours_s:.2f} | {peer_s / ours_s:.2f}x |"
    )


if __name__ == "__main__":
    main()
