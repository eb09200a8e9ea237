"""`Ideogram4Pipeline`: structured caption in, image out, faithful to the reference sampler (SPEC 3-5)."""

import json
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
from diffusers.utils import BaseOutput
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from huggingface_hub import create_repo
from transformers import PreTrainedModel, PreTrainedTokenizerBase  # noqa: F401  (likewise)

from .captions import CAPTION_CHECK_MODES, check_prompts
from .constants import DEFAULT_IMAGE_SIDE, MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, PATCH_SIZE, PIXELS_PER_TOKEN
from .loading import require_cuda_for_bitsandbytes, resolve_dtype, uses_bitsandbytes
from .lora import Ideogram4LoraLoaderMixin
from .prompt_expansion import Ideogram4PromptEnhancerHead, Ideogram4PromptExpansionMixin, check_head_fits
from .sampler import (
    DEFAULT_PRESET,
    DISTILLED_PRESET,
    PRESETS,
    euler_step,
    finite_float,
    guided_velocity,
    image_grid,
    image_only_layout,
    initial_noise,
    model_times,
    pack_layout,
    unpatchify,
)
from .text_encoder import Ideogram4TextEncoder, check_token_counts, pad_token_ids, tokenize_prompt
from .transformer_ideogram4 import Ideogram4Transformer2DModel
from .vae import StrictAutoencoderKLFlux2  # noqa: F401  (the loader `extract_init_dict` points the VAE entry at)


OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# What diffusers' `save_pretrained(push_to_hub=True)` takes for the upload.
_PUSH_KWARGS = ("repo_id", "token", "private", "commit_message", "create_pr")
# diffusers >= 0.42 names the loading dtype `dtype` and deprecates `torch_dtype`; older versions know only the latter.
DIFFUSERS_TAKES_DTYPE = hasattr(diffusers.utils, "_resolve_dtype")

# model_index.json entries. Components are saved under the class names the hub repos use, so each component folder
# stays loadable by diffusers' and transformers' own classes; on load these entries are pointed at this package's.
OFFICIAL_ENTRIES = {
    "Ideogram4Transformer2DModel": ["diffusers", "Ideogram4Transformer2DModel"],
    "Ideogram4TextEncoder": ["transformers", "Qwen3VLModel"],
    "Ideogram4PromptEnhancerHead": ["diffusers", "Ideogram4PromptEnhancerHead"],
}
# diffusers' loader resolves the remapped entries in this module, which therefore imports the base classes above.
COMPONENT_LIBRARY = __name__
# Saved beside model_index.json so that `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` builds
# this package's pipeline rather than diffusers' built-in one of the same name.
PIPELINE_SHIM_NAME = "ideogram4_plugin_pipeline"
PIPELINE_SHIM_SOURCE = (
    '"""Loads diffusers-ideogram4\'s pipeline (pip install diffusers-ideogram4)."""\n\n'
    "from diffusers_ideogram4 import Ideogram4Pipeline  # noqa: F401\n"
)


@dataclass
class Ideogram4PipelineOutput(BaseOutput):
    """images: a list of PIL images, a (B, H, W, 3) numpy array, a (B, 3, H, W) tensor, or (B, N_img, 128) latents.
    captions: with `prompt_upsampling=True`, the captions the ideas were expanded into (one per prompt), else None."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    captions: list[str] | None = None


def _our_entry(name: str, entry):
    """Point a hub model_index.json entry at this package's class, or return it unchanged."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
        return entry
    if name in ("transformer", "unconditional_transformer") and entry[1] == "Ideogram4Transformer2DModel":
        return (COMPONENT_LIBRARY, "Ideogram4Transformer2DModel")
    if name == "text_encoder" and str(entry[1]).startswith(("Qwen3VL", "Ideogram4TextEncoder")):
        return (COMPONENT_LIBRARY, "Ideogram4TextEncoder")
    if name == "vae" and entry[1] == "AutoencoderKLFlux2":
        return (COMPONENT_LIBRARY, "StrictAutoencoderKLFlux2")
    if name == "prompt_enhancer_head" and entry[1] == "Ideogram4PromptEnhancerHead":
        return (COMPONENT_LIBRARY, "Ideogram4PromptEnhancerHead")
    return entry


def check_image_size(height, width) -> None:
    """Both sides a multiple of 16 in 256..2048 (SPEC 6), or a ValueError that suggests the nearest valid sizes."""
    for name, side in (("height", height), ("width", width)):
        if isinstance(side, bool) or not isinstance(side, int):
            raise ValueError(f"`{name}` must be an int number of pixels, got {side!r}.")
        if side % PIXELS_PER_TOKEN or not MIN_IMAGE_SIDE <= side <= MAX_IMAGE_SIDE:
            below = side // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN
            nearby = {min(max(v, MIN_IMAGE_SIDE), MAX_IMAGE_SIDE) for v in (below, below + PIXELS_PER_TOKEN)}
            raise ValueError(
                f"`{name}={side}` is not supported: Ideogram 4 needs a multiple of {PIXELS_PER_TOKEN} between "
                f"{MIN_IMAGE_SIDE} and {MAX_IMAGE_SIDE} pixels per side. Try "
                + " or ".join(f"`{name}={v}`" for v in sorted(nearby))
                + "."
            )


def check_components_fit(vae, text_encoder, transformer, unconditional_transformer) -> None:
    """Components from different models (a 4 B text encoder, another VAE) fail at the first step, after the text
    encoder ran; refuse them when the pipeline is built, naming the sizes. Absent components are not checked."""
    problems = []
    if text_encoder is not None and transformer is not None:
        features, expected = text_encoder.feature_dim, transformer.config.llm_features_dim
        if features != expected:
            hidden = text_encoder.config.text_config.hidden_size
            problems.append(
                f"`text_encoder` gives {features} features per token (13 taps x hidden {hidden}), `transformer` "
                f"expects llm_features_dim={expected}"
            )
    if vae is not None and transformer is not None:
        channels = vae.config.latent_channels * PATCH_SIZE * PATCH_SIZE
        if channels != transformer.config.in_channels:
            problems.append(
                f"`vae` has {vae.config.latent_channels} latent channels ({channels} per 2x2 token), `transformer` "
                f"expects in_channels={transformer.config.in_channels}"
            )
    if unconditional_transformer is not None and transformer is not None:
        if unconditional_transformer.config.in_channels != transformer.config.in_channels:
            problems.append(
                f"`unconditional_transformer` has in_channels={unconditional_transformer.config.in_channels}, "
                f"`transformer` {transformer.config.in_channels}"
            )
    if problems:
        raise ValueError(
            "The pipeline's components do not belong to one Ideogram 4 model: " + "; ".join(problems) + ". Load "
            "every component from the same repo (or pass matching ones)."
        )


def _require_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def _quantizes_transformers_with_bitsandbytes(config) -> bool:
    """Whether a `PipelineQuantizationConfig` asks for bitsandbytes on either transformer."""
    if config is None:
        return False
    branches = ("transformer", "unconditional_transformer")
    mapping = getattr(config, "quant_mapping", None)
    if mapping:
        return any(uses_bitsandbytes(mapping.get(name)) for name in branches)
    targets = getattr(config, "components_to_quantize", None)
    targets = [targets] if isinstance(targets, str) else targets
    return uses_bitsandbytes(getattr(config, "quant_backend", None)) and (
        targets is None or any(name in targets for name in branches)
    )


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


class Ideogram4Pipeline(DiffusionPipeline, Ideogram4LoraLoaderMixin, Ideogram4PromptExpansionMixin):
    r"""
    Text-to-image with Ideogram 4: a structured JSON caption in, an image out.

    Args:
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): kept for the hub layout; the sampler computes its own times.
        vae ([`AutoencoderKLFlux2`]): the FLUX.2 VAE; only its decoder and latent statistics (`bn`) are used.
        text_encoder ([`Ideogram4TextEncoder`]): Qwen3-VL's language model, tapped at 13 layers.
        tokenizer ([`PreTrainedTokenizerBase`]): Qwen tokenizer with its chat template.
        transformer ([`Ideogram4Transformer2DModel`]): the conditional branch.
        unconditional_transformer ([`Ideogram4Transformer2DModel`], *optional*): the unconditional branch; leave it
            out for CFG-distilled checkpoints, which then run one branch with guidance 1.0.
        prompt_enhancer_head ([`Ideogram4PromptEnhancerHead`], *optional*): Qwen3-VL-8B-Instruct's LM head; with it
            the text encoder expands plain-text ideas into captions (`expand_prompt`, `prompt_upsampling=True`).
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
    ) -> None:
        super().__init__()
        self.register_modules(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            unconditional_transformer=unconditional_transformer,
            prompt_enhancer_head=prompt_enhancer_head,
        )
        check_components_fit(vae, text_encoder, transformer, unconditional_transformer)
        check_head_fits(text_encoder, prompt_enhancer_head)
        self.image_processor = VaeImageProcessor(vae_scale_factor=PIXELS_PER_TOKEN)

    # ----------------------------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader, building this package's classes from a hub-layout folder or repo id.

        Takes `dtype` or its older name `torch_dtype` with every supported diffusers version. A
        `quantization_config` that puts the transformers in bitsandbytes (nf4) on a machine without CUDA is refused
        before anything is read (transformers' bitsandbytes runs the text encoder on CPU, so that one is allowed).
        """
        dtype = resolve_dtype(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None))
        if dtype is not None:
            kwargs["dtype" if DIFFUSERS_TAKES_DTYPE else "torch_dtype"] = dtype
        if _quantizes_transformers_with_bitsandbytes(kwargs.get("quantization_config")):
            require_cuda_for_bitsandbytes("`quantization_config`")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """diffusers' model offload, where a component going to the accelerator sends every other one back: one
        component on the accelerator at a time, both transformers included (they alternate at every step)."""
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        hooks = [hook for hook in self._all_hooks if isinstance(hook, UserCpuOffloadHook)]
        for hook in hooks:
            hook.hook.prev_module_hook = _ReleaseOthers([other for other in hooks if other is not hook])

    @classmethod
    def load_config(cls, *args, **kwargs):
        """Read model_index.json as the pipeline class of this package, whatever `_class_name` it names."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(config, dict) and "_class_name" in config:
            config["_class_name"] = cls.__name__
        return loaded

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """Point the hub entries (`diffusers.Ideogram4Transformer2DModel`, `transformers.Qwen3VLModel`) at ours."""
        config_dict = {name: _our_entry(name, entry) for name, entry in config_dict.items()}
        return super().extract_init_dict(config_dict, **kwargs)

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """Save in the hub layout (official class names in model_index.json) plus a one-line loader shim.

        With `push_to_hub=True` (and `repo_id`, `token`, `private`, `commit_message`, `create_pr` as in diffusers),
        the folder is uploaded once it is complete, shim and rewritten index included.
        """
        hub = {name: kwargs.pop(name) for name in _PUSH_KWARGS if name in kwargs}
        super().save_pretrained(save_directory, *args, **kwargs)
        self._write_hub_index(save_directory)
        if push_to_hub:
            self._push_folder(save_directory, **hub)

    def _push_folder(
        self, save_directory, repo_id=None, token=None, private=None, commit_message=None, create_pr=False
    ) -> None:
        """diffusers' push: create the repo, add a pipeline model card, upload the folder."""
        repo_id = create_repo(
            repo_id or os.path.basename(os.path.normpath(save_directory)), exist_ok=True, private=private, token=token
        ).repo_id
        card = populate_model_card(load_or_create_model_card(repo_id, token=token, is_pipeline=True))
        card.save(os.path.join(save_directory, "README.md"))
        self._upload_folder(save_directory, repo_id, token=token, commit_message=commit_message, create_pr=create_pr)

    def _write_hub_index(self, save_directory) -> None:
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
        for name, entry in index.items():
            if isinstance(entry, list) and len(entry) == 2 and entry[1] in OFFICIAL_ENTRIES:
                index[name] = OFFICIAL_ENTRIES[entry[1]]
        index["_class_name"] = [PIPELINE_SHIM_NAME, type(self).__name__]
        with open(index_path, "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2, sort_keys=True)
            handle.write("\n")
        with open(os.path.join(save_directory, f"{PIPELINE_SHIM_NAME}.py"), "w", encoding="utf-8") as handle:
            handle.write(PIPELINE_SHIM_SOURCE)

    # ----------------------------------------------------------------------------------------------------------------
    # Steps of __call__, each callable on its own

    @property
    def has_unconditional_branch(self) -> bool:
        return getattr(self, "unconditional_transformer", None) is not None

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
        if num_inference_steps is None:
            num_inference_steps = (
                len(guidance_schedule) if guidance_schedule is not None else settings.num_inference_steps
            )
        _require_positive_int("num_inference_steps", num_inference_steps)
        if guidance_schedule is not None:
            if isinstance(guidance_schedule, (str, bytes)) or not hasattr(guidance_schedule, "__len__"):
                raise ValueError(
                    f"`guidance_schedule` must be a list of numbers, one per step, got {guidance_schedule!r}."
                )
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
                f"`preset={DISTILLED_PRESET!r}`, or load an `unconditional_transformer`."
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
        num_images_per_prompt,
        latents,
        output_type,
        caption_check,
        callback_on_step_end_tensor_inputs,
        generator=None,
        callback_on_step_end=None,
    ) -> list[str]:
        """Validate every argument before any model work; return the prompts as a list."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(
                f"`prompt` must be a caption string or a non-empty list of them, got {type(prompt).__name__}: "
                f"{str(prompt)[:80]!r}. Serialize dict captions with `diffusers_ideogram4.Caption` or `json.dumps`."
            )
        check_image_size(height, width)
        _require_positive_int("num_images_per_prompt", num_images_per_prompt)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type={output_type!r}` is not supported; use one of {list(OUTPUT_TYPES)}.")
        if caption_check not in CAPTION_CHECK_MODES:
            raise ValueError(
                f"`caption_check={caption_check!r}` is not supported; use one of {list(CAPTION_CHECK_MODES)}."
            )
        if latents is not None:
            grid_h, grid_w = image_grid(height, width)
            expected = (len(prompts) * num_images_per_prompt, grid_h * grid_w, self.transformer.config.in_channels)
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(
                    f"`latents` has shape {got}, expected {expected}: (prompts x num_images_per_prompt, "
                    f"(height/16) x (width/16) image tokens, {expected[2]} channels) in token layout."
                )
        batch_size = len(prompts) * num_images_per_prompt
        if latents is not None and generator is not None:
            raise ValueError(
                "`generator` and `latents` were both given; the generator only draws the initial noise, which "
                "`latents` replaces. Pass one of them."
            )
        generators = generator if isinstance(generator, list) else [generator]
        if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
            raise ValueError(
                f"`generator` must be a torch.Generator or a list of them, got {generator!r}; e.g. "
                "`generator=torch.Generator().manual_seed(0)`."
            )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators, but {len(prompts)} prompt(s) x "
                f"`num_images_per_prompt={num_images_per_prompt}` make {batch_size} images; give one per image "
                "or a single generator."
            )
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(
                f"`callback_on_step_end` must be callable as `callback(pipe, step, tau, tensors)`, got "
                f"{callback_on_step_end!r}."
            )
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
        return prompts

    def check_captions(self, prompts: list[str], caption_check: str) -> None:
        """Structured-caption check of every prompt (SPEC 7): raise, warn or skip."""
        check_prompts(prompts, mode=caption_check)

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

    def prepare_latents(self, batch_size, height, width, generator, latents, device) -> torch.Tensor:
        if latents is not None:
            return latents.to(device=device, dtype=torch.float32)
        return initial_noise(batch_size, height, width, generator=generator, device=device)

    def predict_velocity(self, latents, tau, text_features, layout, uncond_layout, guidance) -> torch.Tensor:
        """One guided velocity (B, N_img, 128) float32; the unconditional pass is skipped when guidance is 1."""
        num_text = text_features.shape[1]
        transformer = self.transformer
        dtype = transformer.dtype
        timestep = torch.full((latents.shape[0],), tau, device=latents.device, dtype=torch.float32)
        packed = torch.cat((latents.new_zeros(latents.shape[0], num_text, latents.shape[2]), latents), dim=1)
        v_cond = transformer(
            hidden_states=packed.to(dtype),
            timestep=timestep,
            encoder_hidden_states=text_features.to(dtype),
            position_ids=layout.position_ids,
            segment_ids=layout.segment_ids,
            indicator=layout.indicator,
            attention_kwargs=self.attention_kwargs,
            return_dict=False,
        )[0][:, num_text:].float()
        v_uncond = None
        if guidance != 1.0:
            v_uncond = self.unconditional_transformer(
                hidden_states=latents.to(self.unconditional_transformer.dtype),
                timestep=timestep,
                encoder_hidden_states=None,
                position_ids=uncond_layout.position_ids,
                segment_ids=None,
                indicator=uncond_layout.indicator,
                attention_kwargs=self.attention_kwargs,
                return_dict=False,
            )[0].float()
        return guided_velocity(v_cond, v_uncond, guidance)

    def decode_latents(self, latents: torch.Tensor, height: int, width: int, output_type: str):
        """Token-layout latents -> images: denormalise with the VAE's latent statistics, unpatch, decode."""
        bn = self.vae.bn
        std = torch.sqrt(bn.running_var + bn.eps).to(latents.device, torch.float32)
        mean = bn.running_mean.to(latents.device, torch.float32)
        latents = unpatchify(latents * std + mean, height, width)
        decoded = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return self.image_processor.postprocess(decoded.float().clamp(-1, 1), output_type=output_type)

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
            attention_kwargs (`dict`, *optional*): `{"scale": s}` scales loaded LoRA adapters.
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
        # 1. Check inputs, captions and token counts: every error is raised before any model work.
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        prompts = self.check_inputs(
            prompt,
            height,
            width,
            num_images_per_prompt,
            latents,
            output_type,
            caption_check,
            callback_on_step_end_tensor_inputs,
            generator,
            callback_on_step_end,
        )
        guidance, mu, std = self.resolve_sampling(
            preset, num_inference_steps, guidance_scale, guidance_schedule, mu, std
        )
        if prompt_upsampling_kwargs is not None and not prompt_upsampling:
            raise ValueError("`prompt_upsampling_kwargs` was given without `prompt_upsampling=True`; pass both.")
        captions = None
        if prompt_upsampling:  # ideas -> captions: the one model work before the caption check
            prompts = captions = self.upsample_prompts(
                prompts, height, width, generator, num_images_per_prompt, prompt_upsampling_kwargs
            )
        self.check_captions(prompts, caption_check)
        token_ids = self.tokenize(prompts)
        # Validates attention_kwargs before any model work.
        Ideogram4Transformer2DModel.scale_from_attention_kwargs(attention_kwargs)
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        device = self._execution_device

        # 2. Encode text once per prompt, then repeat for the images of each prompt.
        text_features, text_lengths = self.encode_prompt(token_ids, device)
        text_features = text_features.repeat_interleave(num_images_per_prompt, dim=0)
        text_lengths = [n for n in text_lengths for _ in range(num_images_per_prompt)]
        batch_size = len(text_lengths)

        # 3. Latents and sequence layouts.
        latents = self.prepare_latents(batch_size, height, width, generator, latents, device)
        grid_h, grid_w = image_grid(height, width)
        layout = pack_layout(text_lengths, grid_h, grid_w).to(device)
        uncond_layout = image_only_layout(batch_size, grid_h, grid_w).to(device)

        # 4. Schedule.
        taus = model_times(len(guidance), mu, std, height, width).tolist()
        self._num_timesteps = len(guidance)

        # 5. Denoising loop.
        with self.progress_bar(total=len(guidance)) as progress_bar:
            for step, scale in enumerate(guidance):
                if self.interrupt:  # set by a callback: stop here and decode what there is
                    break
                self._guidance_scale = scale
                velocity = self.predict_velocity(latents, taus[step], text_features, layout, uncond_layout, scale)
                latents = euler_step(latents, velocity, taus[step], taus[step + 1])
                if callback_on_step_end is not None:
                    available = {"latents": latents}
                    tensors = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, step, taus[step], tensors) or {}
                    latents = outputs.pop("latents", latents)
                progress_bar.update()

        # 6. Decode.
        images = latents if output_type == "latent" else self.decode_latents(latents, height, width, output_type)
        self.maybe_free_model_hooks()
        output = Ideogram4PipelineOutput(images=images, captions=captions)
        return output if return_dict else output.to_tuple()

    @property
    def guidance_scale(self) -> float | None:
        return getattr(self, "_guidance_scale", None)

    @property
    def num_timesteps(self) -> int:
        return getattr(self, "_num_timesteps", 0)

    @property
    def attention_kwargs(self) -> dict | None:
        return getattr(self, "_attention_kwargs", None)

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` in a callback to stop after the current step (diffusers' convention)."""
        return getattr(self, "_interrupt", False)
