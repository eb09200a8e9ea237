"""GPU check (not run in the test suite; no GPU was available when it was written): Ulysses and ring context
parallelism of the Ideogram 4 transformer over the GPUs of one machine, against the single-GPU output.

Run on a machine with N >= 2 GPUs: `torchrun --nproc_per_node=N benchmarks/check_context_parallel_gpu.py`. Rank 0
prints a Markdown table: for each mode and batch, the largest difference on the image tokens from the same model run
on one GPU, or the error raised. Expected: Ulysses matches with and without padding; ring matches the unpadded batch
and is refused by name for the padded one (its kernels get the whole mask with a chunk of the keys).
"""

import argparse
import copy
import os

import torch
import torch.distributed as dist


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--ring-backend", default="_native_cudnn", help="a backend returning the log-sum-exp")
    parser.add_argument("--model", default="ideogram4", help="a size name: ideogram4 (full-width blocks) or tiny")
    parser.add_argument("--device", default="cuda", help="cpu only to try the script itself (gloo, float32)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        dist.init_process_group("nccl")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dtype = torch.bfloat16
    else:
        torch.accelerator.device_count = lambda: 1  # diffusers 0.42.1 divides by it; 0 without an accelerator
        dist.init_process_group("gloo")
        dtype = torch.float32
    rank, world = dist.get_rank(), dist.get_world_size()

    from diffusers import ContextParallelConfig

    from diffusers_ideogram4 import Ideogram4Transformer2DModel
    from diffusers_ideogram4.constants import TRANSFORMER_SIZES
    from diffusers_ideogram4.testing import random_transformer_inputs

    config = dict(TRANSFORMER_SIZES[args.model], num_layers=args.layers)
    torch.manual_seed(0)
    reference = Ideogram4Transformer2DModel(**config).to(device, dtype).eval()
    grid = (args.size // 16, args.size // 16)
    batches = {
        name: random_transformer_inputs(lengths, grid, config, multiple=world, device=device, dtype=dtype)
        for name, lengths in (("padded (mask)", (200, 120)), ("unpadded", (200,)))
    }
    modes = {
        f"Ulysses {world} (native)": (ContextParallelConfig(ulysses_degree=world), None),
        f"ring {world} ({args.ring_backend})": (ContextParallelConfig(ring_degree=world), args.ring_backend),
    }
    rows = []
    with torch.no_grad():
        expected = {name: reference(**inputs)[0] for name, inputs in batches.items()}
        for mode, (parallel, backend) in modes.items():
            model = copy.deepcopy(reference)
            if backend is not None:
                model.set_attention_backend(backend)
            model.enable_parallelism(config=parallel)
            for name, inputs in batches.items():
                image = inputs["indicator"] == 2
                try:
                    got = model(**inputs)[0]
                    result = f"max abs diff {(got[image] - expected[name][image]).abs().max().item():.3g}"
                except Exception as error:  # noqa: BLE001 - reported in the table
                    result = f"{type(error).__name__}: {str(error)[:160]}"
                rows.append(f"| {mode} | {name} | {result} |")
    if rank == 0:
        where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU process"
        print(f"{where} x {world}, {args.layers} blocks of the {args.model} size, {dtype}, {args.size}^2.\n")
        print("| mode | batch | vs one GPU |\n|---|---|---|\n" + "\n".join(rows))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
