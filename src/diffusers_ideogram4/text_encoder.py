"""Text conditioning (SPEC 3): the language model of Qwen3-VL, tapped at 13 layers, features interleaved.

The wrapper keeps only the language model (the vision tower is never needed, so its weights are skipped at load
time) and does the whole layer loop inside its own `forward`, so the model-offload hook of
`enable_model_cpu_offload` fires and moves it to the accelerator.
"""

import inspect

import torch
from transformers import PreTrainedModel, Qwen3VLConfig  # noqa: F401  (PreTrainedModel: diffusers' loader looks it up here)
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLPreTrainedModel, Qwen3VLTextModel

from .constants import MAX_TEXT_TOKENS, TEXT_ENCODER_TAP_LAYERS
from .fp8 import ComputeDtypeMixin
from .loading import load_pretrained


# The vision tower's weights in a Qwen3-VL checkpoint: never needed, never loaded.
VISION_KEYS = r"^visual\."
# Set in `text_encoder/config.json` of the fp8 release (the loader detects fp8 from the weights themselves).
FP8_CONFIG_FLAG = "ideogram_fp8_weight_only"


_MASK_PARAMETERS = inspect.signature(create_causal_mask).parameters


def _causal_mask(config, hidden_states: torch.Tensor, positions: torch.Tensor):
    """The language model's own causal mask (None where its attention can use `is_causal`), with no cache.

    `create_causal_mask` changed its arguments within transformers 5.x (`cache_position` in early releases, `cache` for
    `past_key_values` from 5.24); positional for the stable three, by name for the rest.
    """
    kwargs = {"position_ids": positions}
    if "cache_position" in _MASK_PARAMETERS:
        kwargs["cache_position"] = positions[0]
    kwargs["cache" if "cache" in _MASK_PARAMETERS else "past_key_values"] = None
    return create_causal_mask(config, hidden_states, None, **kwargs)


def tokenize_prompt(tokenizer, caption: str) -> list[int]:
    """Token ids of one caption wrapped in the chat template (the single user turn the model was trained with, the
    caption verbatim), with the generation prompt, no extra specials."""
    messages = [{"role": "user", "content": [{"type": "text", "text": caption}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def count_caption_tokens(caption, tokenizer) -> int:
    """How many of the 2048 text tokens a caption (a JSON string or a dict) uses, chat template included."""
    if isinstance(caption, dict):
        from .captions import to_json

        caption = to_json(caption)
    return len(tokenize_prompt(tokenizer, caption))


def check_token_counts(token_ids: list[list[int]], limit: int = MAX_TEXT_TOKENS) -> None:
    """Raise before any model work when a prompt exceeds the limit; the model never truncates."""
    too_long = [(i, len(ids)) for i, ids in enumerate(token_ids) if len(ids) > limit]
    if too_long:
        details = ", ".join(f"prompt[{i}] has {n} tokens" for i, n in too_long)
        raise ValueError(
            f"`prompt` is too long: {details}, over the limit of {limit} tokens (chat template included). "
            "Shorten the caption (fewer or shorter element descriptions); it is never truncated."
        )


def pad_token_ids(token_ids: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest prompt of the batch -> input_ids, attention_mask, both (B, T_max).

    Right padding under a causal encoder means real tokens never see the padding, so no mask is needed there.
    """
    longest = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), longest), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


class Ideogram4TextEncoder(ComputeDtypeMixin, Qwen3VLPreTrainedModel):
    """Qwen3-VL's language model returning Ideogram 4's text features.

    Loads a full Qwen3-VL checkpoint (`text_encoder/` of the hub repos) and drops the vision tower's weights.
    `forward(input_ids, attention_mask)` -> `(B, T, 13 * hidden_size)` float32 features, feature `d` of tap `k` at
    index `d * 13 + k`, zero at padding positions.
    """

    config_class = Qwen3VLConfig
    _keys_to_ignore_on_load_unexpected = [VISION_KEYS]
    _no_split_modules = ["Qwen3VLTextDecoderLayer"]
    tap_layers = TEXT_ENCODER_TAP_LAYERS

    def __init__(self, config: Qwen3VLConfig) -> None:
        super().__init__(config)
        self.language_model = Qwen3VLTextModel._from_config(config.text_config)
        self.post_init()

    @property
    def feature_dim(self) -> int:
        return self.config.text_config.hidden_size * len(self.tap_layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) right-padded, attention_mask (B, T) of 1 for real tokens -> (B, T, 13 * hidden) float32."""
        if attention_mask is not None and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            raise ValueError("`attention_mask` must be right-padded (ones, then zeros) for the Ideogram 4 encoder.")
        lm = self.language_model
        hidden_states = lm.embed_tokens(input_ids)  # (B, T, hidden)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        # Text-only MRoPE: the same 1-D positions on the t, h and w rows.
        rotary = lm.rotary_emb(hidden_states, positions[None].expand(3, -1, -1))
        causal_mask = _causal_mask(lm.config, hidden_states, positions)
        taps = []
        last = max(self.tap_layers)
        for index, layer in enumerate(lm.layers[: last + 1]):
            hidden_states = layer(
                hidden_states, attention_mask=causal_mask, position_ids=positions, position_embeddings=rotary
            )
            if index in self.tap_layers:
                taps.append(hidden_states.float())  # raw layer output: no final norm
        features = torch.stack(taps, dim=-1).flatten(-2)  # (B, T, hidden, 13) -> (B, T, 13 * hidden), interleaved
        if attention_mask is not None:
            features = torch.where(attention_mask[..., None].bool(), features, features.new_zeros(()))
        return features

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load strictly (`diffusers_ideogram4.loading`): a missing, stray or mis-shaped language-model weight raises
        and names the keys; the vision tower's weights are skipped. The fp8 release (float8 Linear weights with
        per-row `.weight_scale`) loads on one device and is dequantized at run time."""
        return load_pretrained(
            pretrained_model_name_or_path,
            build_model=lambda folder: cls(Qwen3VLConfig.from_pretrained(folder)),
            host_from_pretrained=super().from_pretrained,
            host_dtype_argument="dtype",
            weights_name="model",
            hint="Expected a Qwen3-VL checkpoint (`text_encoder/` of an Ideogram 4 repo).",
            ignore=VISION_KEYS,
            check_before_host=False,
            **kwargs,
        )
