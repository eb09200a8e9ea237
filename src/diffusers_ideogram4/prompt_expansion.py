"""Prompt expansion: a plain-text idea in, a valid structured caption out, decoded locally by the text encoder.

The text encoder is Qwen3-VL-8B-Instruct's language model without its LM head. `Ideogram4PromptEnhancerHead` is
that head, an optional pipeline component; with it, the pipeline's own `text_encoder` (shared by reference, never
copied) becomes a causal language model that `transformers`' `generate` runs with a KV cache. Every token is
constrained by the caption grammar (`captions.grammar`, llguidance), so what comes out is a caption that passes
`check_caption`, in the canonical minified form, or an error that says why there is none.
"""

import copy
import json
import math
from pathlib import Path
from string import Template

import torch
from accelerate.hooks import CpuOffload
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import GenerationConfig, GenerationMixin, LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLPreTrainedModel

from .captions import CaptionError, check_caption, to_json
from .captions.grammar import CaptionGrammar, CaptionLimits
from .constants import DEFAULT_IMAGE_SIDE, MAX_TEXT_TOKENS
from .loading import load_pretrained
from .text_encoder import tokenize_prompt
from .validation import check_generator_type, check_image_size, require_positive_int, string_list


# Where the head is published (config `hidden_size` 4096, `vocab_size` 151936, one weight `lm_head.weight`).
HEAD_REPO = "diffusers/qwen3-vl-8b-instruct-lm-head"
# The instruction (system prompt) given to the model; a new wording gets a new version and file.
INSTRUCTION_VERSION = 1
INSTRUCTION_PATH = Path(__file__).with_name("captions") / f"expansion_instruction_v{INSTRUCTION_VERSION}.txt"
DEFAULT_TEMPERATURE = 0.7
# What `__call__(prompt_upsampling=True, prompt_upsampling_kwargs=...)` passes on to the expansion.
EXPANSION_OPTIONS = ("temperature", "max_new_tokens", "limits")


# --------------------------------------------------------------------------------------------------------------------
# The head


class Ideogram4PromptEnhancerHead(ModelMixin, ConfigMixin):
    """The LM head of Qwen3-VL-8B-Instruct, which the text encoder checkpoint lacks: `lm_head.weight`
    [vocab_size, hidden_size], no bias. Loads strictly from a folder or hub repo in diffusers' model format
    (`config.json` + `diffusion_pytorch_model.safetensors`), e.g. `diffusers/qwen3-vl-8b-instruct-lm-head`.

    Args:
        hidden_size: width of the language model's hidden states (4096 for Qwen3-VL-8B).
        vocab_size: rows of the logits, the language model's vocabulary (151936).
    """

    @register_to_config
    def __init__(self, hidden_size: int = 4096, vocab_size: int = 151936) -> None:
        super().__init__()
        require_positive_int("hidden_size", hidden_size)
        require_positive_int("vocab_size", vocab_size)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states (B, T, hidden_size), after the language model's final norm -> logits (B, T, vocab_size)."""
        return self.lm_head(hidden_states)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader (`dtype` or `torch_dtype`) under the package's one loading rule
        (`diffusers_ideogram4.loading`): a missing, unexpected or mis-shaped key is refused by name."""
        return load_pretrained(
            pretrained_model_name_or_path,
            build_model=lambda folder: cls.from_config(cls.load_config(folder)),
            host_from_pretrained=super().from_pretrained,
            hint=f"Expected one tensor `lm_head.weight` [vocab_size, hidden_size], as in `{HEAD_REPO}`.",
            **kwargs,
        )


def check_head_fits(text_encoder, prompt_enhancer_head) -> None:
    """The head must take the text encoder's hidden states and cover its vocabulary; refuse a mismatch by its sizes."""
    if text_encoder is None or prompt_enhancer_head is None:
        return
    text_config = text_encoder.config.text_config
    head_config = prompt_enhancer_head.config
    if (head_config.hidden_size, head_config.vocab_size) != (text_config.hidden_size, text_config.vocab_size):
        raise ValueError(
            f"`prompt_enhancer_head` (hidden_size={head_config.hidden_size}, vocab_size={head_config.vocab_size}) "
            f"does not fit `text_encoder` (hidden_size={text_config.hidden_size}, vocab_size="
            f"{text_config.vocab_size}). Load the head of the same language model (`{HEAD_REPO}` for Ideogram 4)."
        )


# --------------------------------------------------------------------------------------------------------------------
# The instruction


def _aspect(height: int, width: int) -> str:
    divisor = math.gcd(height, width)
    shape = "square" if height == width else "landscape" if width > height else "portrait"
    return f"{shape}, {width // divisor}:{height // divisor} (width:height)"


def instruction(height: int, width: int, limits: CaptionLimits | None = None) -> str:
    """The system prompt for an image of `width` x `height` pixels (versioned package data)."""
    limits = limits or CaptionLimits()
    text = INSTRUCTION_PATH.read_text(encoding="utf-8")
    return Template(text).substitute(
        width=width, height=height, aspect=_aspect(height, width), max_elements=limits.max_elements
    )


def expansion_messages(idea: str, height: int, width: int, limits: CaptionLimits | None = None) -> list[dict]:
    """The chat the model completes: the instruction as the system turn, the idea verbatim as the user turn."""
    return [{"role": "system", "content": instruction(height, width, limits)}, {"role": "user", "content": idea}]


# --------------------------------------------------------------------------------------------------------------------
# Decoding


class CaptionDecoder(Qwen3VLPreTrainedModel, GenerationMixin):
    """The text encoder's language model and the head's Linear, as a causal LM that `generate` can run.

    Both are held by reference: no weight is copied or initialised (no `post_init`), and the pipeline's components
    are neither registered here nor moved. Qwen3-VL's base class declares the attention backends the body supports. `forward` runs the language model's own forward (embeddings, decoder layers with the KV cache, its final
    norm), then the head on the last position.
    """

    config_class = Qwen3VLTextConfig
    base_model_prefix = "model"

    def __init__(self, language_model: nn.Module, lm_head: nn.Linear) -> None:
        # A copy: PreTrainedModel.__init__ writes its attention choice into the config it is given.
        super().__init__(copy.deepcopy(language_model.config))
        self.model = language_model
        self.lm_head = lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs) -> CausalLMOutputWithPast:
        """input_ids (1, T) -> logits (1, 1, vocab_size) float32 of the last position, and the updated cache."""
        kwargs.pop("logits_to_keep", None)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        hidden_states = outputs.last_hidden_state[:, -1:]  # (1, 1, hidden), after the final norm
        logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype)).float()
        # transformers renamed `past_key_values` to `cache` within 5.x; pass on whichever this version returns.
        name = next(name for name in ("cache", "past_key_values") if name in outputs)
        return CausalLMOutputWithPast(logits=logits, **{name: outputs[name]})


class GrammarSampler(LogitsProcessor):
    """Draws each token itself, among those the caption grammar allows, and returns logits that leave `generate`
    (run greedily) no other choice. Drawing here lets a `torch.Generator` seed the choice, which `generate`'s own
    sampling cannot take.

    Args:
        matcher: the grammar state of this caption (`CaptionGrammar.matcher()`); each drawn token is consumed.
        temperature: 0 picks the most likely allowed token; otherwise softmax(logits / temperature) is sampled.
        generator: seeds the draws (on its device); None uses torch's global generator.
    """

    def __init__(self, matcher, temperature: float, generator: torch.Generator | None) -> None:
        self.matcher = matcher
        self.temperature = temperature
        self.generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        device = self.generator.device if self.generator is not None else torch.device("cpu")
        allowed = torch.from_numpy(self.matcher.allowed_tokens()).to(device)
        logits = scores[0].to(device, torch.float32).masked_fill(~allowed, float("-inf"))
        if self.temperature == 0:
            token = int(logits.argmax())
        else:
            probabilities = torch.softmax(logits / self.temperature, dim=-1)
            token = int(torch.multinomial(probabilities, 1, generator=self.generator))
        self.matcher.consume(token)
        chosen = torch.full_like(scores, float("-inf"))
        chosen[:, token] = 0.0
        return chosen


# --------------------------------------------------------------------------------------------------------------------
# The pipeline side


def check_expansion_arguments(prompt, height, width, generator, temperature, max_new_tokens, limits) -> list[str]:
    """The arguments of `expand_prompt` that need no model, checked (the command line runs this before loading);
    returns the ideas as a list."""
    ideas = string_list("prompt", prompt, "an idea (a string)")
    for index, idea in enumerate(ideas):
        try:
            idea.encode("utf-8")
        except UnicodeEncodeError as error:  # e.g. an argument with a byte the locale cannot decode
            raise ValueError(
                f"`prompt[{index}]` holds a lone surrogate U+{ord(idea[error.start]):04X} at character "
                f"{error.start}, which UTF-8 cannot encode; write the character itself or remove it."
            ) from None
    check_image_size(height, width)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"`temperature` must be a finite number >= 0 (0 decodes greedily), got {temperature!r}.")
    if max_new_tokens is not None and (
        isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
    ):
        raise ValueError(f"`max_new_tokens` must be a positive int or None, got {max_new_tokens!r}.")
    if limits is not None and not isinstance(limits, CaptionLimits):
        raise ValueError(f"`limits` must be a `CaptionLimits` or None, got {type(limits).__name__}: {limits!r}.")
    check_generator_type(generator)
    if isinstance(generator, list) and len(generator) != len(ideas):
        raise ValueError(
            f"`generator` is a list of {len(generator)} generators for {len(ideas)} idea(s); give one per idea or a "
            "single generator."
        )
    return ideas


class Ideogram4PromptExpansionMixin:
    """`expand_prompt` for `Ideogram4Pipeline`: uses its `text_encoder`, `tokenizer` and `prompt_enhancer_head`."""

    @torch.no_grad()
    def expand_prompt(
        self,
        prompt: str | list[str],
        height: int = DEFAULT_IMAGE_SIDE,
        width: int = DEFAULT_IMAGE_SIDE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        temperature: float = DEFAULT_TEMPERATURE,
        max_new_tokens: int | None = None,
        limits: CaptionLimits | None = None,
    ) -> str | list[str]:
        r"""
        Expand plain-text ideas into structured JSON captions, decoded locally under the caption grammar.

        Args:
            prompt (`str` or `list[str]`): the idea(s), any text (an empty idea lets the model choose).
            height, width (`int`, defaults to 1024): the image the caption is for; its aspect ratio goes into the
                instruction, and bboxes are normalised per axis to 0..1000.
            generator (`torch.Generator` or one per idea, *optional*): seeds the sampling; the same generator state
                gives byte-identical captions. A single generator is used for the ideas in turn.
            temperature (`float`, defaults to 0.7): sampling temperature; 0 decodes greedily.
            max_new_tokens (`int`, *optional*): tokens one caption may take; defaults to what the 2048-token text
                limit leaves after the chat template.
            limits ([`CaptionLimits`], *optional*): string lengths and element count of the generated captions.

        Returns:
            Minified canonical captions (`str` for a `str` idea, else a list), each passing `check_caption` with no
            error. A caption that does not end within `max_new_tokens`, or that needs more than the 2048 text tokens
            the pipeline accepts, raises `ValueError`; no caption is ever returned truncated or invalid.
        """
        ideas = self.check_expansion_inputs(prompt, height, width, generator, temperature, max_new_tokens, limits)
        try:
            captions = self.expand_ideas(ideas, height, width, generator, temperature, max_new_tokens, limits)
        finally:
            self.maybe_free_model_hooks()
        return captions[0] if isinstance(prompt, str) else captions

    def check_expansion_inputs(self, prompt, height, width, generator, temperature, max_new_tokens, limits):
        """Validate every argument of `expand_prompt`, the head and llguidance before any model work; return the ideas
        as a list."""
        from .captions.grammar import require_llguidance

        ideas = check_expansion_arguments(prompt, height, width, generator, temperature, max_new_tokens, limits)
        if getattr(self, "prompt_enhancer_head", None) is None:
            raise ValueError(
                "Prompt expansion needs the optional `prompt_enhancer_head` component (Qwen3-VL-8B-Instruct's LM "
                "head), which this pipeline does not have. Load it from the hub and pass it in:\n"
                f'    head = Ideogram4PromptEnhancerHead.from_pretrained("{HEAD_REPO}", dtype=torch.bfloat16)\n'
                "    pipe = Ideogram4Pipeline.from_pretrained(repo_id, prompt_enhancer_head=head, dtype=torch.bfloat16)"
            )
        require_llguidance()
        return ideas

    def expand_ideas(self, ideas, height, width, generator, temperature, max_new_tokens, limits) -> list[str]:
        """The decoding of `expand_prompt` for checked arguments, without freeing the offload hooks afterwards."""
        grammar = self.caption_grammar(limits)
        budget = max_new_tokens or self.caption_token_budget()
        generators = generator if isinstance(generator, list) else [generator] * len(ideas)
        device = self._onload_decoder()
        try:
            decoder = CaptionDecoder(self.text_encoder.language_model, self.prompt_enhancer_head.lm_head)
            return [
                self._expand_idea(decoder, grammar, index, idea, height, width, g, temperature, budget, device)
                for index, (idea, g) in enumerate(zip(ideas, generators))
            ]
        finally:
            self._offload_head()

    def caption_grammar(self, limits: CaptionLimits | None = None) -> CaptionGrammar:
        """The caption grammar for this pipeline's tokenizer, compiled once per `limits`."""
        limits = limits or CaptionLimits()
        vocab_size = self.prompt_enhancer_head.config.vocab_size
        cache = self.__dict__.setdefault("_caption_grammars", {})
        tokenizer, grammar = cache.get((limits, vocab_size), (None, None))
        if tokenizer is not self.tokenizer:  # first use, or the tokenizer was replaced
            grammar = CaptionGrammar(self.tokenizer, vocab_size, limits)
            cache[(limits, vocab_size)] = (self.tokenizer, grammar)
        return grammar

    def caption_token_budget(self) -> int:
        """Tokens a caption may take: the text limit less the chat template the pipeline wraps it in."""
        return MAX_TEXT_TOKENS - len(tokenize_prompt(self.tokenizer, ""))

    def _expand_idea(self, decoder, grammar, index, idea, height, width, generator, temperature, budget, device):
        chat = self.tokenizer.apply_chat_template(
            expansion_messages(idea, height, width, grammar.limits), add_generation_prompt=True, tokenize=False
        )
        prompt_ids = self.tokenizer(chat, add_special_tokens=False)["input_ids"]
        context = decoder.config.max_position_embeddings
        if len(prompt_ids) + budget > context:
            raise ValueError(
                f"`prompt[{index}]` is too long to expand: the instruction and the idea take {len(prompt_ids)} tokens "
                f"and the caption up to {budget}, over the language model's {context} positions. Shorten the idea."
            )
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        matcher = grammar.matcher()
        settings = GenerationConfig(
            max_new_tokens=budget,
            do_sample=False,
            eos_token_id=grammar.eos_token_id,
            pad_token_id=grammar.eos_token_id,
            use_cache=True,
        )
        decoder.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=settings,
            logits_processor=LogitsProcessorList([GrammarSampler(matcher, temperature, generator)]),
        )
        return self._finished_caption(matcher, index, budget)

    def _finished_caption(self, matcher, index: int, budget: int) -> str:
        """The decoded caption, checked: complete, valid, canonical and within the text limit; else an error."""
        text = matcher.text.decode("utf-8", errors="replace")
        if not matcher.complete:
            raise ValueError(
                f"The caption for `prompt[{index}]` did not end within `max_new_tokens={budget}` tokens (it stops at "
                f"...{text[-60:]!r}); nothing is returned truncated. Pass a larger `max_new_tokens`, a lower "
                "`temperature`, or tighter `limits`."
            )
        errors = [(index, issue) for issue in check_caption(text) if issue.is_error]
        if errors:  # only a bug in the grammar could get here; refuse rather than return it
            raise CaptionError(errors, footer="prompt expansion produced an invalid caption; please report it")
        if to_json(json.loads(text)) != text:
            raise RuntimeError(f"prompt expansion produced a non-canonical caption; please report it: {text!r}")
        tokens = len(tokenize_prompt(self.tokenizer, text))
        if tokens > MAX_TEXT_TOKENS:
            raise ValueError(
                f"The caption for `prompt[{index}]` takes {tokens} tokens with the chat template, over the "
                f"{MAX_TEXT_TOKENS} the text encoder accepts. Pass tighter `limits` (shorter strings, fewer elements)."
            )
        return text

    def upsample_prompts(
        self, prompts: list[str], height, width, generator, num_images_per_prompt, options: dict | None = None
    ) -> list[str]:
        """`__call__(prompt_upsampling=True)`: `expand_prompt` with `options` (`temperature`, `max_new_tokens`,
        `limits`; the defaults otherwise), seeded by copies of the noise generator(s), one per prompt (that of its
        first image), so that the initial noise stays what it would be for the expanded captions passed directly."""
        options = {} if options is None else options
        unknown = sorted(set(options) - set(EXPANSION_OPTIONS)) if isinstance(options, dict) else None
        if unknown is None or unknown:
            raise ValueError(
                f"`prompt_upsampling_kwargs` must be a dict with keys among {list(EXPANSION_OPTIONS)} (the options of "
                f"`expand_prompt`), got {options!r}."
            )
        if isinstance(generator, list):
            generator = [generator[i * num_images_per_prompt].clone_state() for i in range(len(prompts))]
        elif generator is not None:
            generator = generator.clone_state()
        arguments = {"temperature": DEFAULT_TEMPERATURE, "max_new_tokens": None, "limits": None} | options
        self.check_expansion_inputs(prompts, height, width, generator, **arguments)
        return self.expand_ideas(prompts, height, width, generator, **arguments)

    def _onload_decoder(self) -> torch.device:
        """Put the text encoder and the head where decoding runs, and return that device.

        Under `enable_model_cpu_offload` the text encoder's hook fires only in its own `forward`, which decoding does
        not call: its pre-forward is run here (sending every other component back), and the head follows it.
        """
        encoder, head = self.text_encoder, self.prompt_enhancer_head
        hook = getattr(encoder, "_hf_hook", None)
        if isinstance(hook, CpuOffload):
            hook.pre_forward(encoder)
            head.to(hook.execution_device)
            return torch.device(hook.execution_device)
        if any(hasattr(module, "_hf_hook") for model in (encoder, head) for module in model.modules()):
            return self._execution_device  # per-module offload hooks move weights and inputs themselves
        if encoder.device != head.device:
            raise ValueError(
                f"`prompt_enhancer_head` is on {head.device} but `text_encoder` on {encoder.device}; decoding needs "
                "both on one device: `pipe.to(device)` or `pipe.enable_model_cpu_offload()`."
            )
        return encoder.device

    def _offload_head(self) -> None:
        """Under model offload, send the head back after decoding (the text encoder stays, as after its forward)."""
        hook = getattr(self.prompt_enhancer_head, "_hf_hook", None)
        if isinstance(hook, CpuOffload):
            hook.init_hook(self.prompt_enhancer_head)
