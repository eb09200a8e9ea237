"""Schedulers: the hub's FlowMatchEuler is the reference sampler bit for bit; other accepted schedulers are driven on
Ideogram 4's times and converge at their order on a flow with a closed-form solution; the others are refused."""

import math

import diffusers
import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from conftest import CAPTION, seeded
from diffusers_ideogram4 import Ideogram4Img2ImgPipeline, Ideogram4InpaintPipeline, Ideogram4Pipeline
from diffusers_ideogram4.constants import TAU_MAX, TAU_MIN
from diffusers_ideogram4.sampler import euler_step, model_times
from diffusers_ideogram4.schedulers import (
    is_reference_sampler,
    scheduler_stepper,
    stochastic_noise_follows_the_generator,
)
from diffusers_ideogram4.testing import tiny_components, tiny_pipeline


FLOW_UNIPC = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
CALL = dict(height=256, width=256, num_inference_steps=4, guidance_scale=3.0, output_type="latent")
FIX = (
    "The pipeline keeps Ideogram 4's time schedule (choose it with `preset`, `mu`, `std`, `num_inference_steps`) and "
    "hands it to the scheduler as custom sigmas. Use `FlowMatchEulerDiscreteScheduler()` (the reference sampler; "
    "`stochastic_sampling=True` is accepted) or `UniPCMultistepScheduler(use_flow_sigmas=True, "
    'prediction_type="flow_prediction")`, with their shift and spacing options at their defaults.'
)


# --------------------------------------------------------------------------------------------------------------------
# A flow with a known solution: data x0 ~ N(m, s^2) per dimension, z = tau * x0 + (1 - tau) * noise. The optimal
# velocity is linear in z, and the exact flow keeps (z - tau m) / sqrt(V(tau)) fixed, V(tau) = tau^2 s^2 + (1 - tau)^2.

DIMS = 256
MEAN = torch.linspace(-1.5, 1.5, DIMS, dtype=torch.float64).view(1, 1, DIMS)
STD = torch.linspace(0.1, 2.5, DIMS, dtype=torch.float64).view(1, 1, DIMS)


def variance(tau: float) -> torch.Tensor:
    return tau**2 * STD**2 + (1 - tau) ** 2


def optimal_velocity(z: torch.Tensor, tau: float) -> torch.Tensor:
    return MEAN + (tau * STD**2 - (1 - tau)) * (z - tau * MEAN) / variance(tau)


def exact_flow(z: torch.Tensor, tau_from: float, tau_to: float) -> torch.Tensor:
    return tau_to * MEAN + torch.sqrt(variance(tau_to) / variance(tau_from)) * (z - tau_from * MEAN)


def endpoint_error(make_scheduler, taus: list[float]) -> float:
    """max |z_N - exact| after driving the scheduler over `taus` exactly as the pipeline does."""
    noise = torch.randn(1, 1, DIMS, generator=seeded(1), dtype=torch.float64)
    z = start = taus[0] * MEAN + (1 - taus[0]) * noise
    step = scheduler_stepper(make_scheduler(), taus)
    for k in range(len(taus) - 1):
        z = step(k, z, optimal_velocity(z, taus[k]))
    return (z - exact_flow(start, taus[0], taus[-1])).abs().max().item()


def log_snr_uniform_taus(steps: int) -> list[float]:
    """Times evenly spaced in log(tau / (1 - tau)) from TAU_MIN to TAU_MAX: steps shrink like 1 / N everywhere (the
    Ideogram schedule's end steps shrink slower than any power of N, which hides the solvers' orders)."""
    logit = torch.linspace(math.log(TAU_MIN / (1 - TAU_MIN)), math.log(TAU_MAX / (1 - TAU_MAX)), steps + 1)
    return torch.sigmoid(logit.double()).tolist()


SOLVERS = {
    # name: (scheduler, error ratio band when the step count doubles); order p gives 2^p
    "euler": (FlowMatchEulerDiscreteScheduler, (1.8, 2.2)),
    "unipc-bh2-order2": (lambda: UniPCMultistepScheduler(**FLOW_UNIPC, solver_order=2), (6.5, 9.0)),  # UniC: p + 1
    "unipc-bh1-order1": (lambda: UniPCMultistepScheduler(**FLOW_UNIPC, solver_order=1, solver_type="bh1"), (3.5, 5.0)),
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_solvers_converge_at_their_order_on_gaussian_data(name):
    make, (low, high) = SOLVERS[name]
    errors = [endpoint_error(make, log_snr_uniform_taus(steps)) for steps in (48, 96, 192)]
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(low <= ratio <= high for ratio in ratios), (errors, ratios)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_solvers_converge_on_the_ideogram_schedule(name):
    """On Ideogram 4's own schedule every solver is about first order (its end steps dominate), but converges."""
    make, _ = SOLVERS[name]
    errors = [endpoint_error(make, model_times(steps, 0.0, 1.5, 1024, 1024).tolist()) for steps in (12, 24, 48, 96)]
    assert errors == sorted(errors, reverse=True), errors
    if name == "euler":
        assert all(1.8 <= errors[i] / errors[i + 1] <= 2.1 for i in range(3)), errors


# --------------------------------------------------------------------------------------------------------------------
# The pipeline


@pytest.fixture
def pipe():
    return tiny_pipeline(seed=0)


def test_default_scheduler_is_the_reference_euler_step_bit_for_bit(pipe):
    noise = torch.randn(1, 256, 128, generator=seeded(2))
    latents = pipe(CAPTION, latents=noise, **CALL).images
    taus = pipe.schedule(4, 0.0, 1.5, 256, 256)
    text_features, lengths = pipe.encode_prompts(pipe.tokenize([CAPTION]), 1, torch.device("cpu"))
    layout, uncond_layout = pipe.prepare_layouts(lengths, (16, 16), torch.device("cpu"))
    expected = noise
    with torch.no_grad():
        for k in range(4):
            velocity = pipe.predict_velocity(expected, taus[k], text_features, layout, uncond_layout, 3.0)
            expected = euler_step(expected, velocity, taus[k], taus[k + 1])
    assert torch.equal(latents, expected)


def test_unipc_is_driven_on_the_ideogram_times_and_ends_at_tau_max(pipe, monkeypatch):
    seen = []
    forward = type(pipe.transformer).forward

    def recording(self, *args, timestep, **kwargs):
        seen.append(float(timestep))
        return forward(self, *args, timestep=timestep, **kwargs)

    reference = pipe(CAPTION, generator=seeded(3), **CALL).images
    pipe.scheduler = UniPCMultistepScheduler(**FLOW_UNIPC)
    monkeypatch.setattr(type(pipe.transformer), "forward", recording)
    first = pipe(CAPTION, generator=seeded(3), **CALL).images
    taus = pipe.schedule(4, 0.0, 1.5, 256, 256)
    assert seen[::2] == [float(torch.tensor(tau, dtype=torch.float32)) for tau in taus[:-1]]  # cond, uncond per step
    assert pipe.scheduler.step_index == 4  # four steps, never the appended terminal sigma
    assert pipe.scheduler.sigmas[4].item() == np.float32(1.0 - TAU_MAX)
    assert torch.equal(pipe(CAPTION, generator=seeded(3), **CALL).images, first)
    assert (first - reference).abs().max() > 1e-3  # another solver, not the Euler step


SEEDED_STOCHASTIC_NOISE = stochastic_noise_follows_the_generator()


@pytest.mark.skipif(not SEEDED_STOCHASTIC_NOISE, reason=f"diffusers {diffusers.__version__} draws it unseeded")
def test_stochastic_flow_match_euler_is_seeded_by_the_generator(pipe):
    reference = pipe(CAPTION, generator=seeded(4), **CALL).images
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    first = pipe(CAPTION, generator=seeded(4), **CALL).images
    assert torch.equal(pipe(CAPTION, generator=seeded(4), **CALL).images, first)
    assert not torch.equal(pipe(CAPTION, generator=seeded(5), **CALL).images, first)
    assert (first - reference).abs().max() > 1e-3
    assert pipe.scheduler.sigmas[4].item() == np.float32(1.0 - TAU_MAX)


def test_unseeded_stochastic_flow_match_euler_is_refused(pipe, monkeypatch):
    """diffusers 0.38 draws the noise unseeded (on versions that seed it, that answer of the probe is simulated)."""
    from diffusers_ideogram4 import schedulers

    monkeypatch.setattr(schedulers, "stochastic_noise_follows_the_generator", lambda: False)
    with pytest.raises(ValueError, match=r"draws without the generator, so `generator` could not seed it"):
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)


def test_image_to_image_drives_the_scheduler_over_the_last_steps(pipe):
    edit = Ideogram4Img2ImgPipeline.from_pipe(pipe)
    edit.scheduler = UniPCMultistepScheduler(**FLOW_UNIPC)
    image = torch.rand(3, 256, 256, generator=seeded(6))
    out = edit(CAPTION, image=image, strength=0.5, generator=seeded(6), **CALL).images
    taus = pipe.schedule(4, 0.0, 1.5, 256, 256)
    assert out.shape == (1, 256, 128) and torch.isfinite(out).all()
    assert edit.scheduler.step_index == 2
    assert edit.scheduler.sigmas[0].item() == np.float32(1.0 - taus[2])
    assert edit.scheduler.sigmas[2].item() == np.float32(1.0 - TAU_MAX)


def test_inpainting_with_unipc_keeps_the_kept_tokens_exactly(pipe):
    """The inpainting step hook puts the kept tokens back after each scheduler step: they end as the encoded image,
    whatever the solver; the repainted ones follow UniPC."""
    inpaint = Ideogram4InpaintPipeline.from_pipe(pipe)
    image = torch.rand(3, 256, 256, generator=seeded(7))
    mask = torch.zeros(256, 256)
    mask[:, 128:] = 1.0  # repaint the right half: token columns 8..15
    kwargs = dict(image=image, mask_image=mask, num_inference_steps=4, output_type="latent")
    euler = inpaint(CAPTION, generator=seeded(7), **kwargs).images
    inpaint.scheduler = UniPCMultistepScheduler(**FLOW_UNIPC)
    unipc = inpaint(CAPTION, generator=seeded(7), **kwargs).images
    kept = torch.arange(256) % 16 < 8
    assert torch.equal(unipc[:, kept], euler[:, kept])
    assert (unipc[:, ~kept] - euler[:, ~kept]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "scheduler, message",
    [
        (
            FlowMatchHeunDiscreteScheduler(),
            "`scheduler` is a `FlowMatchHeunDiscreteScheduler`, which cannot run Ideogram 4's schedule: its "
            "`set_timesteps` takes no custom sigmas (only a step count and `shift`). ",
        ),
        (
            DPMSolverMultistepScheduler(**FLOW_UNIPC),
            "`scheduler` is a `DPMSolverMultistepScheduler`, which cannot run Ideogram 4's schedule: its "
            "`set_timesteps` takes no custom sigmas (its flow sigmas are a shifted linspace). ",
        ),
        (
            UniPCMultistepScheduler(),
            "`scheduler` is a `UniPCMultistepScheduler` with `use_flow_sigmas=False`, `prediction_type='epsilon'`, "
            "which would rewrite Ideogram 4's sigmas or misread the velocity. ",
        ),
        (
            UniPCMultistepScheduler(**FLOW_UNIPC, flow_shift=3.0),
            "`scheduler` is a `UniPCMultistepScheduler` with `flow_shift=3.0`, which would rewrite Ideogram 4's "
            "sigmas or misread the velocity. ",
        ),
        (
            FlowMatchEulerDiscreteScheduler(shift=3.0, use_karras_sigmas=True),
            "`scheduler` is a `FlowMatchEulerDiscreteScheduler` with `use_karras_sigmas=True`, `shift=3.0`, which "
            "would rewrite Ideogram 4's sigmas or misread the velocity. ",
        ),
        (
            FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
            "`scheduler` is a `FlowMatchEulerDiscreteScheduler` with `use_dynamic_shifting=True`, which would rewrite "
            "Ideogram 4's sigmas or misread the velocity. ",
        ),
        (
            UniPCMultistepScheduler(**FLOW_UNIPC, solver_p=FlowMatchEulerDiscreteScheduler()),
            "`scheduler` is a `UniPCMultistepScheduler` with `solver_p=FlowMatchEulerDiscreteScheduler(...)`, which "
            "would rewrite Ideogram 4's sigmas or misread the velocity. ",
        ),
    ],
    ids=["heun", "dpm", "unipc-no-flow", "unipc-shift", "euler-karras-shift", "euler-dynamic", "unipc-solver-p"],
)
def test_schedulers_that_cannot_take_the_schedule_are_refused_when_assigned(pipe, scheduler, message):
    with pytest.raises(ValueError) as error:
        pipe.scheduler = scheduler
    assert str(error.value) == message + FIX
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    with pytest.raises(ValueError) as error:  # and when a pipeline is built with it
        Ideogram4Pipeline(**dict(tiny_components(), scheduler=scheduler))
    assert str(error.value) == message + FIX


def test_a_falsy_shift_terminal_keeps_the_reference_sampler(pipe):
    # diffusers stretches the sigmas only for a truthy `shift_terminal`: 0.0 rewrites nothing and is accepted.
    scheduler = FlowMatchEulerDiscreteScheduler(shift_terminal=0.0)
    assert is_reference_sampler(scheduler)
    step = scheduler_stepper(scheduler, [0.25, 0.5])
    latents, velocity = torch.ones(1, 2, 4), torch.full((1, 2, 4), 2.0)
    assert torch.equal(step(0, latents, velocity), euler_step(latents, velocity, 0.25, 0.5))


def test_a_shift_set_after_assignment_is_refused_at_the_call_before_model_work(pipe, monkeypatch):
    pipe.scheduler.set_shift(2.0)
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda *a, **k: pytest.fail("the text encoder ran"))
    with pytest.raises(ValueError, match=r"^`scheduler` is a `FlowMatchEulerDiscreteScheduler` with `shift=2\.0`"):
        pipe(CAPTION, **CALL)
