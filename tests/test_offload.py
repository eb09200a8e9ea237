"""Offload on CPU: the hooks of model, group and per-module (sequential-style) offload run every component and
leave the result unchanged."""

import pytest
import torch

from conftest import CAPTION, seeded
from diffusers_ideogram4.testing import tiny_pipeline


KWARGS = dict(height=256, width=256, num_inference_steps=2, output_type="latent")
COMPONENTS = ("text_encoder", "transformer", "unconditional_transformer", "vae")


@pytest.fixture(scope="module")
def expected():
    return tiny_pipeline(seed=3)(CAPTION, generator=seeded(1), **KWARGS).images


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload(expected, offload_type):
    pipe = tiny_pipeline(seed=3)
    extra = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    pipe.enable_group_offload(
        onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type=offload_type, **extra
    )
    torch.testing.assert_close(pipe(CAPTION, generator=seeded(1), **KWARGS).images, expected, rtol=0, atol=0)


def test_per_module_offload_hooks(expected):
    """`enable_sequential_cpu_offload(device="cpu")` fails inside accelerate on a machine without an accelerator;
    `accelerate.cpu_offload` installs the same per-module hooks on each component."""
    from accelerate import cpu_offload

    pipe = tiny_pipeline(seed=3)
    for name in COMPONENTS:
        cpu_offload(getattr(pipe, name), torch.device("cpu"))
    assert all(hasattr(getattr(pipe, name), "_hf_hook") for name in COMPONENTS)
    torch.testing.assert_close(pipe(CAPTION, generator=seeded(1), **KWARGS).images, expected, rtol=0, atol=0)


def test_model_offload_hooks_every_component_in_order(expected):
    pipe = tiny_pipeline(seed=3)
    pipe.enable_model_cpu_offload(device="cpu")
    order = []
    # The VAE is reached through `decode` (diffusers' `apply_forward_hook`), not `forward`.
    assert hasattr(pipe.vae, "_hf_hook")
    hooks = [
        getattr(pipe, name).register_forward_pre_hook(lambda *a, name=name: order.append(name))
        for name in COMPONENTS[:-1]
    ]
    out = pipe(CAPTION, generator=seeded(1), **KWARGS).images
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # the text encoder once, then both branches at each of the 2 steps
    assert order == ["text_encoder"] + ["transformer", "unconditional_transformer"] * 2
    assert order.count("transformer") == order.count("unconditional_transformer") == 2
