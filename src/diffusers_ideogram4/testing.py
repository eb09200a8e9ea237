"""Tiny random Ideogram 4 components, built offline: for tests, benchmarks and `ideogram4 generate --model tiny-random`.

The images they make are noise; the shapes, layouts and code paths are the real ones.
"""

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
from transformers import PreTrainedTokenizerFast, Qwen3VLConfig

from .constants import TEXT_ENCODER_SIZES, TRANSFORMER_SIZES, VAE_SIZES
from .text_encoder import Ideogram4TextEncoder
from .transformer_ideogram4 import Ideogram4Transformer2DModel


# A Qwen-style chat template: one `<|im_start|>role\n...<|im_end|>\n` block per message, then the assistant prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TOKENIZER_CORPUS = [
    '{"high_level_description":"A poster","style_description":{"aesthetics":"bold","lighting":"soft"},',
    '"compositional_deconstruction":{"background":"plain","elements":[{"type":"text","bbox":[0,0,100,1000],',
    '"text":"HELLO","desc":"big red letters","color_palette":["#FF0000","#00AAFF"]}]}}',
    "a photo of a cat on a mat, studio lighting, 35mm, warm colour palette, typography, poster, neon sign",
]


def tiny_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few caption lines, with a Qwen-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    vocab_size = vocab_size or TEXT_ENCODER_SIZES["tiny"]["vocab_size"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        chat_template=CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )


def tiny_text_encoder_config() -> Qwen3VLConfig:
    size = TEXT_ENCODER_SIZES["tiny"]
    head_slots = size["head_dim"] // 2
    text_config = dict(
        size,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,  # room for the expansion instruction, a long idea and a caption
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [head_slots - 2, 1, 1],
            "mrope_interleaved": True,
        },
    )
    vision_config = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=16,
        num_heads=2,
        out_hidden_size=16,
        deepstack_visual_indexes=[0],
        num_position_embeddings=16,
    )
    return Qwen3VLConfig(text_config=text_config, vision_config=vision_config)


def tiny_text_encoder(seed: int = 0) -> Ideogram4TextEncoder:
    torch.manual_seed(seed)
    return Ideogram4TextEncoder(tiny_text_encoder_config()).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKLFlux2:
    """A 4-level FLUX.2-style VAE (8x down, 32 latent channels) a few thousand parameters wide, with random latent
    statistics so that denormalisation is exercised."""
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(**VAE_SIZES["tiny"])
    vae.bn.running_mean.normal_(0.0, 0.5)
    vae.bn.running_var.uniform_(0.5, 2.0)
    return vae.eval()


def tiny_transformer(seed: int = 0, init_std: float = 0.05) -> Ideogram4Transformer2DModel:
    """Tiny transformer; every weight (norms and zero-initialised layers included) is random, so that parity tests
    see every parameter."""
    generator = torch.Generator().manual_seed(seed)
    model = Ideogram4Transformer2DModel(**TRANSFORMER_SIZES["tiny"])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * init_std
            parameter.copy_(noise + 1.0 if "norm" in name else noise)  # norm weights around 1
    return model.eval()


def random_transformer_inputs(
    text_lengths,
    grid: tuple[int, int],
    config: dict,
    *,
    multiple: int = 1,
    timestep: float = 0.4,
    device=None,
    dtype=None,
) -> dict:
    """Seeded random inputs for `Ideogram4Transformer2DModel(**config)`: prompts of `text_lengths` tokens on a (rows,
    columns) token grid, packed as the pipeline packs them (`layout.pack_layout`, padded to a multiple of `multiple`).
    -> the keyword arguments of `forward`, with `return_dict=False`."""
    from .layout import pack_layout

    layout = pack_layout(list(text_lengths), *grid, multiple=multiple)
    generator = torch.Generator().manual_seed(0)
    rows, length = layout.indicator.shape
    hidden_states = torch.randn(rows, length, config["in_channels"], generator=generator)
    features = torch.randn(rows, max(text_lengths), config["llm_features_dim"], generator=generator)
    return dict(
        hidden_states=hidden_states.to(device, dtype),
        timestep=torch.tensor([timestep], device=device),
        encoder_hidden_states=features.to(device, dtype),
        position_ids=layout.position_ids.to(device),
        segment_ids=None,
        indicator=layout.indicator.to(device),
        attention_mask=None if layout.attention_mask is None else layout.attention_mask.to(device),
        return_dict=False,
    )


def tiny_prompt_enhancer_head(seed: int = 0):
    """A random LM head for the tiny text encoder: expansion decodes valid but meaningless captions with it."""
    from .prompt_expansion import Ideogram4PromptEnhancerHead

    size = TEXT_ENCODER_SIZES["tiny"]
    torch.manual_seed(seed)
    return Ideogram4PromptEnhancerHead(hidden_size=size["hidden_size"], vocab_size=size["vocab_size"]).eval()


def tiny_components(seed: int = 0, unconditional: bool = True, prompt_enhancer_head: bool = False) -> dict:
    """Every pipeline component at tiny size, seeded, offline (the optional LM head on request)."""
    components = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed),
        tokenizer=tiny_tokenizer(),
        transformer=tiny_transformer(seed),
        unconditional_transformer=tiny_transformer(seed + 1) if unconditional else None,
    )
    if prompt_enhancer_head:
        components["prompt_enhancer_head"] = tiny_prompt_enhancer_head(seed)
    return components


def tiny_pipeline(seed: int = 0, unconditional: bool = True, prompt_enhancer_head: bool = False, **pipeline_kwargs):
    from .pipeline_ideogram4 import Ideogram4Pipeline

    pipe = Ideogram4Pipeline(**tiny_components(seed, unconditional, prompt_enhancer_head), **pipeline_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
