"""Peak memory of one pipeline call per configuration: weights format x offload x resolution.

Weights are random (no real weights are needed to measure memory); `--size ideogram4` builds the released
architecture (two 9.3 B transformers, the 8 B Qwen3-VL language model, the FLUX.2 VAE), `--size tiny` the test
model. On CUDA it reports peak accelerator memory (torch.cuda.max_memory_allocated) and host peak RSS; on the CPU
only the host figure. nf4 needs CUDA and bitsandbytes and is reported as skipped elsewhere.

Run: `python benchmarks/bench_memory.py --size ideogram4 --device cuda` (prints a Markdown table; `--configs` picks
rows, `--budget-s` bounds the time), or `--weights-only` for the computed weight sizes without any device.
"""

import argparse
import gc
import json
import resource
import time

import torch


CAPTION = json.dumps(
    {
        "high_level_description": "A plain wall.",
        "compositional_deconstruction": {"background": "a plain wall " * 40, "elements": []},
    },
    separators=(",", ":"),
)
WEIGHT_FORMATS = ("bf16", "fp8", "fp8-matmul", "nf4")
OFFLOADS = ("none", "model", "sequential")


def random_components(size: str, weights: str, device: str) -> dict:
    """Pipeline components of the given size with random weights, built directly on the target device."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen3VLConfig

    from diffusers_ideogram4 import Ideogram4TextEncoder, Ideogram4Transformer2DModel
    from diffusers_ideogram4.constants import TEXT_ENCODER_SIZES, TRANSFORMER_SIZES
    from diffusers_ideogram4.fp8 import linear_weight_keys, quantize_fp8_weight, replace_linears_with_fp8
    from diffusers_ideogram4.testing import tiny_components, tiny_text_encoder_config

    if size == "tiny":
        components = tiny_components()
    else:
        with torch.device(device):
            config = Qwen3VLConfig(
                text_config=dict(
                    TEXT_ENCODER_SIZES[size],
                    rope_parameters={
                        "rope_type": "default",
                        "rope_theta": 5_000_000.0,
                        "mrope_section": [24, 20, 20],
                        "mrope_interleaved": True,
                    },
                ),
                vision_config=tiny_text_encoder_config().vision_config.to_dict(),
            )
            torch.set_default_dtype(torch.bfloat16)
            try:
                components = dict(
                    scheduler=FlowMatchEulerDiscreteScheduler(),
                    vae=AutoencoderKLFlux2(),
                    text_encoder=Ideogram4TextEncoder(config),
                    tokenizer=tiny_components()["tokenizer"],
                    transformer=Ideogram4Transformer2DModel(**TRANSFORMER_SIZES[size]),
                    unconditional_transformer=Ideogram4Transformer2DModel(**TRANSFORMER_SIZES[size]),
                )
            finally:
                torch.set_default_dtype(torch.float32)
    for name in ("text_encoder", "transformer", "unconditional_transformer", "vae"):
        components[name] = components[name].to(device=device, dtype=torch.bfloat16).eval()
    if weights.startswith("fp8"):
        for name in ("text_encoder", "transformer", "unconditional_transformer"):
            model = components[name]
            keys = linear_weight_keys(model)
            linears = {key: model.get_submodule(key[: -len(".weight")]) for key in keys}
            replace_linears_with_fp8(model, keys)
            for key, linear in linears.items():
                layer = model.get_submodule(key[: -len(".weight")])
                weight, scale = quantize_fp8_weight(linear.weight.detach())
                layer.weight.data, layer.weight_scale.data = weight, scale
                layer.bias = linear.bias
            del linears
    if weights == "nf4":  # the nf4 release quantizes both transformers and the text encoder (SPEC 2.2)
        import bitsandbytes as bnb

        for name in ("text_encoder", "transformer", "unconditional_transformer"):
            model = components[name]
            for key in [k[: -len(".weight")] for k in linear_weight_keys(model)]:
                parent_name, _, child = key.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                linear = getattr(parent, child)
                quantized = bnb.nn.Linear4bit(
                    linear.in_features,
                    linear.out_features,
                    linear.bias is not None,
                    compute_dtype=torch.bfloat16,
                    quant_type="nf4",
                    compress_statistics=False,
                )
                quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
                setattr(parent, child, quantized.to(device))
    return components


def weights_table(size: str) -> None:
    """Weights-only lower bounds per format (per component, all resident, largest component), computed on the meta
    device (no memory needed)."""
    from diffusers_ideogram4.fp8 import weight_bytes

    components = random_components(size, "bf16", "meta")
    names = ("text_encoder", "transformer", "unconditional_transformer", "vae")
    print(
        f"{size} architecture: bytes of the weights alone, computed from parameter shapes (activations, the CUDA "
        "context and allocator overhead come on top; nf4 leaves the VAE in bf16).\n"
    )
    print("| weights | text encoder GiB | each transformer GiB | VAE GiB | all resident GiB | largest component GiB |")
    print("|---|---|---|---|---|---|")
    for weights in ("bf16", "fp8", "nf4"):
        gib = {name: weight_bytes(components[name], "bf16" if name == "vae" else weights) / 2**30 for name in names}
        print(
            f"| {weights} | {gib['text_encoder']:.2f} | {gib['transformer']:.2f} | {gib['vae']:.2f} | "
            f"{sum(gib.values()):.2f} | {max(gib.values()):.2f} |"
        )


# The order rows are measured in: what decides a card first, so that a run cut short by its time budget has them.
DEFAULT_CONFIGS = (
    "nf4/model/1024,fp8/model/1024,bf16/none/1024,fp8/none/1024,fp8-matmul/none/1024,nf4/none/1024,bf16/model/1024,"
    "nf4/model/2048,fp8/model/2048,bf16/none/2048,fp8/none/2048,nf4/sequential/1024,fp8/sequential/1024,"
    "bf16/sequential/1024"
)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_pipeline(args, weights: str, offload: str):
    """Random-weight pipeline in a weights format with an offload mode. Built on the accelerator (fast random init
    and quantization there), then moved to the CPU when an offload mode manages placement."""
    from diffusers_ideogram4 import Ideogram4Pipeline
    from diffusers_ideogram4.fp8 import set_fp8_matmul

    pipe = Ideogram4Pipeline(**random_components(args.size, weights, args.device))
    pipe.set_progress_bar_config(disable=True)
    if weights == "fp8-matmul":
        set_fp8_matmul(pipe.transformer, True)
        set_fp8_matmul(pipe.unconditional_transformer, True)
    if offload != "none":
        pipe.to("cpu")
        free_memory()
    if offload == "model":
        pipe.enable_model_cpu_offload(device=args.device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=args.device)
    return pipe


def measure(args, pipe, side: int) -> dict:
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    latents = pipe(
        CAPTION,
        height=side,
        width=side,
        num_inference_steps=args.steps,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    if cuda:
        torch.cuda.synchronize()
    return {
        "seconds": time.perf_counter() - start,
        "accelerator_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "latents": latents.float().cpu(),
    }


def skip_reason(args, weights: str, offload: str) -> str | None:
    if weights == "nf4" and args.device != "cuda":
        return "skipped: nf4 needs CUDA"
    if offload == "sequential" and args.device == "cpu":
        return "skipped: sequential offload needs an accelerator"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "ideogram4"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--configs", default=DEFAULT_CONFIGS, help="comma-separated weights/offload/side rows, measured in this order"
    )
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no new pipeline after this many seconds (rows done so far are printed)",
    )
    parser.add_argument(
        "--weights-only",
        action="store_true",
        help="print the computed weight sizes per format (no device, no run) and exit",
    )
    args = parser.parse_args()
    if args.weights_only:
        weights_table(args.size)
        return
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    configs = [tuple(row.split("/")) for row in args.configs.split(",")]
    for weights, offload, side in configs:
        if weights not in WEIGHT_FORMATS or offload not in OFFLOADS or not side.isdigit():
            parser.error(
                f"--configs row {weights}/{offload}/{side}: weights one of {WEIGHT_FORMATS}, offload one of "
                f"{OFFLOADS}, side in pixels"
            )
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"{args.size} architecture, random weights, {args.steps} steps, {device_name}, "
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}. Host peak RSS is the process high-water mark "
        "so far. The last column compares the fp8-matmul latents with fp8 weight-only at the same size.\n"
    )
    print("| weights | offload | size | peak accelerator GiB | host peak GiB | seconds | rel. L2 vs fp8 |")
    print("|---|---|---|---|---|---|---|", flush=True)
    began, pipe, built, fp8_latents = time.perf_counter(), None, None, {}
    for weights, offload, side in configs:
        reason = skip_reason(args, weights, offload)
        if (
            reason is None
            and args.budget_s is not None
            and built != (weights, offload)
            and time.perf_counter() - began > args.budget_s
        ):
            reason = "skipped: time budget spent"
        if reason is not None:
            print(f"| {weights} | {offload} | {side} | {reason} | | | |", flush=True)
            continue
        try:
            if built != (weights, offload):
                pipe = built = None
                free_memory()
                pipe, built = build_pipeline(args, weights, offload), (weights, offload)
            row = measure(args, pipe, int(side))
        except Exception as error:  # a benchmark row that fails is reported, not hidden
            print(
                f"| {weights} | {offload} | {side} | failed: {type(error).__name__}: {str(error)[:80]} | | | |",
                flush=True,
            )
            pipe = built = None
            continue
        if (weights, offload) == ("fp8", "none"):
            fp8_latents[side] = row["latents"]
        relative = ""
        if weights == "fp8-matmul" and side in fp8_latents:
            reference = fp8_latents[side]
            relative = f"{((row['latents'] - reference).norm() / reference.norm()).item():.4f}"
        accelerator = "-" if row["accelerator_gib"] is None else f"{row['accelerator_gib']:.2f}"
        print(
            f"| {weights} | {offload} | {side} | {accelerator} | {row['host_peak_gib']:.2f} | "
            f"{row['seconds']:.1f} | {relative} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
