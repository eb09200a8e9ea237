"""`Ideogram4Pipeline`: structured caption in, image out, faithful to the reference sampler (SPEC 3-5)."""

import contextvars
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffusers.utils
import numpy as np
import PIL.Image
import torch
from accelerate.hooks import UserCpuOffloadHook
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (looked up here by diffusers' loader)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (likewise)
from diffusers.utils import BaseOutput, logging
from transformers import PreTrainedModel, PreTrainedTokenizerBase  # noqa: F401  (likewise)

from .caches import check_cache_steps, reset_caches
from .captions import CAPTION_CHECK_MODES, check_prompts
from .captions.limits import check_prompt_lengths
from .constants import DEFAULT_IMAGE_SIDE, OFFICIAL_ENTRIES, PATCH_SIZE, PIXELS_PER_TOKEN
from .layout import (
    PackedLayout,
    describe_vae_statistics,
    image_grid,
    image_only_layout,
    initial_noise,
    latent_statistics,
    needs_attention_mask,
    pack_layout,
    padded_text_length,
    unpatchify,
)
from .loading import HUB_DOWNLOAD_KWARGS, load_pretrained, resolve_dtype
from .prompt_expansion import Ideogram4PromptEnhancerHead, Ideogram4PromptExpansionMixin, check_head_fits
from .sampler import DEFAULT_PRESET, DISTILLED_PRESET, PRESETS, guided_velocity, model_times
from .schedulers import DIFFUSERS_TIMESTEP_SCALE, check_scheduler, scheduler_stepper
from .text_encoder import Ideogram4TextEncoder, check_token_counts, pad_token_ids, tokenize_prompt
from .transformer_ideogram4 import Ideogram4Transformer2DModel
from .unconditional_lora import Ideogram4UnconditionalLoraMixin
from .validation import check_generator_type, check_image_size, finite_float, require_positive_int, string_list


logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# How token latents become VAE latents: the reference release's vectors, or the VAE's `bn` (diffusers' built-in way).
LATENT_NORMALIZATIONS = ("reference", "vae_bn")
# diffusers >= 0.42 names the loading dtype `dtype` and deprecates `torch_dtype`; older versions know only the latter.
DIFFUSERS_TAKES_DTYPE = hasattr(diffusers.utils, "_resolve_dtype")

# Set while `from_pipe` without `dtype` runs diffusers' own, whose closing `to(dtype)` (float32 by default) would cast
# the components it shares with the source pipeline in place. A context variable, so that other threads' `to` calls
# are not affected.
_SKIP_FROM_PIPE_CAST = contextvars.ContextVar("ideogram4_skip_from_pipe_cast", default=False)

# diffusers' loader resolves the model_index.json entries `_our_entry` remaps in this module, which therefore imports
# the base classes above. (Saving writes the hub's entries, `constants.OFFICIAL_ENTRIES`.)
COMPONENT_LIBRARY = __name__


@dataclass
class Ideogram4PipelineOutput(BaseOutput):
    """images: a list of PIL images, a (B, H, W, 3) numpy array, a (B, 3, H, W) tensor, or (B, N_img, 128) latents.
    captions: with `prompt_upsampling=True`, the captions the ideas were expanded into (one per prompt), else None."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    captions: list[str] | None = None


class StrictAutoencoderKLFlux2(AutoencoderKLFlux2):
    """What model_index.json's `vae` entry points at when the pipeline loads: diffusers' own `AutoencoderKLFlux2`,
    loaded by this package's one strict rule (`diffusers_ideogram4.loading`). Only a loader: never instantiated."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> AutoencoderKLFlux2:
        return load_pretrained(
            pretrained_model_name_or_path,
            build_model=lambda folder: AutoencoderKLFlux2.from_config(AutoencoderKLFlux2.load_config(folder)),
            host_from_pretrained=AutoencoderKLFlux2.from_pretrained,  # the base class's instances, not this loader's
            hint="Expected the FLUX.2 VAE (`vae/` of an Ideogram 4 repo).",
            **kwargs,
        )


# model_index.json class names each model component may have, and the class of this package that loads it.
COMPONENT_CLASSES = {
    "transformer": (("Ideogram4Transformer2DModel",), "Ideogram4Transformer2DModel"),
    "unconditional_transformer": (("Ideogram4Transformer2DModel",), "Ideogram4Transformer2DModel"),
    "text_encoder": (
        ("Qwen3VLModel", "Qwen3VLForConditionalGeneration", "Ideogram4TextEncoder"),
        "Ideogram4TextEncoder",
    ),
    "vae": (("AutoencoderKLFlux2",), "StrictAutoencoderKLFlux2"),
    "prompt_enhancer_head": (("Ideogram4PromptEnhancerHead",), "Ideogram4PromptEnhancerHead"),
}


def _model_entry(name: str, entry) -> bool:
    return name in COMPONENT_CLASSES and isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def check_component_entries(index: dict, passed=()) -> None:
    """Refuse model_index.json entries of classes that cannot work here (another VAE would lose the latent statistics
    and fail only after the denoising loop), before any component is loaded; `passed` components replace theirs."""
    for name, entry in index.items():
        if name not in passed and _model_entry(name, entry) and entry[1] not in COMPONENT_CLASSES[name][0]:
            raise ValueError(
                f"model_index.json names `{entry[1]}` ({entry[0]}) for `{name}`; an Ideogram 4 pipeline needs one of "
                f"{list(COMPONENT_CLASSES[name][0])} there. Fix the entry, or pass a matching `{name}=` to "
                "`from_pretrained`."
            )


def _our_entry(name: str, entry):
    """Point a hub model_index.json entry at this package's class that loads it."""
    return (COMPONENT_LIBRARY, COMPONENT_CLASSES[name][1]) if _model_entry(name, entry) else entry


def check_components_fit(vae, text_encoder, transformer, unconditional_transformer) -> None:
    """Components of other classes or from different models (a 4 B text encoder, another VAE) fail at the first step
    or after the loop; refuse them when the pipeline is built, naming the classes and sizes. Absent ones pass."""
    expected = {
        "vae": (vae, AutoencoderKLFlux2),
        "text_encoder": (text_encoder, Ideogram4TextEncoder),
        "transformer": (transformer, Ideogram4Transformer2DModel),
        "unconditional_transformer": (unconditional_transformer, Ideogram4Transformer2DModel),
    }
    wrong = [
        f"`{name}` is a {type(value).__module__}.{type(value).__name__}, not a {cls.__module__}.{cls.__name__}"
        for name, (value, cls) in expected.items()
        if value is not None and not isinstance(value, cls)
    ]
    if wrong:
        raise ValueError(
            "An Ideogram 4 pipeline cannot run these components: " + "; ".join(wrong) + ". Load them with "
            "diffusers_ideogram4's classes (`Ideogram4Pipeline.from_pretrained` does)."
        )
    if transformer is None:  # what follows compares each component with it
        return
    config, problems = transformer.config, []
    if text_encoder is not None and text_encoder.feature_dim != config.llm_features_dim:
        hidden = text_encoder.config.text_config.hidden_size
        problems.append(
            f"`text_encoder` gives {text_encoder.feature_dim} features per token (13 taps x hidden {hidden}), "
            f"`transformer` expects llm_features_dim={config.llm_features_dim}"
        )
    if vae is not None:
        channels = vae.config.latent_channels * PATCH_SIZE * PATCH_SIZE
        if channels != config.in_channels:
            problems.append(
                f"`vae` has {vae.config.latent_channels} latent channels ({channels} per 2x2 token), `transformer` "
                f"expects in_channels={config.in_channels}"
            )
    if unconditional_transformer is not None and unconditional_transformer.config.in_channels != config.in_channels:
        problems.append(
            f"`unconditional_transformer` has in_channels={unconditional_transformer.config.in_channels}, "
            f"`transformer` {config.in_channels}"
        )
    if problems:
        raise ValueError(
            "The pipeline's components do not belong to one Ideogram 4 model: " + "; ".join(problems) + ". Load "
            "every component from the same repo (or pass matching ones)."
        )


def arguments_for(step: Callable, call_locals: dict[str, Any]) -> dict[str, Any]:
    """The arguments `step` takes, by name, out of a calling method's `locals()`: a `__call__` hands its arguments on
    to the step that checks them without listing them again (a missing one still raises in `step`)."""
    parameters = inspect.signature(step).parameters
    return {name: value for name, value in call_locals.items() if name in parameters}


def _on_accelerator(model: torch.nn.Module) -> bool:
    return next(model.parameters()).device.type != "cpu"


class _ReleaseOthers(UserCpuOffloadHook):
    """Put where accelerate's model-offload hook keeps "the previous component": before a component runs, every other
    component still on the accelerator goes back to the CPU. diffusers chains the hooks in `model_cpu_offload_seq`
    order, which never releases the unconditional transformer when the conditional one runs again at the next step
    (both would then be resident), nor the conditional one when the VAE decodes after a guidance-1 step."""

    def __init__(self, others: list[UserCpuOffloadHook]) -> None:  # no super().__init__: `model` is derived
        self.others = others

    @property
    def model(self) -> torch.nn.Module:  # what the hook checks before calling `offload`
        resident = [hook.model for hook in self.others if _on_accelerator(hook.model)]
        return resident[0] if resident else self.others[0].model

    def offload(self) -> None:
        for hook in self.others:
            if _on_accelerator(hook.model):
                hook.offload()


class Ideogram4Pipeline(DiffusionPipeline, Ideogram4UnconditionalLoraMixin, Ideogram4PromptExpansionMixin):
    r"""
    Text-to-image with Ideogram 4: a structured JSON caption in, an image out.

    Args:
        scheduler ([`FlowMatchEulerDiscreteScheduler`] or [`UniPCMultistepScheduler`]): how each step moves the
            latents along Ideogram 4's own time schedule. The hub's FlowMatchEuler is the reference sampler; another
            accepted scheduler is driven with the same times; one that cannot take them is refused when assigned
            (`schedulers.py`).
        vae ([`AutoencoderKLFlux2`]): the FLUX.2 VAE.
        text_encoder ([`Ideogram4TextEncoder`]): Qwen3-VL's language model, tapped at 13 layers.
        tokenizer ([`PreTrainedTokenizerBase`]): Qwen tokenizer with its chat template.
        transformer ([`Ideogram4Transformer2DModel`]): the conditional branch.
        unconditional_transformer ([`Ideogram4Transformer2DModel`], *optional*): the unconditional branch; leave it
            out for CFG-distilled checkpoints, which then run one branch with guidance 1.0, or to run the unconditional
            branch as a LoRA on `transformer` (`load_unconditional_lora`: one resident transformer).
        prompt_enhancer_head ([`Ideogram4PromptEnhancerHead`], *optional*): Qwen3-VL-8B-Instruct's LM head; with it
            the text encoder expands plain-text ideas into captions (`expand_prompt`, `prompt_upsampling=True`).
        latent_normalization (`str`, defaults to "reference"): how token latents become VAE latents before decoding
            (and the reverse when encoding): "reference", the reference release's two 128-vectors (for the released
            layout; any other layout uses the VAE's `bn`), or "vae_bn", the VAE's `bn` statistics as diffusers'
            built-in pipeline uses them. Saved in model_index.json.
    """

    model_cpu_offload_seq = "text_encoder->prompt_enhancer_head->transformer->unconditional_transformer->vae"
    _optional_components = ["unconditional_transformer", "prompt_enhancer_head"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKLFlux2,
        text_encoder: Ideogram4TextEncoder,
        tokenizer: PreTrainedTokenizerBase,
        transformer: Ideogram4Transformer2DModel,
        unconditional_transformer: Ideogram4Transformer2DModel | None = None,
        prompt_enhancer_head: Ideogram4PromptEnhancerHead | None = None,
        latent_normalization: str = "reference",
    ) -> None:
        super().__init__()
        if latent_normalization not in LATENT_NORMALIZATIONS:
            raise ValueError(
                f"`latent_normalization={latent_normalization!r}` is not supported; use 'reference' (the reference "
                "release's vectors, the default) or 'vae_bn' (the VAE's `bn` statistics, like diffusers' built-in "
                "pipeline)."
            )
        self.register_modules(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            unconditional_transformer=unconditional_transformer,
            prompt_enhancer_head=prompt_enhancer_head,
        )
        self.register_to_config(latent_normalization=latent_normalization)
        check_components_fit(vae, text_encoder, transformer, unconditional_transformer)
        check_head_fits(text_encoder, prompt_enhancer_head)
        held = describe_vae_statistics(vae) if vae is not None and latent_normalization == "reference" else None
        if held is not None:
            logger.info(
                f"The VAE's `bn` holds {held}; decoding (and encoding) follow the reference release's latent "
                "normalisation. Pass `latent_normalization='vae_bn'` to use the VAE's statistics instead."
            )
        self.image_processor = VaeImageProcessor(vae_scale_factor=PIXELS_PER_TOKEN)

    def __setattr__(self, name: str, value) -> None:
        if name == "scheduler":  # also reached from __init__ (register_modules) and from_pipe
            check_scheduler(value)
        super().__setattr__(name, value)

    # ----------------------------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader, building this package's classes from a hub-layout folder or repo id (every component
        loaded strictly). Takes `dtype` or its older name `torch_dtype` with every supported diffusers version."""
        dtype = resolve_dtype(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None))
        if dtype is not None:
            kwargs["dtype" if DIFFUSERS_TAKES_DTYPE else "torch_dtype"] = dtype
        hub = {key: kwargs[key] for key in (*HUB_DOWNLOAD_KWARGS, "subfolder") if key in kwargs}
        check_component_entries(cls.load_config(pretrained_model_name_or_path, **hub), passed=kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """Point the hub entries (`diffusers.Ideogram4Transformer2DModel`, `transformers.Qwen3VLModel`) at ours."""
        config_dict = {name: _our_entry(name, entry) for name, entry in config_dict.items()}
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' `from_pipe`: a pipeline of this class on the very same component objects as `pipeline` (no
        reload, no copy; LoRA adapters, fp8 layers and `latent_normalization` carry over), e.g.
        `Ideogram4InpaintPipeline.from_pipe(pipe)`. diffusers (0.42 included, its issue #12754) then casts the new
        pipeline to `dtype`, float32 when none is given, which would cast the shared components of `pipeline` in
        place; without `dtype` every component keeps its own here."""
        if kwargs.get("dtype") is not None or kwargs.get("torch_dtype") is not None:
            return super().from_pipe(pipeline, **kwargs)
        kwargs.pop("dtype", None)
        kwargs.pop("torch_dtype", None)
        skipping = _SKIP_FROM_PIPE_CAST.set(True)  # the cast is from_pipe's last statement (`to` below)
        try:
            return super().from_pipe(pipeline, **kwargs)
        finally:
            _SKIP_FROM_PIPE_CAST.reset(skipping)

    def to(self, *args, **kwargs):
        """diffusers' `to`; inside `from_pipe` without `dtype` (in this thread only) it does nothing, see there."""
        return self if _SKIP_FROM_PIPE_CAST.get() else super().to(*args, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' `save_pretrained` (and its `push_to_hub=True`), writing the hub repos' class names into
        model_index.json (`diffusers.Ideogram4Transformer2DModel`, `transformers.Qwen3VLModel`), so that the saved
        folder loads like a hub repo: in this package's pipeline and in diffusers' built-in one."""
        ours = {name: entry for name, entry in self.config.items() if isinstance(entry, (list, tuple))}
        self.register_to_config(**{name: OFFICIAL_ENTRIES.get(entry[1], entry) for name, entry in ours.items()})
        try:
            super().save_pretrained(os.fspath(save_directory), **kwargs)  # diffusers' push splits it as a str
        finally:
            self.register_to_config(**ours)

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """diffusers' model offload, where a component going to the accelerator sends every other one back: one
        component on the accelerator at a time, both transformers included (they alternate at every step)."""
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        hooks = [hook for hook in self._all_hooks if isinstance(hook, UserCpuOffloadHook)]
        for hook in hooks:
            hook.hook.prev_module_hook = _ReleaseOthers([other for other in hooks if other is not hook])

    # ----------------------------------------------------------------------------------------------------------------
    # Steps of __call__, each callable on its own

    @property
    def has_unconditional_branch(self) -> bool:
        """An `unconditional_transformer`, or an unconditional LoRA on `transformer` (single-transformer mode)."""
        return self.check_unconditional_branch()

    def resolve_sampling(
        self,
        preset: str | None,
        num_inference_steps: int | None,
        guidance_scale: float | None,
        guidance_schedule: list[float] | None,
        mu: float | None,
        std: float | None,
    ) -> tuple[list[float], float, float]:
        """-> (guidance per step, first step first; mu; std), from the preset and the explicit overrides."""
        if preset is None:
            preset = DEFAULT_PRESET if self.has_unconditional_branch else DISTILLED_PRESET
        if preset not in PRESETS:
            raise ValueError(f"`preset={preset!r}` is not a preset; choose one of {sorted(PRESETS)}.")
        settings = PRESETS[preset]
        if guidance_scale is not None and guidance_schedule is not None:
            raise ValueError(
                "`guidance_scale` and `guidance_schedule` were both given; pass a constant `guidance_scale` or a "
                "per-step `guidance_schedule`, not both."
            )
        if guidance_schedule is not None:
            ordered = isinstance(guidance_schedule, (list, tuple)) or getattr(guidance_schedule, "ndim", None) == 1
            if not ordered or len(guidance_schedule) == 0:
                raise ValueError(
                    f"`guidance_schedule` must be a list of numbers, one per step, got {guidance_schedule!r}; give a "
                    "non-empty list, tuple or 1-D tensor, first step first (a set has no order)."
                )
        if num_inference_steps is None:
            num_inference_steps = settings.num_inference_steps if guidance_schedule is None else len(guidance_schedule)
        require_positive_int("num_inference_steps", num_inference_steps)
        if guidance_schedule is not None:
            schedule = [finite_float(f"guidance_schedule[{i}]", g) for i, g in enumerate(guidance_schedule)]
            if len(schedule) != num_inference_steps:
                raise ValueError(
                    f"`guidance_schedule` has {len(schedule)} entries but `num_inference_steps` is "
                    f"{num_inference_steps}; give one guidance value per step, first step first."
                )
        elif guidance_scale is not None:
            schedule = [finite_float("guidance_scale", guidance_scale)] * num_inference_steps
        else:
            schedule = settings.guidance_schedule(num_inference_steps)
        if not self.has_unconditional_branch and any(g != 1.0 for g in schedule):
            raise ValueError(
                f"This pipeline has no `unconditional_transformer` (a CFG-distilled checkpoint), so guidance must be "
                f"1.0 at every step, got {sorted(set(schedule))}. Pass `guidance_scale=1.0`, "
                f"`preset={DISTILLED_PRESET!r}`, or load an `unconditional_transformer` (or an unconditional LoRA: "
                "`load_unconditional_lora`)."
            )
        mu = settings.mu if mu is None else finite_float("mu", mu)
        std = settings.std if std is None else finite_float("std", std)
        if std <= 0:
            raise ValueError(
                f"`std={std}` must be positive: it is the spread of the logit-normal schedule (the preset's is "
                f"{settings.std}); zero or a negative value would give NaN times or run the sampler backwards."
            )
        return schedule, mu, std

    def check_inputs(
        self,
        prompt,
        height,
        width,
        *,
        num_inference_steps,
        guidance_scale,
        guidance_schedule,
        mu,
        std,
        preset,
        num_images_per_prompt,
        generator,
        latents,
        output_type,
        attention_kwargs,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
        caption_check,
        prompt_upsampling=False,
        prompt_upsampling_kwargs=None,
    ) -> tuple[list[str], tuple[int, int], list[float], float, float]:
        """Step 1 of every call: validate every argument before any model work.
        -> (prompts as a list, image token grid, guidance per step, mu, std)."""
        prompts = string_list(
            "prompt",
            prompt,
            "a caption string",
            " Serialize dict captions with `diffusers_ideogram4.Caption` or `json.dumps`.",
        )
        check_image_size(height, width)
        grid = image_grid(height, width)
        require_positive_int("num_images_per_prompt", num_images_per_prompt)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type={output_type!r}` is not supported; use one of {list(OUTPUT_TYPES)}.")
        if caption_check not in CAPTION_CHECK_MODES:
            raise ValueError(
                f"`caption_check={caption_check!r}` is not supported; use one of {list(CAPTION_CHECK_MODES)}."
            )
        if latents is not None:
            self.check_latents(latents)  # a tensor from here on
            expected = (len(prompts) * num_images_per_prompt, grid[0] * grid[1], self.transformer.config.in_channels)
            if tuple(latents.shape) != expected:
                raise ValueError(
                    f"`latents` has shape {tuple(latents.shape)}, expected {expected}: (prompts x "
                    f"num_images_per_prompt, (height/16) x (width/16) image tokens, {expected[2]} channels) in token "
                    "layout."
                )
        batch_size = len(prompts) * num_images_per_prompt
        if latents is not None and generator is not None:
            raise ValueError(
                "`generator` and `latents` were both given; the generator only draws the initial noise, which "
                "`latents` replaces. Pass one of them."
            )
        check_generator_type(generator)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators, but {len(prompts)} prompt(s) x "
                f"`num_images_per_prompt={num_images_per_prompt}` make {batch_size} images; give one per image "
                "or a single generator."
            )
        if callback_on_step_end is not None:
            try:
                inspect.signature(callback_on_step_end).bind(self, 0, 0.0, {})
            except (TypeError, ValueError):
                raise ValueError(
                    f"`callback_on_step_end` must be callable as `callback(pipe, step, tau, tensors)`, got "
                    f"{callback_on_step_end!r}."
                ) from None
        if not isinstance(callback_on_step_end_tensor_inputs, (list, tuple)):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be a list of names, got {callback_on_step_end_tensor_inputs!r}; "
                f"e.g. {self._callback_tensor_inputs}."
            )
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has {unknown}; the callback can receive {self._callback_tensor_inputs}."
            )
        guidance, mu, std = self.resolve_sampling(
            preset, num_inference_steps, guidance_scale, guidance_schedule, mu, std
        )
        if not prompt_upsampling:  # ideas are bounded by the language model's context instead (`expand_prompt`)
            check_prompt_lengths(prompts, self.tokenizer)  # a length alone proving it too long: before any walk
        # Validates attention_kwargs and the scheduler (`set_shift` may have changed it since) before any model work.
        Ideogram4Transformer2DModel.scale_from_attention_kwargs(attention_kwargs)
        check_scheduler(self.scheduler)
        if prompt_upsampling_kwargs is not None and not prompt_upsampling:
            raise ValueError("`prompt_upsampling_kwargs` was given without `prompt_upsampling=True`; pass both.")
        return prompts, grid, guidance, mu, std

    def check_latents(self, latents) -> None:
        """Initial noise given by the user: a finite float32 tensor on the CPU or the execution device."""
        if not isinstance(latents, torch.Tensor):
            raise ValueError(f"`latents` must be a torch.Tensor, got {type(latents).__name__}.")
        if latents.dtype != torch.float32:
            raise ValueError(
                f"`latents` has dtype {latents.dtype}; the sampler runs in float32 (like the reference): pass "
                "`latents.float()` (a cast of lower-precision noise is not the same noise)."
            )
        if latents.device.type not in ("cpu", self._execution_device.type):
            raise ValueError(
                f"`latents` is on {latents.device}; pass it on the CPU or on {self._execution_device}, where the "
                "pipeline runs."
            )
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("`latents` holds NaN or infinite values.")

    def callback_outputs(self, callback, outputs, tensors: dict) -> dict:
        """What a step callback returned: None, or a dict of some of the tensors it was given, same shape and dtype."""
        if outputs is None:
            return {}
        name = getattr(callback, "__qualname__", type(callback).__name__)
        if not isinstance(outputs, dict):
            raise ValueError(
                f"`callback_on_step_end` ({name}) returned a {type(outputs).__name__}; return None or a dict such as "
                f'{{"latents": latents}}.'
            )
        unknown = sorted(set(outputs) - set(self._callback_tensor_inputs))
        if unknown:
            raise ValueError(
                f"`callback_on_step_end` ({name}) returned {unknown}; it can return only "
                f"{self._callback_tensor_inputs}."
            )
        for key, value in outputs.items():
            given = tensors.get(key)
            same = isinstance(value, torch.Tensor) and given is not None and value.shape == given.shape
            if not same or value.dtype != given.dtype:
                described = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else repr(value)
                raise ValueError(
                    f"`callback_on_step_end` ({name}) returned `{key}` = {described}; it must be a tensor like the one "
                    f"it was given ({tuple(given.shape)} {given.dtype})."
                )
        return outputs

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        """Chat-template token ids of every prompt; raises when one is over the 2048-token limit."""
        token_ids = [tokenize_prompt(self.tokenizer, prompt) for prompt in prompts]
        check_token_counts(token_ids)
        return token_ids

    def encode_prompt(self, token_ids: list[list[int]], device: torch.device) -> tuple[torch.Tensor, list[int]]:
        """Text features (B, T_max, 13 * hidden) float32 of prompts padded to the longest one, and their lengths."""
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids, attention_mask = pad_token_ids(token_ids, pad_id)
        features = self.text_encoder(input_ids.to(device), attention_mask.to(device))
        return features.to(device), [len(ids) for ids in token_ids]

    def prepare_latents(self, batch_size, grid, generator, latents, device) -> torch.Tensor:
        """The initial noise (B, N_img, in_channels) float32 in token layout: `latents`, or drawn with `generator`."""
        if latents is not None:
            return latents.to(device=device, dtype=torch.float32)
        channels = self.transformer.config.in_channels
        return initial_noise(batch_size, *grid, channels, generator=generator, device=device)

    def predict_velocity(self, latents, tau, text_features, layout, uncond_layout, guidance) -> torch.Tensor:
        """One guided velocity (B, N_img, C) float32; the unconditional pass is skipped when guidance is 1."""
        # One time for the whole batch, shape (1,): its embedding and modulations are then computed once and
        # broadcast, so an image comes out the same whether it is generated alone or in a batch (a (B,) row of
        # equal times goes through B-row matmuls whose rounding depends on B).
        timestep = torch.full((1,), tau, device=latents.device, dtype=torch.float32)
        # Each pass gets its model from `branch_pass`: in single-transformer mode both run `transformer`, each with its
        # own adapters (and the unconditional weight differences); cache hooks keep each branch's state apart.
        with self.branch_pass("conditional") as transformer:
            v_cond = self.branch_velocity(transformer, latents, timestep, text_features, layout, "cond")
        v_uncond = None
        if guidance != 1.0:
            with self.branch_pass("unconditional") as transformer:
                v_uncond = self.branch_velocity(transformer, latents, timestep, None, uncond_layout, "uncond")
        return guided_velocity(v_cond, v_uncond, guidance)

    def branch_velocity(self, transformer, latents, timestep, text_features, layout, branch="cond") -> torch.Tensor:
        """One transformer's velocity at the image tokens (B, N_img, C) float32, on the sequence `layout` packs; cache
        hooks keep the state of each `branch` ("cond" / "uncond") apart."""
        dtype = transformer.dtype
        with transformer.cache_context(branch):
            velocity = transformer(
                hidden_states=layout.pack(latents).to(dtype),
                timestep=timestep,
                encoder_hidden_states=None if text_features is None else text_features.to(dtype),
                position_ids=layout.position_ids,
                segment_ids=None,
                indicator=layout.indicator,
                attention_mask=layout.attention_mask,
                attention_kwargs=self.attention_kwargs,
                return_dict=False,
            )[0]
        return layout.unpack(velocity).float()

    def prepare_call(
        self,
        prompts,
        grid,
        height,
        width,
        generator,
        num_images_per_prompt,
        attention_kwargs,
        caption_check,
        prompt_upsampling=False,
        prompt_upsampling_kwargs=None,
    ) -> tuple[list[list[int]], list[str] | None]:
        """The end of step 1, after `check_inputs` and `check_denoise`: set the call's attention kwargs; with
        `prompt_upsampling` expand the ideas into captions (the one model work of the step); check the captions, the
        token counts and whether the attention backend can mask the conditional branch's padding (which needs the
        token counts). -> (token ids per prompt, expanded captions or None)."""
        self._attention_kwargs = attention_kwargs
        self._generator = generator  # seeds a stochastic scheduler's noise too
        self._interrupt = False
        captions = None
        if prompt_upsampling:
            prompts = captions = self.upsample_prompts(
                prompts, height, width, generator, num_images_per_prompt, prompt_upsampling_kwargs
            )
        check_prompts(prompts, mode=caption_check)
        token_ids = self.tokenize(prompts)
        text_lengths = [len(ids) for ids in token_ids]
        text_positions = padded_text_length(text_lengths, grid[0] * grid[1], self.transformer.context_parallel_size)
        if needs_attention_mask(text_lengths, text_positions):
            self.transformer.check_attention_mask_support()
        return token_ids, captions

    def encode_prompts(
        self, token_ids: list[list[int]], num_images_per_prompt: int, device: torch.device
    ) -> tuple[torch.Tensor, list[int]]:
        """Text features of every image (B, T_max, 13 * hidden) and their text lengths: each prompt encoded once,
        then repeated for its images."""
        text_features, text_lengths = self.encode_prompt(token_ids, device)
        text_features = text_features.repeat_interleave(num_images_per_prompt, dim=0)
        return text_features, [n for n in text_lengths for _ in range(num_images_per_prompt)]

    def prepare_layouts(self, text_lengths: list[int], grid, device) -> tuple[PackedLayout, PackedLayout]:
        """The sequence layouts of the call: `[text | image]` for the conditional branch, image only for the other
        (each padded to a length its transformer's context parallelism can split evenly)."""
        layout = pack_layout(text_lengths, *grid, multiple=self.transformer.context_parallel_size).to(device)
        uncond_multiple = self.unconditional_model.context_parallel_size if self.has_unconditional_branch else 1
        return layout, image_only_layout(len(text_lengths), *grid, multiple=uncond_multiple).to(device)

    def schedule(self, num_inference_steps: int, mu: float, std: float, height: int, width: int) -> list[float]:
        """The N + 1 model times of the call, rising from TAU_MIN (noise) to TAU_MAX; step k runs from taus[k] to
        taus[k + 1]."""
        return model_times(num_inference_steps, mu, std, height, width).tolist()

    def check_denoise(self, guidance: list[float], grid: tuple[int, int] | None = None) -> None:
        """Checks of the denoising loop made before any model work: a MagCache must count as many calls of its branch
        as the steps run (`guidance`, one per step); with the token grid, the attention backends must apply the
        segment mask where the unconditional branch's sequence holds padding."""
        unconditional_steps = sum(scale != 1.0 for scale in guidance)
        unconditional = self.unconditional_model
        check_cache_steps(
            ("transformer", self.transformer, len(guidance)),
            ("the unconditional pass's transformer", unconditional, unconditional_steps),
        )
        config = type(getattr(self.transformer, "_cache_config", None)).__name__
        if unconditional is self.transformer and config == "PyramidAttentionBroadcastConfig":
            raise ValueError(
                "Pyramid Attention Broadcast keeps one state per attention module, not per branch: in single-transformer "
                "mode it would reuse the conditional pass's attention in the unconditional one. Use another cache "
                "(FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig keep each branch apart), or "
                "`pipe.transformer.disable_cache()`."
            )
        if grid is not None and unconditional_steps and (grid[0] * grid[1]) % unconditional.context_parallel_size:
            unconditional.check_attention_mask_support()

    def denoise(
        self,
        latents: torch.Tensor,
        taus: list[float],
        guidance: list[float],
        text_features: torch.Tensor,
        layouts: tuple[PackedLayout, PackedLayout],
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
        step_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The sampling loop: step k moves `latents` from taus[k] to taus[k + 1] with guidance[k] (len(taus) =
        len(guidance) + 1). `step_hook(k, latents)` may change the latents after each step, before the user's
        callback (inpainting puts the kept tokens back there). The step itself is the scheduler's
        (`schedulers.scheduler_stepper`: the reference Euler step for the hub's scheduler)."""
        layout, uncond_layout = layouts
        self._num_timesteps = len(guidance)
        self.check_denoise(guidance)
        reset_caches(self.transformer, getattr(self, "unconditional_transformer", None))
        scheduler_step = scheduler_stepper(self.scheduler, taus, getattr(self, "_generator", None), latents.device)
        with self.progress_bar(total=len(guidance)) as progress_bar:
            for step, scale in enumerate(guidance):
                if self.interrupt:  # set by a callback: stop here and decode what there is
                    break
                self._guidance_scale = scale
                self._current_timestep = (1.0 - taus[step]) * DIFFUSERS_TIMESTEP_SCALE
                velocity = self.predict_velocity(latents, taus[step], text_features, layout, uncond_layout, scale)
                latents = scheduler_step(step, latents, velocity)
                if step_hook is not None:
                    latents = step_hook(step, latents)
                if callback_on_step_end is not None:
                    available = {"latents": latents}
                    tensors = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, step, taus[step], tensors)
                    latents = self.callback_outputs(callback_on_step_end, outputs, available).get("latents", latents)
                progress_bar.update()
        self._current_timestep = None
        return latents

    def decode_latents(self, latents: torch.Tensor, grid: tuple[int, int], output_type: str):
        """Token-layout latents on a (rows, columns) token grid -> images: denormalise (`latent_normalization`),
        unpatch, decode."""
        scale, shift, _ = latent_statistics(self.vae, self.config.latent_normalization)
        latents = unpatchify(latents * scale.to(latents.device) + shift.to(latents.device), *grid)
        decoded = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return self.image_processor.postprocess(decoded.float().clamp(-1, 1), output_type=output_type)

    def finish_call(self, images, captions: list[str] | None, return_dict: bool) -> Ideogram4PipelineOutput | tuple:
        """The end of every call, after decoding: offloaded components go back (`maybe_free_model_hooks`), and the
        images (with the expanded captions) are returned as an `Ideogram4PipelineOutput` or a tuple."""
        self.maybe_free_model_hooks()
        output = Ideogram4PipelineOutput(images=images, captions=captions)
        return output if return_dict else output.to_tuple()

    # ----------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        height: int = DEFAULT_IMAGE_SIDE,
        width: int = DEFAULT_IMAGE_SIDE,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_schedule: list[float] | None = None,
        mu: float | None = None,
        std: float | None = None,
        preset: str | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[["Ideogram4Pipeline", int, float, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        caption_check: str = "error",
        prompt_upsampling: bool = False,
        prompt_upsampling_kwargs: dict[str, Any] | None = None,
    ) -> Ideogram4PipelineOutput | tuple:
        r"""
        Generate images from structured JSON captions.

        Args:
            prompt (`str` or `list[str]`): Ideogram 4 JSON caption(s) (SPEC 7; build them with `Caption`).
            height, width (`int`, defaults to 1024): multiples of 16 in 256..2048.
            num_inference_steps (`int`, *optional*): defaults to the preset's (48 for quality_48).
            guidance_scale (`float`, *optional*): one guidance value for every step.
            guidance_schedule (`list[float]`, *optional*): one value per step, first step first.
            mu, std (`float`, *optional*): logit-normal schedule; default to the preset's. mu is shifted by
                0.5 * ln(H * W / 512^2).
            preset (`str`, *optional*): "quality_48" (default), "default_20", "turbo_12", or "distilled" (default
                when there is no unconditional transformer). Explicit arguments override the preset's values; with
                another step count the preset's rule gives the guidance (7.0, then 3.0 for its last steps).
            num_images_per_prompt (`int`, defaults to 1): images per caption.
            generator (`torch.Generator` or a list of them, *optional*): seeds the initial noise.
            latents (`torch.Tensor`, *optional*): initial noise (B, N_img, 128) in token layout.
            output_type (`str`, defaults to "pil"): "pil", "np", "pt", or "latent" (token-layout latents as the
                sampler leaves them).
            return_dict (`bool`, defaults to True): return an `Ideogram4PipelineOutput` rather than a tuple.
            attention_kwargs (`dict`, *optional*): `{"scale": s}` scales loaded LoRA adapters (in single-transformer
                mode, those of the conditional pass).
            callback_on_step_end (`Callable`, *optional*): called as `callback(pipe, step, tau, tensors)` after
                every step, `tau` being the model time that step started from; may return `{"latents": ...}` to
                replace them, and may set `pipe._interrupt = True` to stop early.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): tensors passed to the callback.
            caption_check (`str`, defaults to "error"): "error" raises `CaptionError` on an invalid caption,
                "warn" warns and goes on, "off" skips the check.
            prompt_upsampling (`bool`, defaults to False): treat every prompt as a plain-text idea and expand it into
                a caption first (`expand_prompt` with its defaults, for `height` x `width`; needs
                `prompt_enhancer_head`). The sampling is seeded by a copy of `generator` (per prompt, that of its
                first image), so the initial noise is the same as for the expanded captions passed directly. The
                captions are returned as `output.captions`.
            prompt_upsampling_kwargs (`dict`, *optional*): `temperature`, `max_new_tokens` and `limits` for the
                expansion, as in `expand_prompt`.
        """
        # 1. Check inputs, then captions and token counts: every error is raised before any model work; with
        # `prompt_upsampling`, every check that needs no caption is made before the ideas are expanded.
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        prompts, grid, guidance, mu, std = self.check_inputs(**arguments_for(self.check_inputs, locals()))
        self.check_denoise(guidance, grid)
        token_ids, captions = self.prepare_call(**arguments_for(self.prepare_call, locals()))
        device = self._execution_device

        # 2. Encode text once per prompt, then repeat for the images of each prompt.
        text_features, text_lengths = self.encode_prompts(token_ids, num_images_per_prompt, device)

        # 3. Latents and sequence layouts.
        latents = self.prepare_latents(len(text_lengths), grid, generator, latents, device)
        layouts = self.prepare_layouts(text_lengths, grid, device)

        # 4. Schedule.
        taus = self.schedule(len(guidance), mu, std, height, width)

        # 5. Denoising loop.
        latents = self.denoise(
            latents, taus, guidance, text_features, layouts, callback_on_step_end, callback_on_step_end_tensor_inputs
        )

        # 6. Decode.
        images = latents if output_type == "latent" else self.decode_latents(latents, grid, output_type)
        return self.finish_call(images, captions, return_dict)

    @property
    def guidance_scale(self) -> float | None:
        return getattr(self, "_guidance_scale", None)

    @property
    def num_timesteps(self) -> int:
        return getattr(self, "_num_timesteps", 0)

    @property
    def current_timestep(self) -> float | None:
        """The model time of the step running, in diffusers' units ((1 - tau) x 1000, 1000 = noise), None outside the
        loop: `PyramidAttentionBroadcastConfig(current_timestep_callback=lambda: pipe.current_timestep)`."""
        return getattr(self, "_current_timestep", None)

    @property
    def attention_kwargs(self) -> dict | None:
        return getattr(self, "_attention_kwargs", None)

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` in a callback to stop after the current step (diffusers' convention)."""
        return getattr(self, "_interrupt", False)
