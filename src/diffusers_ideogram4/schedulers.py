"""diffusers schedulers on Ideogram 4's time schedule (SPEC 4): honoured or refused, never ignored.

The pipeline's `scheduler` decides how each step moves the latents; the times stay Ideogram 4's (`sampler.model_times`,
the logit-normal schedule with the resolution shift, from TAU_MIN to TAU_MAX) whatever the scheduler.

- `FlowMatchEulerDiscreteScheduler` with settings that keep custom sigmas as given (the hub repos' scheduler) is the
  reference sampler itself: `sampler.euler_step`, bit for bit as before (the scheduler's own step would take the step
  sizes from float32 sigmas, a few ulps away).
- Other accepted schedulers (`FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`, `UniPCMultistepScheduler(
  use_flow_sigmas=True, prediction_type="flow_prediction")`) are driven through their public API: `set_timesteps(
  sigmas=1 - taus)` with all N + 1 sigmas, so the last one is 1 - TAU_MAX, then N calls of `step`; the terminal sigma
  the scheduler appends is never stepped to. diffusers' sigma is 1 - tau (1 = noise) and its model output is
  eps - x0 = -velocity.
- Everything else is refused by name: schedulers whose `set_timesteps` takes no sigmas (FlowMatchHeun, DPM-Solver),
  and settings that would rewrite the sigmas (shift, dynamic shifting, karras / exponential / beta spacing, ...).
"""

import functools
from collections.abc import Callable

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from .sampler import euler_step


# diffusers' timesteps are sigma * num_train_timesteps; time-dependent hooks (Pyramid Attention Broadcast) take their
# ranges in these units, 1000 = noise.
DIFFUSERS_TIMESTEP_SCALE = 1000
SUPPORTED_SCHEDULERS = (FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler)
# The settings each accepted class needs: `set_timesteps(sigmas=...)` keeps the sigmas as given (`SIGMA_SETTINGS`, the
# options both classes have), and the model output is read as a flow (any other value rewrites the sigmas or misreads
# the velocity).
SIGMA_SETTINGS = {
    "use_dynamic_shifting": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}
UNIPC_FLOW_SETTINGS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 1.0}
REQUIRED_SETTINGS = {
    FlowMatchEulerDiscreteScheduler: {**SIGMA_SETTINGS, "invert_sigmas": False},
    UniPCMultistepScheduler: {**UNIPC_FLOW_SETTINGS, **SIGMA_SETTINGS},
}
# Why the usual alternatives cannot run Ideogram 4's schedule.
REFUSED_SCHEDULERS = {
    "FlowMatchHeunDiscreteScheduler": "its `set_timesteps` takes no custom sigmas (only a step count and `shift`)",
    "DPMSolverMultistepScheduler": "its `set_timesteps` takes no custom sigmas (its flow sigmas are a shifted linspace)",
}


def rewriting_settings(scheduler) -> list[str]:
    """The settings of an accepted scheduler class that would rewrite custom sigmas or misread the model output, as
    `name=value` strings."""
    problems = []
    for option, keeps in REQUIRED_SETTINGS[type(scheduler)].items():
        value = scheduler.config.get(option, keeps)
        if value != keeps and not (keeps is None and not value):
            problems.append(f"`{option}={value!r}`")
    if type(scheduler) is FlowMatchEulerDiscreteScheduler and scheduler.shift != 1.0:  # `set_shift` changes it later
        problems.append(f"`shift={scheduler.shift!r}`")
    if getattr(scheduler, "solver_p", None) is not None:
        problems.append(f"`solver_p={type(scheduler.solver_p).__name__}(...)`")
    return problems


def check_scheduler(scheduler) -> None:
    """Refuse a scheduler that would not run Ideogram 4's schedule, naming it and the setting, with the fix."""
    fix = (
        "The pipeline keeps Ideogram 4's time schedule (choose it with `preset`, `mu`, `std`, `num_inference_steps`) "
        "and hands it to the scheduler as custom sigmas. Use `FlowMatchEulerDiscreteScheduler()` (the reference "
        "sampler; `stochastic_sampling=True` is accepted) or `UniPCMultistepScheduler(use_flow_sigmas=True, "
        'prediction_type="flow_prediction")`, with their shift and spacing options at their defaults.'
    )
    kind = type(scheduler)
    if kind not in SUPPORTED_SCHEDULERS:
        default = "it is not one of the schedulers known to take custom flow-matching sigmas"
        reason = REFUSED_SCHEDULERS.get(kind.__name__, default)
        raise ValueError(
            f"`scheduler` is a `{kind.__name__}`, which cannot run Ideogram 4's schedule: {reason}. {fix}"
        )
    problems = rewriting_settings(scheduler)
    if problems:
        raise ValueError(
            f"`scheduler` is a `{kind.__name__}` with {', '.join(problems)}, which would rewrite Ideogram 4's "
            f"sigmas or misread the velocity. {fix}"
        )
    if scheduler.config.get("stochastic_sampling", False) and not stochastic_noise_follows_the_generator():
        import diffusers

        raise ValueError(
            f"`scheduler` is a `{kind.__name__}` with `stochastic_sampling=True`, whose fresh noise diffusers "
            f"{diffusers.__version__} draws without the generator, so `generator` could not seed it. Upgrade "
            "diffusers (0.42 seeds it), or use a deterministic scheduler."
        )


@functools.cache
def stochastic_noise_follows_the_generator() -> bool:
    """Whether this diffusers' stochastic FlowMatchEuler step draws its noise from the `generator` it is given (older
    versions call `torch.randn_like`): two steps from one seed must agree."""
    steps = []
    for _ in range(2):
        scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
        scheduler.set_timesteps(sigmas=[1.0, 0.5])
        sample = torch.zeros(4)
        generator = torch.Generator().manual_seed(0)
        steps.append(scheduler.step(sample, scheduler.timesteps[0], sample, generator=generator, return_dict=False)[0])
    return torch.equal(*steps)


def is_reference_sampler(scheduler) -> bool:
    """True for the scheduler the hub repos ship (FlowMatchEuler keeping the sigmas, deterministic): the pipeline
    then runs `sampler.euler_step` itself."""
    return (
        type(scheduler) is FlowMatchEulerDiscreteScheduler
        and not rewriting_settings(scheduler)
        and not scheduler.config.get("stochastic_sampling", False)
    )


Stepper = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def scheduler_stepper(scheduler, taus: list[float], generator=None, device=None) -> Stepper:
    """`step(k, latents, velocity)` moving float32 `latents` from taus[k] to taus[k + 1] with `scheduler`.

    The reference sampler is `euler_step` on the float64 times. Any other accepted scheduler gets all len(taus)
    sigmas 1 - taus (ending at 1 - TAU_MAX) and is stepped len(taus) - 1 times with model output -velocity; the model
    still sees the times in `taus`. `generator` seeds a stochastic scheduler's fresh noise.
    """
    check_scheduler(scheduler)
    if is_reference_sampler(scheduler):
        return lambda k, latents, velocity: euler_step(latents, velocity, taus[k], taus[k + 1])
    sigmas = 1.0 - np.asarray(taus, dtype=np.float64)  # UniPC takes a numpy array only
    scheduler.set_timesteps(sigmas=sigmas, device=device)
    scheduler.set_begin_index(0)  # UniPC's integer timesteps repeat near both ends: never look a step up by value
    extra = {"generator": generator} if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) else {}

    def step(k: int, latents: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        timestep = scheduler.timesteps[k]
        return scheduler.step(-velocity, timestep, latents, return_dict=False, **extra)[0]

    return step
