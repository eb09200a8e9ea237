"""The caption grammar for constrained decoding (prompt expansion): every token a model may emit keeps the text a
prefix of a valid caption.

1. `generation_schema` derives a JSON Schema from the package's caption schema (`caption_schema.json`): the
   `oneOf` / `if`-`then` branches become one object schema per variant (so key order is fixed within each), every
   string gets a `maxLength` (so that decoding always ends), and the checker's warnings are ruled out where a schema
   can say so (no empty strings, a `high_level_description`, at most `MAX_RECOMMENDED_ELEMENTS` elements).
2. `CaptionGrammar` compiles it with llguidance for one tokenizer: minified, literal UTF-8, keys in schema order,
   `minimum` / `maximum`, four-value bboxes, the colour pattern and `maxItems` all enforced token by token.
3. The one rule of the checker no schema states, `min <= max` in a bbox, is enforced on the same token level by
   `CaptionMatcher`: a token that would make the bbox's `y_max` / `x_max` smaller than its `y_min` / `x_min` (or a
   digit prefix that can no longer reach it) is masked, so no caption ever needs repairing.

llguidance is an optional dependency: `pip install "diffusers-ideogram4[expand]"`.
"""

from dataclasses import dataclass, fields

import numpy as np

from .schema import BBOX_MAX, MAX_RECOMMENDED_ELEMENTS, load_caption_schema


EXPAND_EXTRA = 'pip install "diffusers-ideogram4[expand]"'
# What llguidance is asked to write: the serialization the model was trained on (`to_json`). No whitespace between
# tokens; escapes only for a quote, a backslash and a line break (json.dumps writes those three the same way; `\/`
# and `\uXXXX` are never written by it).
JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": ",",
    "key_separator": ":",
    "json_allowed_escapes": '"\\n',
}
# The checker warns when this optional key is missing; the generation schema requires it.
RECOMMENDED_KEYS = ("high_level_description",)
# The bbox key as the grammar writes it, the text that opens a bbox's four values.
BBOX_OPENING = b'"bbox":['


@dataclass(frozen=True)
class CaptionLimits:
    """Bounds the generation schema adds to the caption schema, so that every decode ends.

    The defaults leave room for rich captions while keeping the worst case near the 2048-token limit of the text
    encoder; a caption over that limit is refused after decoding, never truncated.

    Args:
        description_chars: `high_level_description` and `background`, in characters.
        style_chars: each string of `style_description` (`aesthetics`, `lighting`, `photo`, `medium`, `art_style`).
        element_chars: an element's `desc`.
        text_chars: a text element's `text`, the literal string to render.
        max_elements: elements in `compositional_deconstruction.elements` (the checker warns above 12).
    """

    description_chars: int = 400
    style_chars: int = 200
    element_chars: int = 300
    text_chars: int = 200
    max_elements: int = MAX_RECOMMENDED_ELEMENTS

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`CaptionLimits.{field.name}` must be a positive int, got {value!r}.")
        if self.max_elements > MAX_RECOMMENDED_ELEMENTS:
            raise ValueError(
                f"`CaptionLimits.max_elements={self.max_elements}`: at most {MAX_RECOMMENDED_ELEMENTS}; the caption "
                "checker warns about longer element lists (layouts past it are followed loosely)."
            )

    def string_chars(self) -> dict[str, int]:
        """The `maxLength` of every string property of the caption schema, by property name."""
        style = ("aesthetics", "lighting", "photo", "medium", "art_style")
        return {
            "high_level_description": self.description_chars,
            "background": self.description_chars,
            **dict.fromkeys(style, self.style_chars),
            "desc": self.element_chars,
            "text": self.text_chars,
        }


# --------------------------------------------------------------------------------------------------------------------
# The generation schema


def _inline_refs(node, definitions: dict):
    """A copy of `node` with every local `#/$defs/name` reference replaced by (a copy of) its definition."""
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline_refs(definitions[node["$ref"].rsplit("/", 1)[-1]], definitions)
        return {key: _inline_refs(value, definitions) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline_refs(value, definitions) for value in node]
    return node


def _bound_strings(node, string_chars: dict[str, int]) -> None:
    """Give every string property a length of 1..its limit (in place); a string the limits do not cover raises."""
    if isinstance(node, list):
        for value in node:
            _bound_strings(value, string_chars)
        return
    if not isinstance(node, dict):
        return
    for name, value in node.get("properties", {}).items():
        if isinstance(value, dict) and value.get("type") == "string" and "pattern" not in value:
            if name not in string_chars:
                raise KeyError(f"the caption schema's string property {name!r} has no limit in CaptionLimits")
            value.update(minLength=1, maxLength=string_chars[name])
    for value in node.values():
        _bound_strings(value, string_chars)


def _one_of_variants(node: dict) -> list[dict]:
    """`{"oneOf": [{"required": [k1]}, {"required": [k2]}]}` on an object -> one object schema per branch: branch k
    requires k and lacks the keys the other branches require (exactly one of them)."""
    branches = [branch["required"] for branch in node["oneOf"]]
    variants = []
    for keys in branches:
        others = {key for other in branches if other is not keys for key in other}
        variant = {name: value for name, value in node.items() if name != "oneOf"}
        variant["properties"] = {name: value for name, value in node["properties"].items() if name not in others}
        variant["required"] = [*node["required"], *keys]
        variants.append(variant)
    return variants


def _type_variants(node: dict) -> list[dict]:
    """An object whose `allOf` holds `if type == T then (not) required` rules -> one object schema per type value,
    with `type` a constant and the rules applied (text elements require `text`, objects lack it)."""
    variants = []
    for kind in node["properties"]["type"]["enum"]:
        required, forbidden = list(node["required"]), set()
        for rule in node["allOf"]:
            if rule["if"]["properties"]["type"]["const"] != kind:
                continue
            required += rule["then"].get("required", [])
            forbidden.update(rule["then"].get("not", {}).get("required", []))
        variant = {name: value for name, value in node.items() if name != "allOf"}
        variant["properties"] = {
            name: {"const": kind} if name == "type" else value
            for name, value in node["properties"].items()
            if name not in forbidden
        }
        variant["required"] = required
        variants.append(variant)
    return variants


def generation_schema(limits: CaptionLimits | None = None) -> dict:
    """The JSON Schema decoding is constrained to: the caption schema with its branches split into variants, string
    lengths bounded by `limits`, and the checker's warnings ruled out where a schema can (see the module docstring).
    Every caption it accepts whose bboxes have min <= max passes `check_caption` with no error."""
    limits = limits or CaptionLimits()
    source = load_caption_schema()
    schema = _inline_refs({key: value for key, value in source.items() if key != "$defs"}, source["$defs"])
    _bound_strings(schema, limits.string_chars())
    schema["required"] = [key for key in schema["properties"] if key in (*schema["required"], *RECOMMENDED_KEYS)]
    properties = schema["properties"]
    properties["style_description"] = {"anyOf": _one_of_variants(properties["style_description"])}
    elements = properties["compositional_deconstruction"]["properties"]["elements"]
    elements["items"] = {"anyOf": _type_variants(elements["items"])}
    elements["maxItems"] = limits.max_elements
    return schema


# --------------------------------------------------------------------------------------------------------------------
# bbox min <= max, token by token


def _longest_completions() -> dict[bytes, int]:
    """Every digit prefix of a bbox value 0..BBOX_MAX -> the largest value it can still become."""
    largest = {}
    for value in range(BBOX_MAX + 1):
        digits = str(value).encode()
        for end in range(1, len(digits) + 1):
            largest[digits[:end]] = max(largest.get(digits[:end], -1), value)
    return largest


LARGEST_COMPLETION = _longest_completions()


def open_bbox(text: bytes) -> bytes | None:
    """The values written so far of a bbox the text is inside (what follows its `[`), or None outside a bbox.

    Inside a JSON string a quote is escaped, so `"bbox":[` occurs in grammatical caption text only as the key."""
    start = text.rfind(BBOX_OPENING)
    if start < 0:
        return None
    inside = text[start + len(BBOX_OPENING) :]
    return None if b"]" in inside else inside


def bbox_order_possible(inside: bytes) -> bool:
    """Whether bbox values written so far (the text after `[`, possibly running past the closing `]`) can still end
    with y_min <= y_max and x_min <= x_max. Values 2 and 3 are compared with values 0 and 1; an unfinished value
    with the largest value its digits can still become."""
    closed = b"]" in inside
    values = inside.split(b"]", 1)[0].split(b",")
    for index in range(2, min(len(values), 4)):
        low, value = values[index - 2], values[index]
        if not (low.isdigit() and value.isdigit()):
            continue  # not started yet (or not a number at all, which the grammar rules out)
        finished = closed or index < len(values) - 1
        reachable = int(value) if finished else LARGEST_COMPLETION.get(value, -1)
        if reachable < int(low):
            return False
    return True


# --------------------------------------------------------------------------------------------------------------------
# llguidance


def require_llguidance():
    """The llguidance module, or an ImportError that says how to install it."""
    try:
        import llguidance
        import llguidance.hf
    except ImportError as error:
        raise ImportError(
            f"Prompt expansion constrains decoding with llguidance, which is not installed: {EXPAND_EXTRA}"
        ) from error
    return llguidance


class CaptionGrammar:
    """The generation schema compiled for one tokenizer; `matcher()` starts one caption.

    Args:
        tokenizer: a fast Hugging Face tokenizer (llguidance reads its byte-level vocabulary).
        vocab_size: rows of the model's logits (at least the tokenizer's size; the extra rows are never allowed).
        limits: string lengths and element count, `CaptionLimits()` by default.
    """

    def __init__(self, tokenizer, vocab_size: int, limits: CaptionLimits | None = None) -> None:
        llguidance = require_llguidance()
        if len(tokenizer) > vocab_size:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but the model's logits only {vocab_size}: the tokenizer "
                "and the language model do not belong together."
            )
        try:
            self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        except ValueError as error:
            raise ValueError(
                f"Prompt expansion needs a fast tokenizer (tokenizers-backed), got {type(tokenizer).__name__}: {error}"
            ) from error
        self.limits = limits or CaptionLimits()
        self.schema = generation_schema(self.limits)
        self.grammar = llguidance.LLMatcher.grammar_from_json_schema(self.schema, defaults=JSON_OPTIONS)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(self.grammar, self.tokenizer)
        if is_error:
            raise RuntimeError(f"llguidance cannot compile the caption grammar: {messages}")
        self.vocab_size = vocab_size
        self.eos_token_id = self.tokenizer.eos_token
        # Bytes of every token, to follow bbox values; special tokens write nothing into the caption.
        self.token_bytes = [
            b"" if self.tokenizer.is_special_token(token) else self.tokenizer.decode_bytes([token])
            for token in range(vocab_size)
        ]
        self._llguidance = llguidance

    def matcher(self) -> "CaptionMatcher":
        return CaptionMatcher(self)


class CaptionMatcher:
    """The state of one caption being decoded: which tokens may come next, and the text so far."""

    def __init__(self, grammar: CaptionGrammar) -> None:
        self.grammar = grammar
        self._matcher = grammar._llguidance.LLMatcher(grammar.tokenizer, grammar.grammar, log_level=0)
        self.text = b""
        self.ended = False  # the end-of-sequence token was consumed

    def allowed_tokens(self) -> np.ndarray:
        """(vocab_size,) bool: the tokens that keep the text a prefix of a valid caption (only EOS once complete)."""
        packed = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(packed, bitorder="little")[: self.grammar.vocab_size].astype(bool)
        self._raise_on_error()
        inside = open_bbox(self.text)
        if inside is not None:
            for token in np.flatnonzero(allowed):
                if not bbox_order_possible(inside + self.grammar.token_bytes[token]):
                    allowed[token] = False
        if not allowed.any():
            raise RuntimeError(f"The caption grammar allows no next token after {self.text[-80:]!r}.")
        return allowed

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            self._raise_on_error()
        if token == self.grammar.eos_token_id:
            self.ended = True
        else:
            self.text += self.grammar.token_bytes[token]

    def refused_at(self, text: str) -> int | None:
        """Feed `text` token by token: None when it is a whole caption, else the byte offset of the first token the
        grammar refuses (the text's length when every token is taken but the caption is unfinished)."""
        offset = 0
        for token in self.grammar.tokenizer.tokenize_str(text):
            if not self.allowed_tokens()[token]:
                return offset
            self.consume(token)
            offset += len(self.grammar.token_bytes[token])
        return None if self._matcher.is_accepting() else offset

    @property
    def complete(self) -> bool:
        """The text is a whole caption and the end-of-sequence token was emitted."""
        return self.ended and self._matcher.is_accepting()

    def _raise_on_error(self) -> None:
        if self._matcher.is_error():
            raise RuntimeError(f"llguidance: {self._matcher.get_error()} (caption so far: {self.text[-80:]!r})")
