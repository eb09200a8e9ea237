"""Context parallelism (Ulysses) over 2 CPU processes talking through gloo: the transformer and a whole pipeline call
split each sequence over both processes and give the single-process output.

Ring attention cannot run on a CPU (it needs a kernel returning the log-sum-exp, which only flash / cuDNN / sage have
on GPUs): `benchmarks/check_context_parallel_gpu.py` runs it, and Ulysses, on GPUs.
"""

import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import CAPTION, CAPTION_SHORT, seeded


WORLD = 2
BLOCKS = 2  # of the tiny transformer
EXCHANGES_PER_ATTENTION = 4  # Ulysses: q, k, v to head shards, the output back to sequence shards


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, port: int) -> None:
    # diffusers 0.42.1 places each process on device `rank % torch.accelerator.device_count()`, a division by zero on a
    # machine without any accelerator. This process runs on the CPU whatever that count is, so say there is one.
    torch.accelerator.device_count = lambda: 1
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        check_transformer()
        check_pipeline()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def counted_exchanges():
    """Count the all-to-all exchanges of the Ulysses path (`_all_to_all_single`, looked up as a module global)."""
    import diffusers.models.attention_dispatch as dispatch

    exchanges = []
    all_to_all = dispatch._all_to_all_single

    def counting(*args, **kwargs):
        exchanges.append(1)
        return all_to_all(*args, **kwargs)

    dispatch._all_to_all_single = counting
    try:
        yield exchanges
    finally:
        dispatch._all_to_all_single = all_to_all


def check_transformer() -> None:
    from diffusers import ContextParallelConfig

    from diffusers_ideogram4.testing import tiny_transformer
    from test_transformer import image_velocity, packed_inputs

    model = tiny_transformer(seed=3)
    cases = {"mask": packed_inputs((6, 3), grid=(3, 4)), "no-mask": packed_inputs((4, 4), grid=(3, 4))}
    cases["no-mask"]["segment_ids"] = None
    expected = {name: image_velocity(model, inputs) for name, inputs in cases.items()}
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    for name, inputs in cases.items():
        with counted_exchanges() as exchanges:
            got = image_velocity(model, inputs)
        torch.testing.assert_close(got, expected[name], rtol=1e-5, atol=1e-5)
        assert len(exchanges) == BLOCKS * EXCHANGES_PER_ATTENTION, name
    odd = packed_inputs((5, 4), grid=(3, 4))  # 5 + 12 = 17 tokens: cannot split in two
    try:
        image_velocity(model, odd)
    except ValueError as error:
        assert str(error).startswith("Context parallelism over 2 processes needs a sequence length divisible by 2")
    else:
        raise AssertionError("an odd sequence length was split")


def check_pipeline() -> None:
    from diffusers import ContextParallelConfig

    from diffusers_ideogram4.testing import tiny_pipeline

    pipe = tiny_pipeline(seed=0)
    # 272 x 272 pixels: 17 x 17 = 289 image tokens, odd, so both branches need padding to split in two.
    call = dict(height=272, width=272, num_inference_steps=2, guidance_scale=3.0, output_type="latent")
    expected = pipe([CAPTION, CAPTION_SHORT], generator=seeded(0), **call).images
    for transformer in (pipe.transformer, pipe.unconditional_transformer):
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    with counted_exchanges() as exchanges:
        got = pipe([CAPTION, CAPTION_SHORT], generator=seeded(0), **call).images
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(exchanges) == 2 * 2 * BLOCKS * EXCHANGES_PER_ATTENTION  # steps x branches x blocks


def test_layouts_pad_to_a_length_the_processes_can_split():
    from diffusers_ideogram4.layout import image_only_layout, pack_layout

    plain = pack_layout([5, 5], 3, 4)  # 5 + 12 = 17 tokens
    split = pack_layout([5, 5], 3, 4, multiple=2)  # one padding token per row, so now masked
    assert (plain.num_text, plain.attention_mask) == (5, None)
    assert split.num_text == 6 and split.indicator.shape == (2, 18)
    assert split.segment_ids[:, 5].tolist() == [-1, -1] and split.attention_mask is not None
    assert torch.equal(split.position_ids[:, 6:], plain.position_ids[:, 5:])
    assert pack_layout([6, 4], 3, 4, multiple=2).num_text == 6  # 18 already splits in two
    odd_image = image_only_layout(2, 3, 5, multiple=2)  # 15 image tokens behind one padding token
    assert odd_image.num_text == 1 and odd_image.indicator[:, 0].tolist() == [0, 0]
    assert odd_image.attention_mask[:, 0, 1:, 0].any().item() is False  # no image token attends the padding
    assert image_only_layout(2, 3, 4, multiple=2).num_text == 0


@pytest.mark.slow
def test_ulysses_over_two_cpu_processes_matches_one_process():
    mp.spawn(worker, args=(free_port(),), nprocs=WORLD, join=True)
