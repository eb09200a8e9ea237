"""What `fuse_lora` + `unfuse_lora` leaves in the weights, by default (PEFT's unmerge: the delta subtracted again)
and with `exact_unfuse=True` (a host copy of each changed weight, restored bit for bit).

A random rank-16 LoRA (PEFT's `init_lora_weights=False`) on every Linear of the tiny random transformer, in float32 and
bfloat16. Prints a Markdown table of the largest absolute difference between the weights before fusing and after
unfusing, and that difference over the largest weight of its tensor.

    python benchmarks/bench_lora_unfuse.py
"""

import argparse

import torch
from peft import LoraConfig

from diffusers_ideogram4.testing import tiny_pipeline


def targets(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def residue(dtype: torch.dtype, exact: bool, seed: int = 0) -> tuple[float, float]:
    pipe = tiny_pipeline(seed=seed).to(dtype)
    model = pipe.transformer
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=targets(model), init_lora_weights=False), "a")
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    pipe.fuse_lora(components=["transformer"], exact_unfuse=exact)
    pipe.unfuse_lora(components=["transformer"])
    after = model.state_dict()
    absolute = max((after[k].float() - v.float()).abs().max().item() for k, v in before.items())
    relative = max(
        ((after[k].float() - v.float()).abs().max() / v.float().abs().max()).item() for k, v in before.items()
    )
    return absolute, relative


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    print("| dtype | unfuse | max abs difference | max difference / max abs weight |")
    print("|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for exact in (False, True):
            absolute, relative = residue(dtype, exact)
            name = "exact_unfuse=True" if exact else "default (PEFT unmerge)"
            print(f"| {str(dtype).removeprefix('torch.')} | {name} | {absolute:.3g} | {relative:.3g} |")


if __name__ == "__main__":
    main()
