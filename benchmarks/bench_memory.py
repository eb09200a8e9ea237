"""Peak memory of one pipeline call per configuration: weights format x offload x resolution.

Weights are random (no real weights are needed to measure memory); `--size ideogram4` builds the released
architecture (two 9.3 B transformers, the 8 B Qwen3-VL language model, the FLUX.2 VAE), `--size tiny` the test
model. On CUDA it reports peak accelerator memory (torch.cuda.max_memory_allocated) and host peak RSS; on the CPU
only the host figure. nf4 needs CUDA and bitsandbytes and is reported as skipped elsewhere.

Run: `python benchmarks/bench_memory.py --size ideogram4 --device cuda` (prints a Markdown table).
"""

import argparse
import gc
import json
import resource
import time

import torch


CAPTION = json.dumps(
    {"high_level_description": "A plain wall.",
     "compositional_deconstruction": {"background": "a plain wall " * 40, "elements": []}},
    separators=(",", ":"),
)
WEIGHT_FORMATS = ("bf16", "fp8", "fp8-matmul", "nf4")
OFFLOADS = ("none", "model", "sequential")


def random_components(size: str, weights: str, device: str) -> dict:
    """Pipeline components of the given size with random weights, built directly on the target device."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen3VLConfig

    from diffusers_ideogram4 import Ideogram4TextEncoder, Ideogram4Transformer2DModel
    from diffusers_ideogram4.fp8 import linear_weight_keys, quantize_fp8_weight, replace_linears_with_fp8
    from diffusers_ideogram4.sizes import TEXT_ENCODER_SIZES, TRANSFORMER_SIZES
    from diffusers_ideogram4.testing import tiny_components, tiny_text_encoder_config

    if size == "tiny":
        components = tiny_components()
    else:
        with torch.device(device):
            config = Qwen3VLConfig(text_config=dict(TEXT_ENCODER_SIZES[size], rope_parameters={
                "rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                "mrope_interleaved": True}), vision_config=tiny_text_encoder_config().vision_config.to_dict())
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
    if weights == "nf4":
        import bitsandbytes as bnb

        for name in ("transformer", "unconditional_transformer"):
            model = components[name]
            for key in [k[: -len(".weight")] for k in linear_weight_keys(model)]:
                parent_name, _, child = key.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                linear = getattr(parent, child)
                quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                              compute_dtype=torch.bfloat16, quant_type="nf4",
                                              compress_statistics=False)
                quantized.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                setattr(parent, child, quantized.to(device))
    return components


def weights_table(size: str) -> None:
    """Weights-only lower bounds per format and offload mode, computed on the meta device (no memory needed)."""
    from diffusers_ideogram4.sizes import weight_bytes

    components = random_components(size, "bf16", "meta")
    names = ("text_encoder", "transformer", "unconditional_transformer", "vae")
    print(f"{size} architecture: bytes of the weights alone, computed from parameter shapes (activations, the CUDA "
          "context and allocator overhead come on top; nf4 leaves the VAE in bf16).\n")
    print("| weights | text encoder GiB | each transformer GiB | VAE GiB | all resident GiB | largest component GiB |")
    print("|---|---|---|---|---|---|")
    for weights in ("bf16", "fp8", "nf4"):
        gib = {name: weight_bytes(components[name], "bf16" if name == "vae" else weights) / 2**30 for name in names}
        print(f"| {weights} | {gib['text_encoder']:.2f} | {gib['transformer']:.2f} | {gib['vae']:.2f} | "
              f"{sum(gib.values()):.2f} | {max(gib.values()):.2f} |")


def measure(args, weights: str, offload: str, side: int) -> dict:
    from diffusers_ideogram4 import Ideogram4Pipeline
    from diffusers_ideogram4.fp8 import set_fp8_matmul

    cuda = args.device == "cuda"
    if weights == "nf4" and not cuda:
        return {"status": "skipped: nf4 needs CUDA"}
    build_device = "cpu" if offload != "none" else args.device
    pipe = Ideogram4Pipeline(**random_components(args.size, weights, build_device))
    pipe.set_progress_bar_config(disable=True)
    if weights == "fp8-matmul":
        set_fp8_matmul(pipe.transformer, True)
        set_fp8_matmul(pipe.unconditional_transformer, True)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=args.device)
    elif offload == "sequential":
        if not cuda:
            return {"status": "skipped: sequential offload needs an accelerator"}
        pipe.enable_sequential_cpu_offload(device=args.device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    pipe(CAPTION, height=side, width=side, num_inference_steps=args.steps, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "status": "ok",
        "seconds": seconds,
        "accelerator_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    del pipe
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "ideogram4"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--weights", default=",".join(WEIGHT_FORMATS))
    parser.add_argument("--offload", default=",".join(OFFLOADS))
    parser.add_argument("--sides", default="1024,2048")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--weights-only", action="store_true",
                        help="print the computed weight sizes per format (no device, no run) and exit")
    args = parser.parse_args()
    if args.weights_only:
        weights_table(args.size)
        return
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{args.size} architecture, random weights, {args.steps} steps, {device_name}, "
          f"{time.strftime('%Y-%m-%d')}. Host peak RSS is the process high-water mark so far.\n")
    print("| weights | offload | size | peak accelerator GiB | host peak GiB | seconds |")
    print("|---|---|---|---|---|---|")
    for weights in args.weights.split(","):
        for offload in args.offload.split(","):
            for side in (int(s) for s in args.sides.split(",")):
                try:
                    row = measure(args, weights, offload, side)
                except Exception as error:  # a benchmark row that fails is reported, not hidden
                    row = {"status": f"failed: {type(error).__name__}: {str(error)[:80]}"}
                if row["status"] != "ok":
                    print(f"| {weights} | {offload} | {side} | {row['status']} | | |")
                    continue
                accelerator = "-" if row["accelerator_gib"] is None else f"{row['accelerator_gib']:.2f}"
                print(f"| {weights} | {offload} | {side} | {accelerator} | {row['host_peak_gib']:.2f} | "
                      f"{row['seconds']:.1f} |")


if __name__ == "__main__":
    main()
