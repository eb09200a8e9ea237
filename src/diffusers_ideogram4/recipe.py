"""What made an image, written into the image: its recipe, the model the recipe names, and the atomic PNG writer.

`ideogram4 generate` and `ideogram4 batch` store one JSON object in the PNG's `ideogram4-recipe` text chunk;
`ideogram4 reproduce image.png` rebuilds the model from it and runs the same call again:

    {"format": 1, "caption": "{...}", "seed": 7, "height": 1024, "width": 1024, "preset": "quality_48",
     "num_inference_steps": 48, "guidance_schedule": [7.0, ..., 3.0], "mu": 0.0, "std": 1.5,
     "model": {"id": "ideogram-ai/ideogram-4-fp8", "revision": "<commit>", "dtype": "bf16", "seed": null,
               "loras": [{"path": "style.safetensors", "scale": 0.8, "sha256": "..."}]},
     "made_with": {"diffusers_ideogram4": "0.1.0", "diffusers": "0.42.1", "transformers": "5.24.0",
                   "torch": "2.13.0", "device": "cuda"}}

Every key but `made_with` decides the pixels (`recipe_identity`); `made_with` says where they were made. The sampling
values are stored resolved (the preset's guidance schedule, mu and std written out), so a later change of a preset
does not change what a recipe means. The initial noise comes from a CPU `torch.Generator` seeded with `seed`, the same
numbers on every device.

An image made from a plain-text idea (a batch job's `idea`, `generate --idea`) also records how its caption was made:

    "expansion": {"idea": "a jazz poster", "head": {"id": "diffusers/qwen3-vl-8b-instruct-lm-head",
                  "revision": "<commit>"}, "instruction": 1, "temperature": 0.7,
                  "limits": {"description_chars": 400, ...}}

`caption` is then the expanded caption, so `reproduce` makes the image from it without the head; the prompt-enhancer
head makes captions, not pixels, and is therefore named here and not in `model`.
"""

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from .files import save_image


RECIPE_KEY = "ideogram4-recipe"
RECIPE_FORMAT = 1
TINY_RANDOM = "tiny-random"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# torch.Generator.manual_seed takes what fits a signed or an unsigned 64-bit integer.
SEED_RANGE = (-(2**63), 2**64 - 1)
DEFAULT_DTYPE = "bf16"
TINY_DTYPE = "fp32"  # the tiny random model is built in float32
RECIPE_KEYS = (
    "format",
    "caption",
    "seed",
    "height",
    "width",
    "preset",
    "num_inference_steps",
    "guidance_schedule",
    "mu",
    "std",
    "model",
    "made_with",
)
PROVENANCE_KEY = "made_with"
EXPANSION_KEY = "expansion"  # only in the recipes of images made from an idea
_COMMIT = re.compile(r"[0-9a-f]{40}")
# `.{final name}.{8 hex}.tmp` beside the final file: hidden, and never taken for an image.
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")
_HASH_CHUNK = 1 << 20


class RecipeError(ValueError):
    """An image without a readable recipe, or a recipe that cannot be run."""


# --------------------------------------------------------------------------------------------------------------------
# The model a recipe names


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file (absolute path) and its strength, with the file's SHA-256 so that a recipe names the exact
    weights."""

    path: str
    scale: float = 1.0
    sha256: str | None = None

    @classmethod
    def parse(cls, text: str, option: str = "--lora") -> "LoraSpec":
        """`PATH` or `PATH:SCALE` (the `--lora` option): the file must exist and be a `.safetensors` file."""
        path, scale = text, 1.0
        head, sep, tail = text.rpartition(":")
        if sep:
            try:
                path, scale = head, float(tail)
            except ValueError:
                path = text  # a colon that belongs to the path
        if not math.isfinite(scale):
            raise ValueError(f"{option} {text!r}: the scale {tail!r} is not a finite number; write PATH or PATH:0.8.")
        return cls.from_file(path, scale, option)

    @classmethod
    def from_file(cls, path: str, scale: float = 1.0, option: str = "--lora") -> "LoraSpec":
        if not os.path.isfile(path):
            raise ValueError(f"{option} {path!r}: no such file; give the path of a LoRA .safetensors file.")
        if not path.endswith(".safetensors"):
            raise ValueError(f"{option} {path!r}: LoRA weights are read from .safetensors files only.")
        return cls(os.path.abspath(path), float(scale), file_sha256(path))


@dataclass(frozen=True)
class HeadSpec:
    """The prompt-enhancer head (Qwen3-VL-8B-Instruct's LM head) that expands ideas into captions: a hub repo (at a
    commit), a local folder (absolute path), or "tiny-random" (the tiny random head, seeded like the tiny model)."""

    id: str
    revision: str | None = None

    @classmethod
    def from_option(cls, head: str, model: str, option: str = "--head") -> "HeadSpec":
        """`--head`, resolved: a folder's absolute path, or the hub repo's commit on its main branch."""
        if (head == TINY_RANDOM) != (model == TINY_RANDOM):
            if model == TINY_RANDOM:
                raise ValueError(
                    f"{option} {head!r} does nothing with --model {TINY_RANDOM} (it builds its own random head); "
                    "drop it."
                )
            raise ValueError(f"{option} {TINY_RANDOM} goes with --model {TINY_RANDOM} only; give the head's hub id.")
        if head == TINY_RANDOM:
            return cls(TINY_RANDOM)
        if os.path.isdir(head):
            return cls(os.path.abspath(head))
        return cls(head, resolve_revision(head, None, "config.json"))

    def load(self, torch_dtype):
        """The head, strictly loaded (a hub head at the recorded commit)."""
        from .prompt_expansion import Ideogram4PromptEnhancerHead

        location = {} if self.revision is None else {"revision": self.revision}
        return Ideogram4PromptEnhancerHead.from_pretrained(self.id, dtype=torch_dtype, **location)


@dataclass(frozen=True)
class ModelSpec:
    """Which weights make the images: a hub repo (at a commit), a local folder, or the tiny random model.

    Args:
        id: hub repo id, local folder (absolute path), or "tiny-random" (built offline from `seed`; the images are
            noise).
        revision: the hub commit the weights were read at (None for folders and the tiny model).
        dtype: "bf16", "fp16" or "fp32".
        seed: the weights' seed of the tiny random model (None otherwise).
        loras: LoRA files loaded into the pipeline, in order, with their scales.
        unconditional_lora: single-transformer mode: the LoRA that turns `transformer` into the unconditional branch
            (the pipeline is then loaded without its `unconditional_transformer`).
        head: the prompt-enhancer head to load for expanding ideas (None: no head). It makes captions, not pixels:
            `to_dict` (a recipe's `model`) leaves it out, and the recipes of images made from ideas name it in their
            `expansion`.
    """

    id: str
    revision: str | None = None
    dtype: str = DEFAULT_DTYPE
    seed: int | None = None
    loras: tuple[LoraSpec, ...] = field(default_factory=tuple)
    unconditional_lora: LoraSpec | None = None
    head: HeadSpec | None = None

    @classmethod
    def from_options(
        cls, model: str, revision=None, dtype=None, loras=(), tiny_seed: int = 0, unconditional_lora=None, head=None
    ) -> "ModelSpec":
        """The command-line options, resolved: the dtype's default, the hub revision's commit, the LoRA files read,
        the head (a hub id, a folder, or "tiny-random" with the tiny model) resolved like the model.

        Checks everything that needs no download first; resolving a hub revision reads (or downloads)
        `model_index.json` only (the head's `config.json`).
        """
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype!r}: use one of {sorted(DTYPES)}.")
        loras = tuple(lora if isinstance(lora, LoraSpec) else LoraSpec.parse(lora) for lora in loras)
        if isinstance(unconditional_lora, str):
            unconditional_lora = LoraSpec.parse(unconditional_lora, "--unconditional-lora")
        if isinstance(head, str):
            head = HeadSpec.from_option(head, model)
        extras = (loras, unconditional_lora, head)
        if model == TINY_RANDOM:
            if revision is not None:
                raise ValueError(f"--revision {revision!r}: the {TINY_RANDOM} model is built locally, not downloaded.")
            return cls(TINY_RANDOM, None, dtype or TINY_DTYPE, tiny_seed, *extras)
        if os.path.isdir(model):
            if revision is not None:
                raise ValueError(
                    f"--revision {revision!r}: {model!r} is a local folder; a revision applies to hub repos only."
                )
            return cls(os.path.abspath(model), None, dtype or DEFAULT_DTYPE, None, *extras)
        return cls(model, resolve_revision(model, revision), dtype or DEFAULT_DTYPE, None, *extras)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "revision": self.revision,
            "dtype": self.dtype,
            "seed": self.seed,
            "loras": [asdict(lora) for lora in self.loras],
            # Only when set, so that the recipes of two-transformer images stay what they were.
            **({"unconditional_lora": asdict(self.unconditional_lora)} if self.unconditional_lora else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        def lora(entry: dict) -> LoraSpec:
            return LoraSpec(entry["path"], float(entry["scale"]), entry.get("sha256"))

        loras = tuple(lora(entry) for entry in data["loras"])
        unconditional = data.get("unconditional_lora")
        return cls(
            data["id"],
            data.get("revision"),
            data["dtype"],
            data.get("seed"),
            loras,
            unconditional and lora(unconditional),
        )

    def load_tokenizer(self):
        """The tokenizer alone (no weights): enough to check captions against the token limit before loading."""
        if self.id == TINY_RANDOM:
            from .testing import tiny_tokenizer

            return tiny_tokenizer()
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.id, subfolder="tokenizer", revision=self.revision)

    def load_pipeline(self, device, offload: bool = False):
        """Build the pipeline, load the LoRAs at their scales, then place it on `device` (or model offload)."""
        import torch

        torch_dtype = getattr(torch, DTYPES[self.dtype])
        single = self.unconditional_lora is not None  # one resident transformer: never load the second one
        if self.id == TINY_RANDOM:
            from .testing import tiny_pipeline

            pipe = tiny_pipeline(seed=self.seed, unconditional=not single, prompt_enhancer_head=self.head is not None)
            if torch_dtype != torch.float32:
                pipe.to(dtype=torch_dtype)
        else:
            from .pipeline_ideogram4 import Ideogram4Pipeline

            location = {} if self.revision is None else {"revision": self.revision}
            skip = {"unconditional_transformer": None} if single else {}
            head = {} if self.head is None else {"prompt_enhancer_head": self.head.load(torch_dtype)}
            pipe = Ideogram4Pipeline.from_pretrained(self.id, dtype=torch_dtype, **location, **skip, **head)
        if single:
            pipe.load_unconditional_lora(self.unconditional_lora.path)
            if self.unconditional_lora.scale != 1.0:
                weight = [self.unconditional_lora.scale]
                pipe.set_adapters([pipe.unconditional_adapter], weight, branch="unconditional")
        names = [f"lora{index}" for index in range(len(self.loras))]
        for name, lora in zip(names, self.loras):
            pipe.load_lora_weights(lora.path, adapter_name=name)
        if names:
            pipe.set_adapters(names, adapter_weights=[lora.scale for lora in self.loras])
        # LoRAs before offload: on machines without an accelerator diffusers cannot re-apply the hooks afterwards.
        if offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        return pipe

    def check_loras_unchanged(self) -> None:
        """Every LoRA file is still there with the recorded SHA-256 (a recipe names exact weights)."""
        for lora in (*self.loras, *filter(None, [self.unconditional_lora])):
            if not os.path.isfile(lora.path):
                raise RecipeError(f"LoRA {lora.path!r} (sha256 {lora.sha256}) is not there; put the file back.")
            if lora.sha256 is not None and file_sha256(lora.path) != lora.sha256:
                raise RecipeError(
                    f"LoRA {lora.path!r} has changed: its sha256 is no longer {lora.sha256}. Restore that file."
                )


def resolve_revision(model: str, revision: str | None, filename: str = "model_index.json") -> str | None:
    """The commit of a hub repo at `revision` (default: the main branch), read from where huggingface_hub caches
    `filename` (`.../snapshots/<commit>/`); works offline from the cache. None when it cannot be told."""
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(model, filename, revision=revision))
    except OSError as error:  # not on the hub, or not cached while offline: one line, not a traceback
        reason = str(error).splitlines()[0]
        raise ValueError(
            f"{model!r}: cannot read its {filename} at revision {revision or 'main'} ({reason})"
        ) from None
    commit = path.parent.name
    if path.parent.parent.name == "snapshots" and _COMMIT.fullmatch(commit):
        return commit
    return revision


# --------------------------------------------------------------------------------------------------------------------
# Recipes


def made_with(device_type: str) -> dict:
    """Software versions and device kind (not the index: an image is the same on cuda:0 and cuda:3). On the CPU also
    torch's thread count, which changes how sums are split and so the last bits of the result."""
    import diffusers
    import torch
    import transformers

    from . import __version__

    found = {
        "diffusers_ideogram4": __version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": device_type,
    }
    if device_type == "cpu":
        found["cpu_threads"] = torch.get_num_threads()
    return found


def resolve_sampling(pipe, preset: str | None, num_inference_steps: int | None, guidance_scale: float | None) -> dict:
    """The preset name, step count, guidance schedule, mu and std that `pipe` runs for these options, written out
    (raises the pipeline's ValueError for options it refuses, e.g. guidance on a CFG-distilled checkpoint)."""
    from .sampler import DEFAULT_PRESET, DISTILLED_PRESET

    schedule, mu, std = pipe.resolve_sampling(preset, num_inference_steps, guidance_scale, None, None, None)
    if preset is None:
        preset = DEFAULT_PRESET if pipe.has_unconditional_branch else DISTILLED_PRESET
    return {
        "preset": preset,
        "num_inference_steps": len(schedule),
        "guidance_schedule": [float(g) for g in schedule],
        "mu": float(mu),
        "std": float(std),
    }


def build_recipe(
    caption: str | None,
    seed: int,
    height: int,
    width: int,
    sampling: dict,
    model: ModelSpec,
    device_type: str,
    expansion: dict | None = None,
) -> dict:
    """A recipe from a caption, a seed, a size, `resolve_sampling`'s values and the model; for an image made from an
    idea also `expansion_record`'s block (the caption is then filled in once the idea is expanded)."""
    return {
        "format": RECIPE_FORMAT,
        "caption": caption,
        "seed": seed,
        "height": height,
        "width": width,
        **sampling,
        "model": model.to_dict(),
        **({} if expansion is None else {EXPANSION_KEY: expansion}),
        PROVENANCE_KEY: made_with(device_type),
    }


def expansion_record(idea: str, head: HeadSpec, temperature: float, limits=None) -> dict:
    """What decides the caption expanded from `idea` besides the seed and the size: the head, the instruction's
    version, the temperature and the caption limits (written out, like the sampling values). `max_new_tokens` is
    not among them: it can only refuse a caption, never change one."""
    from .captions.grammar import CaptionLimits
    from .prompt_expansion import INSTRUCTION_VERSION

    return {
        "idea": idea,
        "head": asdict(head),
        "instruction": INSTRUCTION_VERSION,
        "temperature": float(temperature),
        "limits": asdict(limits or CaptionLimits()),
    }


def recipe_text(recipe: dict) -> str:
    return json.dumps(recipe, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def recipe_identity(recipe: dict) -> dict:
    """What decides the pixels: the recipe without `made_with`, as it reads back from JSON."""
    return json.loads(recipe_text({key: value for key, value in recipe.items() if key != PROVENANCE_KEY}))


def recipe_differences(found: dict, wanted: dict) -> list[str]:
    """Top-level keys whose values differ between two recipes (`made_with` ignored)."""
    found, wanted = recipe_identity(found), recipe_identity(wanted)
    return sorted(key for key in found.keys() | wanted.keys() if found.get(key) != wanted.get(key))


def pipeline_arguments(recipe: dict) -> dict:
    """The pipeline call's keyword arguments shared by every image of the recipe's size and schedule."""
    return {key: recipe[key] for key in ("height", "width", "num_inference_steps", "guidance_schedule", "mu", "std")}


def seeded_generator(seed: int):
    """The initial noise's generator: on the CPU, so that a seed gives the same noise on every device."""
    import torch

    return torch.Generator(device="cpu").manual_seed(seed)


def run_recipes(pipe, recipes: list[dict]) -> list:
    """The images of `recipes` of one size and schedule, in one pipeline call, each seeded by its own generator. The
    caption check is off: a recipe's caption was checked before (or made by the caption grammar, or is what made
    the image it was read from)."""
    return pipe(
        [recipe["caption"] for recipe in recipes],
        generator=[seeded_generator(recipe["seed"]) for recipe in recipes],
        caption_check="off",
        **pipeline_arguments(recipes[0]),
    ).images


def expand_idea(pipe, idea: str, seed: int, height: int, width: int, expansion: dict) -> str:
    """The caption of an idea's image: `expand_prompt` (with `expansion`, its options) seeded by a generator of its
    own in the state the image's noise generator starts from, as `pipe(idea, prompt_upsampling=True)` seeds it, so
    that the image equals the one made from the caption with the same seed."""
    return pipe.expand_prompt(idea, height=height, width=width, generator=seeded_generator(seed), **expansion)


def reproduce_image(recipe: dict, device, offload: bool = False):
    """Rebuild the recipe's model (LoRA files checked against their SHA-256) and run its call again.

    Returns (the image, the recipe with this machine's `made_with`).
    """
    model = ModelSpec.from_dict(recipe["model"])
    model.check_loras_unchanged()
    pipe = model.load_pipeline(device, offload)
    return run_recipes(pipe, [recipe])[0], {**recipe, PROVENANCE_KEY: made_with(pipe._execution_device.type)}


def check_recipe(recipe, source: str) -> dict:
    """A recipe that `reproduce` can run, or a RecipeError naming what is missing or wrong."""
    if not isinstance(recipe, dict):
        raise RecipeError(f"{source}: the recipe is not a JSON object.")
    if recipe.get("format") != RECIPE_FORMAT:
        raise RecipeError(
            f"{source}: recipe format {recipe.get('format')!r} is not {RECIPE_FORMAT}, the one this version reads."
        )
    missing = [key for key in RECIPE_KEYS if key not in recipe]
    model_keys = ("id", "revision", "dtype", "seed", "loras")
    model = recipe.get("model")
    if isinstance(model, dict):
        missing += [f"model.{key}" for key in model_keys if key not in model]
    elif "model" not in missing:
        missing.append("model (an object)")
    if missing:
        raise RecipeError(f"{source}: the recipe lacks {', '.join(missing)}.")
    return recipe


# --------------------------------------------------------------------------------------------------------------------
# Writing and reading images


def write_png(image: Image.Image, path: str | os.PathLike, recipe: dict) -> None:
    """Write `image` with its recipe, complete or not at all (`files.save_image`: a hidden temporary file in the same
    folder, fsync, one rename). A run killed at any moment leaves at most a `.NAME.XXXXXXXX.tmp` file behind."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt(RECIPE_KEY, recipe_text(recipe), zip=True)
    save_image(image, os.fspath(path), pnginfo=info)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files a killed `write_png` left in `folder`; returns their names."""
    removed = sorted(name for name in os.listdir(folder) if _TEMPORARY.match(name))
    for name in removed:
        os.remove(os.path.join(folder, name))
    return removed


def read_recipe(path: str | os.PathLike) -> dict:
    """The recipe of an image written by `write_png`, after checking the whole file (every chunk's checksum)."""
    try:
        with Image.open(path) as image:
            text = image.info.get(RECIPE_KEY)  # written before the pixels: no decoding needed
            image.verify()
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such file.") from None
    except (OSError, SyntaxError, EOFError, ValueError) as error:
        raise RecipeError(f"{path}: not a complete, readable PNG ({type(error).__name__}: {error}).") from None
    if text is None:
        raise RecipeError(
            f"{path}: the image has no `{RECIPE_KEY}` text chunk; only images written by `ideogram4 generate` or "
            "`ideogram4 batch` carry their recipe."
        )
    try:
        recipe = json.loads(str(text))
    except ValueError as error:
        raise RecipeError(f"{path}: the `{RECIPE_KEY}` chunk is not valid JSON ({error}).") from None
    return check_recipe(recipe, str(path))
