"""Offload on CPU: the hooks of model, group and per-module (sequential-style) offload run every component and
leave the result unchanged."""

import pytest
import torch

from conftest import CAPTION, needs_cpu_group_offload, seeded
from diffusers_ideogram4.testing import tiny_pipeline


KWARGS = dict(height=256, width=256, num_inference_steps=2, output_type="latent")
COMPONENTS = ("text_encoder", "transformer", "unconditional_transformer", "vae")


@pytest.fixture(scope="module")
def expected():
    return tiny_pipeline(seed=3)(CAPTION, generator=seeded(1), **KWARGS).images


@needs_cpu_group_offload
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


def simulate_residency(pipe, components, monkeypatch) -> tuple[list[str], list[int]]:
    """On a CPU-only machine, under `enable_model_cpu_offload`: a component counts as on the accelerator from its
    hook's pre-forward until its hook offloads it. -> (the components moved there, in order; how many were there
    after each forward's hooks ran), filled in as the pipeline runs."""
    import diffusers_ideogram4.pipeline_ideogram4 as module

    names = {id(getattr(pipe, name)): name for name in components}
    resident, moves, peak = set(), [], []
    monkeypatch.setattr(module, "_on_accelerator", lambda model: names[id(model)] in resident)
    for hook in pipe._all_hooks:
        name = names[id(hook.model)]

        def offload(original=hook.offload, name=name):
            resident.discard(name)
            return original()

        def pre_forward(model, *args, original=hook.hook.pre_forward, previous=hook.hook, name=name, **kwargs):
            # accelerate offloads `prev_module_hook` when its `.model` is not on the CPU: the same test, simulated
            prev = previous.prev_module_hook
            if prev is not None and module._on_accelerator(prev.model):
                prev.offload()
            result = original(model, *args, **kwargs)
            if name not in resident:
                moves.append(name)
            resident.add(name)
            peak.append(len(resident))
            return result

        monkeypatch.setattr(hook, "offload", offload)
        monkeypatch.setattr(hook.hook, "pre_forward", pre_forward)
    return moves, peak


def test_model_offload_keeps_one_component_on_the_accelerator(expected, monkeypatch):
    """CPU-only machine, so residency is simulated: a component counts as on the accelerator from its hook's
    pre-forward until its hook offloads it. diffusers' chain alone leaves the text encoder resident until the
    unconditional transformer runs and the unconditional transformer resident when the conditional one runs again
    (two 9.3 B models at once)."""
    pipe = tiny_pipeline(seed=3)
    pipe.enable_model_cpu_offload(device="cpu")
    moves, peak = simulate_residency(pipe, COMPONENTS, monkeypatch)
    out = pipe(CAPTION, generator=seeded(1), **KWARGS).images
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert moves == ["text_encoder"] + ["transformer", "unconditional_transformer"] * 2
    assert max(peak) == 1
