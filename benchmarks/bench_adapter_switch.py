"""What switching the active adapters between the two passes of a step costs, on the full-size module tree.

Single-transformer mode runs both passes of a guided step on one transformer, with different adapters: the
unconditional pass with the unconditional LoRA, the conditional pass with the user's. The released architecture (34
layers, 9.3 B parameters) is built on the meta device (no memory, no weights) with two LoRA adapters injected by PEFT:
"unconditional", rank 64 on every Linear the unconditional pass runs, and "style", rank 16 on the attention. Each row
times one way of switching to the unconditional pass's adapters and back (the median of `--repeats` runs, one CPU
thread):

- diffusers' `transformer.set_adapters(...)`, twice: what a user would call between passes (a walk over every module,
  PEFT's `set_adapter` and `set_scale` per LoRA layer);
- PEFT's `set_adapter` on each LoRA layer of a list made once, twice (no module walk);
- this package's `AdapterSwitch.activated` (enter and exit), as `branch_pass("unconditional")` uses it, plus the
  conditional pass's check that the unconditional adapter is not active there (`without`);
- the forward hooks that add the unconditional LoRA's weight differences (every RMSNorm, embedding and Linear bias the
  unconditional pass runs, the worst case): the time they add to one unconditional pass, each of those modules called
  on the CPU on 4 tokens (so that the time is the hooks' dispatch, not arithmetic) with the hooks off and on in turn.
  On a GPU each RMSNorm hook also launches a few elementwise kernels over the activations, which this does not
  measure.

    python benchmarks/bench_adapter_switch.py [--repeats 30]
"""

import argparse
import platform
import statistics
import time

import torch
from peft import LoraConfig

from diffusers_ideogram4.constants import TRANSFORMER_SIZES
from diffusers_ideogram4.fp8 import linear_weight_keys
from diffusers_ideogram4.lora_extraction import TEXT_ONLY_MODULES
from diffusers_ideogram4.transformer_ideogram4 import Ideogram4RMSNorm, Ideogram4Transformer2DModel
from diffusers_ideogram4.unconditional_lora import AdapterSwitch, WeightDiffs


UNCONDITIONAL_RANK, STYLE_RANK = 64, 16
STYLE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def unconditional_targets(model) -> list[str]:
    """Every Linear the unconditional pass runs: all but those that project text features."""
    names = [key.removesuffix(".weight") for key in linear_weight_keys(model)]
    return [name for name in names if name not in TEXT_ONLY_MODULES]


def full_size_with_adapters(size: str = "ideogram4", dtype: torch.dtype = torch.bfloat16):
    """The transformer of `size` on the meta device with the "unconditional" and "style" LoRA adapters (PEFT)."""
    with torch.device("meta"):
        model = Ideogram4Transformer2DModel(**TRANSFORMER_SIZES[size]).to(dtype)
        targets = unconditional_targets(model)
        model.add_adapter(
            LoraConfig(r=UNCONDITIONAL_RANK, lora_alpha=UNCONDITIONAL_RANK, target_modules=targets), "unconditional"
        )
        model.add_adapter(LoraConfig(r=STYLE_RANK, lora_alpha=STYLE_RANK, target_modules=STYLE_TARGETS), "style")
    model.set_adapters(["style"])  # the conditional pass's adapters, as single-transformer mode keeps them
    return model


def weight_differences(model, device="meta") -> dict[str, dict[str, torch.Tensor]]:
    """A float32 difference for every RMSNorm and embedding weight and every Linear bias the unconditional pass runs
    (what the extractor stores when the two transformers differ everywhere)."""
    diffs = {}
    for name, module in model.named_modules():
        name = name.removesuffix(".base_layer")
        if name.split(".")[0] in TEXT_ONLY_MODULES:
            continue
        if isinstance(module, (Ideogram4RMSNorm, torch.nn.Embedding)):
            diffs[name] = {"weight": torch.zeros(module.weight.shape, device=device)}
        elif isinstance(module, torch.nn.Linear) and module.bias is not None:
            diffs[name] = {"bias": torch.zeros(module.bias.shape, device=device)}
    return diffs


def median_ms(run, repeats: int) -> float:
    run()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def module_inputs(model, diffs, tokens: int = 4) -> list:
    """(module, input) for every module with a weight difference, the module's weights allocated on the CPU (not
    initialised) and the input shaped as in a pass over `tokens` image tokens."""
    from diffusers_ideogram4.lora import base_layer

    heads = TRANSFORMER_SIZES["ideogram4"]["num_attention_heads"]
    calls = []
    for name in diffs:
        module = base_layer(model.get_submodule(name)).to_empty(device="cpu")
        if isinstance(module, torch.nn.Embedding):
            x = torch.zeros(1, tokens, dtype=torch.long)
        elif isinstance(module, torch.nn.Linear):
            x = torch.zeros(1, tokens, module.in_features, dtype=torch.bfloat16)
        elif name.endswith(("norm_q", "norm_k")):  # per head
            x = torch.zeros(1, tokens, heads, module.weight.shape[0], dtype=torch.bfloat16)
        else:
            x = torch.zeros(1, tokens, module.weight.shape[0], dtype=torch.bfloat16)
        calls.append((module, x))
    return calls


def hook_ms_per_pass(model, repeats: int) -> tuple[int, float]:
    """(modules, ms): what the weight-difference hooks add to one unconditional pass on the CPU, every patched module
    called on a few tokens (its arithmetic negligible) with the hooks off and on in turn (paired, so that other load
    on the machine cancels out): the hooks' host cost per pass."""
    diffs = weight_differences(model, device="cpu")
    calls = module_inputs(model, diffs)
    hooks = WeightDiffs(model, diffs)

    def one_pass():
        with torch.no_grad():
            for module, x in calls:
                module(x)

    added = []
    with hooks.applied():
        one_pass()  # converts the differences to bf16 once, as the first pass does
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        plain = time.perf_counter() - start
        with hooks.applied():
            start = time.perf_counter()
            one_pass()
            added.append(time.perf_counter() - start - plain)
    hooks.remove()
    return len(diffs), 1000 * statistics.median(added)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = full_size_with_adapters()
    switch = AdapterSwitch(model)
    layers = switch.layers()
    modules = sum(1 for _ in model.modules())
    unconditional_pass, conditional_pass = ["unconditional"], ["style"]

    def diffusers_set_adapters():
        model.set_adapters(unconditional_pass)
        model.set_adapters(conditional_pass)

    def peft_set_adapter():
        for layer in layers:
            layer.set_adapter(unconditional_pass)
        for layer in layers:
            layer.set_adapter(conditional_pass)

    def ours():
        with switch.without("unconditional"):
            pass
        with switch.activated(unconditional_pass):
            pass

    rows = [
        ("diffusers `set_adapters`, there and back", median_ms(diffusers_set_adapters, args.repeats)),
        (
            "PEFT `set_adapter` per LoRA layer (list made once), there and back",
            median_ms(peft_set_adapter, args.repeats),
        ),
        ("`AdapterSwitch`: conditional check + unconditional switch and restore", median_ms(ours, args.repeats)),
    ]
    modules_with_diffs, hooks_ms = hook_ms_per_pass(model, args.repeats)
    rows.append((f"weight-difference hooks ({modules_with_diffs} modules), per unconditional pass", hooks_ms))

    print(
        f"Full-size transformer (34 layers) on the meta device, {modules} modules, {len(layers)} LoRA layers; adapters "
        f"'unconditional' (rank {UNCONDITIONAL_RANK}, every Linear but the text projection) and 'style' (rank "
        f"{STYLE_RANK}, attention). {platform.processor() or platform.machine()}, one thread, torch "
        f"{torch.__version__}, median of {args.repeats} runs; a guided step switches once (there and back).\n"
    )
    print("| switch | ms per step |")
    print("|---|---|")
    for name, milliseconds in rows:
        print(f"| {name} | {milliseconds:.3f} |")


if __name__ == "__main__":
    main()
