"""torch.compile on the Ideogram 4 transformer, CPU: time of the first (compiling) call and of one denoising step's
conditional forward, eager vs `torch.compile(transformer, fullgraph=True)` vs `compile_repeated_blocks(fullgraph=True)`.

Random weights, one image at `--size` with `--text` text tokens, float32; the timed calls alternate between eager and
compiled (median of `--calls` each), the timestep changing at every call as in a denoising loop (no recompile).
CPU ratios say little about a GPU: inductor's CPU kernels are not its GPU kernels.

Run: `python benchmarks/bench_compile.py` (prints a Markdown table).
"""

import argparse
import copy
import statistics
import time

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--text", type=int, default=200)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512, help="a multiple of 64 (heads of 64)")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers_ideogram4 import Ideogram4Transformer2DModel
    from diffusers_ideogram4.constants import TRANSFORMER_SIZES
    from diffusers_ideogram4.layout import image_grid
    from diffusers_ideogram4.testing import random_transformer_inputs

    size = dict(
        TRANSFORMER_SIZES["tiny"],
        num_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        intermediate_size=4 * args.hidden,
        adaln_dim=128,
    )
    torch.manual_seed(0)
    eager = Ideogram4Transformer2DModel(**size).eval()
    whole = torch.compile(copy.deepcopy(eager), fullgraph=True)
    regional = copy.deepcopy(eager)
    regional.compile_repeated_blocks(fullgraph=True)

    def step(model, k):
        batch = random_transformer_inputs(
            [args.text], image_grid(args.size, args.size), size, timestep=0.05 + 0.9 * k / args.calls
        )
        start = time.perf_counter()
        model(**batch)
        return time.perf_counter() - start

    rows = []
    with torch.no_grad():
        step(eager, 0)  # warm-up
        for name, compiled in (("torch.compile(fullgraph=True)", whole), ("compile_repeated_blocks", regional)):
            first = step(compiled, 0)
            eager_s, compiled_s = [], []
            with torch._dynamo.config.patch(error_on_recompile=True):
                for k in range(args.calls):
                    eager_s.append(step(eager, k))
                    compiled_s.append(step(compiled, k))
            eager_ms, compiled_ms = 1e3 * statistics.median(eager_s), 1e3 * statistics.median(compiled_s)
            rows.append(
                f"| {name} | {first:.1f} | {eager_ms:.1f} | {compiled_ms:.1f} | {compiled_ms / eager_ms:.2f} |"
            )

    tokens = args.text + (args.size // 16) ** 2
    print(
        f"Random transformer ({args.layers} blocks, hidden {args.hidden}), {args.text} text + "
        f"{(args.size // 16) ** 2} image tokens ({tokens}), batch 1, float32, CPU, {args.threads} thread(s), median of "
        f"{args.calls} alternating calls, torch {torch.__version__}.\n"
    )
    print("| mode | first call (compile) s | eager ms/step | compiled ms/step | compiled / eager |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
