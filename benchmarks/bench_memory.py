"""Peak memory of one pipeline call per configuration: weights format x offload x resolution.

Weights are random (no real weights are needed to measure memory); `--size ideogram4` builds the released
architecture (two 9.3 B transformers, the 8 B Qwen3-VL language model, the FLUX.2 VAE), `--size tiny` the test
model. On CUDA it reports peak accelerator memory (torch.cuda.max_memory_allocated) and host peak RSS; on the CPU
only the host figure. nf4 needs CUDA and bitsandbytes and is reported as skipped elsewhere.

Run: `python benchmarks/bench_memory.py --size ideogram4 --device cuda` (prints a Markdown table; `--configs` picks
rows, `--budget-s` bounds the time), or `--weights-only` for the computed weight sizes without any device.

`--single-transformer` (no device, about a minute on the CPU): single-transformer mode (the conditional transformer
plus the unconditional LoRA, rank 64, instead of two transformers) against two transformers, in bf16, fp8 and nf4.
The resident weights are computed from the full-size architecture's shapes; the bytes moved to the accelerator per
denoising step under each offload mode are counted by the offload hooks themselves, on the full-size model built on
the meta device (so the transfers are replaced by counters, see `counted_transfers`), running the pipeline's own
denoising loop.
"""

import argparse
import gc
import json
import resource
import time
from contextlib import ExitStack, contextmanager, nullcontext
from unittest import mock

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


# --------------------------------------------------------------------------------------------------------------------
# Single-transformer mode: resident weights and bytes moved per step

CARDS_GIB = (12, 16, 24)
# Room assumed beside the weights for activations at 1024 x 1024, the CUDA context and the allocator (not measured:
# no GPU so far); a configuration "fits" a card when its resident weights plus this are at most the card's memory.
HEADROOM_GIB = 2.0
UNCONDITIONAL_RANK = 64
# Denoising steps the hooks count over, every one guided (both passes); the first starts with nothing resident.
COUNTED_STEPS = 3
# Offload modes whose transfers are counted: `enable_model_cpu_offload()` on the pipeline, and
# `enable_group_offload(...)` on each transformer (block level: one block per group).
OFFLOAD_MODES = ("model", "group, block level", "group, leaf level")


def meta_lora_state_dict(model) -> dict:
    """A rank-UNCONDITIONAL_RANK LoRA on every Linear the unconditional pass runs, as meta tensors in the diffusers
    format (what `load_unconditional_lora` reads, with the shapes of a real one; no memory)."""
    from diffusers_ideogram4.fp8 import linear_weight_keys
    from diffusers_ideogram4.lora_extraction import TEXT_ONLY_MODULES

    state = {}
    for key in linear_weight_keys(model):
        module = key.removesuffix(".weight")
        if module in TEXT_ONLY_MODULES:
            continue
        out, inp = model.get_submodule(module).weight.shape
        state[f"{module}.lora_A.weight"] = torch.empty(UNCONDITIONAL_RANK, inp, device="meta", dtype=torch.bfloat16)
        state[f"{module}.lora_B.weight"] = torch.empty(out, UNCONDITIONAL_RANK, device="meta", dtype=torch.bfloat16)
    return state


def meta_pipeline(size: str, single: bool):
    """The full-size pipeline on the meta device: two transformers, or one with the unconditional LoRA loaded by
    `load_unconditional_lora` (PEFT places the factors on the meta device too)."""
    from diffusers_ideogram4 import Ideogram4Pipeline

    components = random_components(size, "bf16", "meta")
    if single:
        components["unconditional_transformer"] = None
    # (the VAE's latent statistics are never read here: "vae_bn" skips comparing them with the reference's)
    pipe = Ideogram4Pipeline(**components, latent_normalization="vae_bn")
    pipe.set_progress_bar_config(disable=True)
    if single:
        pipe.load_unconditional_lora(meta_lora_state_dict(pipe.transformer), low_cpu_mem_usage=True)
    return pipe


@contextmanager
def counted_transfers(pipe, moved: list):
    """Run the offload hooks with their transfers replaced by counters: `moved` gets (step, tensor) for every tensor
    a hook would copy to the accelerator. Residency is what the hooks decide: a model-offload component is resident
    from its hook's pre-forward until its hook offloads it (the hooks' own `prev_module_hook` and this package's
    `_ReleaseOthers` decide that), a group from its onload to its offload. The meta device has no autocast state, so
    the transformer's "autocast off" around its rotary angles becomes a no-op there, and the inputs the group hooks
    would move stay there."""
    from accelerate.hooks import CpuOffload
    from diffusers.hooks.group_offloading import ModuleGroup

    import diffusers_ideogram4.pipeline_ideogram4 as pipeline_module

    step = [0]
    resident = set()
    original_autocast = torch.autocast

    def autocast(device_type, *args, **kwargs):
        return nullcontext() if device_type == "meta" else original_autocast(device_type, *args, **kwargs)

    def offload_model(hook, module):
        resident.discard(id(module))
        return module

    def onload_model(hook, module, *args, **kwargs):
        previous = hook.prev_module_hook
        if previous is not None and pipeline_module._on_accelerator(previous.model):
            previous.offload()
        if id(module) not in resident:
            moved.extend((step[0], parameter) for parameter in module.parameters())
            resident.add(id(module))
        return args, kwargs

    def transfer(group, tensor, source, default_stream):
        moved.append((step[0], tensor))

    patches = [
        mock.patch.object(torch, "autocast", autocast),
        mock.patch.object(type(pipe), "to", lambda self, *a, **k: self),
        mock.patch.object(CpuOffload, "init_hook", offload_model),
        mock.patch.object(CpuOffload, "pre_forward", onload_model),
        mock.patch.object(pipeline_module, "_on_accelerator", lambda model: id(model) in resident),
        mock.patch.object(ModuleGroup, "_transfer_tensor_to_device", transfer),
        mock.patch.object(ModuleGroup, "offload_", lambda group: None),
        # the group hooks also move each call's inputs to the onload device: meta tensors stay where they are
        mock.patch("diffusers.hooks.group_offloading.send_to_device", lambda tensors, *a, **k: tensors),
    ]
    with ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield step


def moved_per_step(size: str, single: bool, mode: str) -> list[list[tuple[str, torch.Tensor]]]:
    """For each counted step, the (name, tensor) of every weight the offload hooks of `mode` move to the accelerator,
    running `denoise` on the full-size meta pipeline."""
    from diffusers_ideogram4.layout import image_only_layout, pack_layout

    pipe = meta_pipeline(size, single)
    names = {
        id(tensor): f"{component}.{name}"
        for component, model in pipe.components.items()
        if isinstance(model, torch.nn.Module)
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
    }
    moved = []
    with counted_transfers(pipe, moved) as step:
        if mode == "model":
            pipe.enable_model_cpu_offload(device="cpu")
        else:
            level = "block_level" if mode.endswith("block level") else "leaf_level"
            extra = {"num_blocks_per_group": 1} if level == "block_level" else {}
            for name in ("transformer", "unconditional_transformer"):
                model = getattr(pipe, name)
                if model is not None:
                    model.enable_group_offload(onload_device=torch.device("cpu"), offload_type=level, **extra)
        moved.clear()  # setting up moves nothing to the accelerator
        grid, text = (4, 4), 8
        config = pipe.transformer.config
        layouts = (pack_layout([text], *grid).to("meta"), image_only_layout(1, *grid).to("meta"))
        latents = torch.empty(1, grid[0] * grid[1], config.in_channels, device="meta")
        features = torch.empty(1, text, config.llm_features_dim, device="meta", dtype=torch.bfloat16)

        def next_step(index, latents):
            step[0] = index + 1
            return latents

        taus = [0.1 * (k + 1) for k in range(COUNTED_STEPS + 1)]
        pipe.denoise(latents, taus, [7.0] * COUNTED_STEPS, features, layouts, step_hook=next_step)
    steps = [[] for _ in range(COUNTED_STEPS)]
    for index, tensor in moved:
        steps[index].append((names[id(tensor)], tensor))
    return steps


def tensor_bytes(name: str, tensor: torch.Tensor, weights: str, linear_weights: set[str]) -> int:
    """Bytes of one weight stored as `weights` (`fp8.stored_bytes`); LoRA factors stay bf16, integer buffers as they
    are."""
    from diffusers_ideogram4.fp8 import stored_bytes

    if not tensor.is_floating_point():
        return tensor.numel() * tensor.element_size()
    quantized = "lora_" not in name and name.replace(".base_layer", "") in linear_weights
    return stored_bytes(tensor, weights, quantized)


def single_transformer_tables(size: str) -> None:
    import warnings

    from diffusers.utils import logging as diffusers_logging

    from diffusers_ideogram4.fp8 import linear_weight_keys, weight_bytes

    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")

    components = random_components(size, "bf16", "meta")
    linear = {
        f"{name}.{key}"
        for name in ("text_encoder", "transformer", "unconditional_transformer")
        for key in linear_weight_keys(components[name])
    }
    single = meta_pipeline(size, single=True)
    lora_bytes = sum(2 * p.numel() for n, p in single.transformer.named_parameters() if "lora_" in n)
    gib = 2**30
    print(
        f"{size} architecture, single-transformer mode (the conditional transformer + the unconditional LoRA, rank "
        f"{UNCONDITIONAL_RANK} on every Linear the unconditional pass runs, bf16 factors: {lora_bytes / gib:.2f} GiB "
        "as PEFT holds it, the fused q/k/v's down factor once per projection) against two transformers. Weights only, "
        "from parameter shapes; a configuration fits a card when its resident weights plus "
        f"{HEADROOM_GIB:.0f} GiB (assumed for activations at 1024 x 1024, the CUDA context and the allocator; not "
        "measured) fit. Host RAM: the weights kept in CPU memory by the offload (all of them).\n"
    )
    print(
        "| weights | transformers | offload | resident GiB | host RAM GiB | "
        + " | ".join(f"fits {card} GiB" for card in CARDS_GIB)
        + " |"
    )
    print("|---|---|---|---|---|" + "---|" * len(CARDS_GIB))
    for weights in ("bf16", "fp8", "nf4"):
        size_of = {
            n: weight_bytes(components[n], "bf16" if n == "vae" else weights)
            for n in ("text_encoder", "transformer", "vae")
        }
        for label, transformer in (
            ("two", size_of["transformer"]),
            ("one + LoRA", size_of["transformer"] + lora_bytes),
        ):
            count = 2 if label == "two" else 1
            everything = size_of["text_encoder"] + size_of["vae"] + count * transformer
            for offload, resident in (("none", everything), ("model", max(size_of["text_encoder"], transformer))):
                fits = ["yes" if resident / gib + HEADROOM_GIB <= card else "no" for card in CARDS_GIB]
                host = f"{everything / gib:.2f}" if offload == "model" else "-"
                print(
                    f"| {weights} | {label} | {offload} | {resident / gib:.2f} | {host} | " + " | ".join(fits) + " |"
                )
    print(
        f"\nBytes moved to the accelerator per denoising step (guidance != 1, both passes), counted by the offload "
        f"hooks over {COUNTED_STEPS} steps of `denoise` on the full-size meta pipeline; first step / each later step, "
        "GiB. Each moved tensor is counted at its size in the weights format (LoRA factors bf16).\n"
    )
    print("| offload | transformers | " + " | ".join(f"{w} first / later" for w in ("bf16", "fp8", "nf4")) + " |")
    print("|---|---|---|---|---|")
    for mode in OFFLOAD_MODES:
        for label, single_mode in (("two", False), ("one + LoRA", True)):
            steps = moved_per_step(size, single_mode, mode)
            cells = []
            for weights in ("bf16", "fp8", "nf4"):
                per_step = [sum(tensor_bytes(n, t, weights, linear) for n, t in step) / gib for step in steps]
                later = sorted(set(round(value, 2) for value in per_step[1:]))
                cells.append(f"{per_step[0]:.2f} / {', '.join(f'{v:.2f}' for v in later)}")
            print(f"| {mode} | {label} | " + " | ".join(cells) + " |")


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
    parser.add_argument(
        "--single-transformer",
        action="store_true",
        help="print the single-transformer rows (resident weights, bytes moved per step; no device) and exit",
    )
    args = parser.parse_args()
    if args.weights_only:
        weights_table(args.size)
        return
    if args.single_transformer:
        single_transformer_tables(args.size)
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
