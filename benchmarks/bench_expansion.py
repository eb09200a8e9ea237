"""What the caption grammar costs during prompt expansion: the tiny random model on the CPU, one thread.

For a few seeds, `expand_prompt` runs with the caption grammar and the time spent in the grammar sampler (llguidance's
token mask, the bbox-order filter and the seeded draw) is measured apart from the model's forward passes. The tiny
model's forward pass is far cheaper than the 8 B model's, so its share here is an upper bound of the grammar's share
at full size. Run: `python benchmarks/bench_expansion.py` (prints a Markdown table).
"""

import argparse
import time

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers_ideogram4.captions.grammar import CaptionGrammar
    from diffusers_ideogram4.prompt_expansion import CaptionDecoder, GrammarSampler
    from diffusers_ideogram4.testing import tiny_pipeline, tiny_tokenizer

    pipe = tiny_pipeline(seed=0, prompt_enhancer_head=True)
    start = time.perf_counter()
    CaptionGrammar(tiny_tokenizer(), pipe.prompt_enhancer_head.config.vocab_size)
    compile_seconds = time.perf_counter() - start

    spent = {"forward": 0.0, "grammar": 0.0, "steps": 0, "prefill": 0.0}
    forward, sample = CaptionDecoder.forward, GrammarSampler.__call__

    def timed_forward(self, input_ids=None, **kwargs):
        start = time.perf_counter()
        out = forward(self, input_ids=input_ids, **kwargs)
        elapsed = time.perf_counter() - start
        if input_ids.shape[1] > 1:
            spent["prefill"] += elapsed
        else:
            spent["forward"] += elapsed
        return out

    def timed_sample(self, input_ids, scores):
        start = time.perf_counter()
        out = sample(self, input_ids, scores)
        spent["grammar"] += time.perf_counter() - start
        spent["steps"] += 1
        return out

    CaptionDecoder.forward, GrammarSampler.__call__ = timed_forward, timed_sample
    total = 0.0
    try:
        for seed in range(args.seeds):
            start = time.perf_counter()
            pipe.expand_prompt("a jazz poster that says JAZZ NIGHT", generator=torch.Generator().manual_seed(seed))
            total += time.perf_counter() - start
    finally:
        CaptionDecoder.forward, GrammarSampler.__call__ = forward, sample

    steps = spent["steps"]
    print(f"tiny random model, CPU, {args.threads} thread(s), {args.seeds} captions, {steps} tokens in all")
    print(f"grammar compiled for the tiny tokenizer in {compile_seconds * 1000:.0f} ms\n")
    print("| per generated token | ms | share of a decode step |")
    print("|---|---|---|")
    step = (spent["forward"] + spent["grammar"]) / steps
    print(
        f"| model forward (KV cache) | {spent['forward'] / steps * 1000:.2f} | {spent['forward'] / steps / step:.0%} |"
    )
    print(f"| grammar mask + draw | {spent['grammar'] / steps * 1000:.2f} | {spent['grammar'] / steps / step:.0%} |")
    print(f"\nprefill (instruction + idea) {spent['prefill'] / args.seeds:.2f} s per caption; total {total:.1f} s")


if __name__ == "__main__":
    main()
