"""Prompt expansion: plain-text ideas -> valid captions, decoded by the tiny text encoder plus a random LM head under
the caption grammar."""

import json
import re
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import CAPTION, seeded
from diffusers_ideogram4 import CheckpointMismatchError, Ideogram4Pipeline, Ideogram4TextEncoder, check_caption
from diffusers_ideogram4.captions import to_json
from diffusers_ideogram4.captions.grammar import (
    EXPAND_EXTRA,
    CaptionGrammar,
    CaptionLimits,
    bbox_order_possible,
    generation_schema,
    open_bbox,
)
from diffusers_ideogram4.captions.schema import (
    ART_STYLE_KEY_ORDER,
    COMPOSITION_KEY_ORDER,
    MAX_RECOMMENDED_ELEMENTS,
    OBJECT_ELEMENT_KEY_ORDER,
    PHOTO_STYLE_KEY_ORDER,
    TEXT_ELEMENT_KEY_ORDER,
    TOP_LEVEL_KEY_ORDER,
    load_caption_schema,
)
from diffusers_ideogram4.prompt_expansion import (
    HEAD_REPO,
    CaptionDecoder,
    Ideogram4PromptEnhancerHead,
    expansion_messages,
    instruction,
)
from diffusers_ideogram4.testing import (
    tiny_components,
    tiny_pipeline,
    tiny_prompt_enhancer_head,
    tiny_text_encoder_config,
    tiny_tokenizer,
)


# Short strings and few elements: the random head writes until a limit or a closing quote (often characters of 3 or 4
# UTF-8 bytes, a token each in the tiny vocabulary), so these keep each caption to about a hundred tokens. The
# default limits are exercised on the shallow encoder below.
SHORT = CaptionLimits(description_chars=8, style_chars=6, element_chars=8, text_chars=6, max_elements=3)
IDEAS = {
    "ascii": "a jazz poster that says JAZZ NIGHT",
    "cjk": "夜のジャズ喫茶の看板、「ジャズの夜」と書いてある",
    "empty": "",
    "5000 characters": ("a quiet harbour at dawn, fishing boats, gulls, a lighthouse, mist; " * 80)[:5000],
}
EXAMPLE = json.dumps(
    {
        "high_level_description": "A retro travel poster.",
        "style_description": {
            "aesthetics": "vintage",
            "lighting": "flat",
            "medium": "screen print",
            "art_style": "art deco",
            "color_palette": ["#F2C14E", "#1B2A41"],
        },
        "compositional_deconstruction": {
            "background": "a calm sea",
            "elements": [
                {
                    "type": "text",
                    "bbox": [40, 100, 200, 900],
                    "text": "VISIT\nSEASIDE",
                    "desc": "bold serif",
                    "color_palette": ["#1B2A41"],
                },
                {"type": "obj", "bbox": [300, 300, 900, 700], "desc": "a lighthouse"},
            ],
        },
    },
    ensure_ascii=False,
    separators=(",", ":"),
)


def shallow_pipeline(seed: int = 0) -> Ideogram4Pipeline:
    """The tiny pipeline with a 2-layer language model: decoding runs no tapped layer, so the many captions of the
    sweep cost a fraction of the 36-layer encoder's time. Only for expansion (it cannot encode captions)."""
    config = tiny_text_encoder_config()
    config.text_config.num_hidden_layers = 2
    torch.manual_seed(seed)
    components = tiny_components(seed, prompt_enhancer_head=True)
    components["text_encoder"] = Ideogram4TextEncoder(config).eval()
    pipe = Ideogram4Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def shallow():
    return shallow_pipeline()


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0, prompt_enhancer_head=True)


@pytest.fixture(scope="module")
def grammar():
    return CaptionGrammar(tiny_tokenizer(), 512)


def assert_valid_canonical(caption: str) -> None:
    errors = [str(issue) for issue in check_caption(caption) if issue.is_error]
    assert errors == [], caption
    assert to_json(json.loads(caption)) == caption


# --------------------------------------------------------------------------------------------------------------------
# The generation schema and the grammar


def test_generation_schema_is_the_caption_schema_split_and_bounded():
    schema = generation_schema(SHORT)
    assert tuple(schema["properties"]) == TOP_LEVEL_KEY_ORDER
    assert schema["required"] == ["high_level_description", "compositional_deconstruction"]
    photo, art = schema["properties"]["style_description"]["anyOf"]
    assert tuple(photo["properties"]) == PHOTO_STYLE_KEY_ORDER and "photo" in photo["required"]
    assert tuple(art["properties"]) == ART_STYLE_KEY_ORDER and "art_style" in art["required"]
    composition = schema["properties"]["compositional_deconstruction"]
    assert tuple(composition["properties"]) == COMPOSITION_KEY_ORDER
    elements = composition["properties"]["elements"]
    assert elements["maxItems"] == SHORT.max_elements
    obj, text = elements["items"]["anyOf"]
    assert tuple(obj["properties"]) == OBJECT_ELEMENT_KEY_ORDER and obj["properties"]["type"] == {"const": "obj"}
    assert tuple(text["properties"]) == TEXT_ELEMENT_KEY_ORDER and text["required"] == ["type", "desc", "text"]
    assert text["properties"]["desc"]["maxLength"] == SHORT.element_chars
    assert text["properties"]["text"]["maxLength"] == SHORT.text_chars
    assert art["properties"]["color_palette"]["maxItems"] == 16 and obj["properties"]["color_palette"]["maxItems"] == 5
    assert obj["properties"]["bbox"]["items"] == {**load_caption_schema()["$defs"]["coordinate"]}

    strings = re.findall(r'"type": "string", "minLength": (\d+), "maxLength": (\d+)', json.dumps(schema))
    assert len(strings) == 1 + 2 * 4 + 1 + 1 + 2  # hld, 4 per style variant, background, obj desc, text + desc
    assert {low for low, _ in strings} == {"1"}
    assert "$ref" not in json.dumps(schema) and "oneOf" not in json.dumps(schema)


def test_limits_are_checked():
    with pytest.raises(ValueError, match=r"`CaptionLimits.style_chars` must be a positive int, got 0"):
        CaptionLimits(style_chars=0)
    with pytest.raises(ValueError, match=rf"`CaptionLimits.max_elements=13`: at most {MAX_RECOMMENDED_ELEMENTS}"):
        CaptionLimits(max_elements=13)


def test_grammar_accepts_a_full_caption(grammar):
    assert check_caption(EXAMPLE) == []
    assert grammar.matcher().refused_at(EXAMPLE) is None
    with open("examples/poster.json", encoding="utf-8") as handle:
        assert grammar.matcher().refused_at(handle.read().rstrip("\n")) is None


@pytest.mark.parametrize(
    "old, new, refused",
    [
        ("[40,100,200,900]", "[40,100,200,1001]", "1001]"),  # out of range
        ("[40,100,200,900]", "[240,100,200,900]", "200,900]"),  # y_min > y_max, refused at y_max
        ("[300,300,900,700]", "[300,300,900,70]", "70]"),  # x_max < x_min, refused as the value ends
        ("[40,100,200,900]", "[40,100,200]", "]"),  # three values
        ('"#1B2A41"]}', '"#1b2a41"]}', '1b2a41"]}'),  # lowercase hex
        ('"bbox":[300,300,900,700],"desc"', '"desc":"x","bbox":[300,300,900,700],"desc"', 'bbox":[300'),  # order
        ('"art_style":"art deco"', '"photo":"35mm","art_style":"art deco"', 'photo":"35mm"'),  # photo after medium
        ('"desc":"a lighthouse"', '"text":"HI","desc":"a lighthouse"', 'text":"HI"'),  # text on an obj element
        ('"background":"a calm sea"', '"background": "a calm sea"', ' "a calm sea"'),  # not minified
        ('"background":"a calm sea"', '"background":"a calm s\\u00e9a"', "u00e9a"),  # \\u escape
        ('"background":"a calm sea"', '"background":""', '""'),  # empty string
    ],
)
def test_grammar_refuses_invalid_captions_token_by_token(grammar, old, new, refused):
    bad = EXAMPLE.replace(old, new)
    assert bad != EXAMPLE
    offset = grammar.matcher().refused_at(bad)
    assert offset is not None
    # The first refused token starts inside the offending part (a token may carry a few bytes before it).
    start = bad.encode().index(refused.encode(), bad.encode().index(new.encode()))
    assert start - 4 <= offset <= start + len(refused.encode()), (bad.encode()[:offset], refused)


def test_grammar_refuses_a_style_palette_of_17(grammar):
    bad = EXAMPLE.replace('["#F2C14E","#1B2A41"]', json.dumps(["#F2C14E"] * 17, separators=(",", ":")))
    assert grammar.matcher().refused_at(bad) is not None
    ok = EXAMPLE.replace('["#F2C14E","#1B2A41"]', json.dumps(["#F2C14E"] * 16, separators=(",", ":")))
    assert grammar.matcher().refused_at(ok) is None


@pytest.mark.parametrize(
    "inside, possible",
    [
        (b"", True),
        (b"500,", True),
        (b"500,200,1", True),  # can still become 1000
        (b"500,200,4", False),  # 4, 4x and 4xx are all below 500
        (b"500,200,49", False),
        (b"500,200,0", False),  # 0 cannot grow
        (b"500,200,5", True),
        (b"500,200,499,", False),  # finished below y_min
        (b"500,200,500,1", True),
        (b"500,200,500,19", False),  # at most 199 < 200
        (b"500,200,500,199]", False),
        (b"500,200,500,200]", True),
        (b"500,200,500,200],", True),  # text after the bbox is not looked at
    ],
)
def test_bbox_order_possible(inside, possible):
    assert bbox_order_possible(inside) is possible


def test_open_bbox_finds_only_the_key():
    assert open_bbox(b'{"a":"x","bbox":[1,2') == b"1,2"
    assert open_bbox(b'{"a":"x","bbox":[1,2,3,4],"desc":"') is None
    assert open_bbox(b'{"desc":"say \\"bbox\\":[1') is None  # inside a string a quote is escaped


def test_tiny_tokenizer_can_write_every_utf8_byte(grammar):
    """Byte-level BPE: every byte that occurs in UTF-8 text is a token of its own (0xC0, 0xC1, 0xF5..0xFF never
    occur; llguidance reserves 0xFF to mark special tokens)."""
    single = {token_bytes[0] for token_bytes in grammar.token_bytes if len(token_bytes) == 1}
    utf8_bytes = set(range(0xC0)) | set(range(0xC2, 0xF5))
    assert utf8_bytes <= single


def test_vocab_rows_past_the_tokenizer_are_never_allowed(grammar):
    tokenizer_size = len(tiny_tokenizer())
    allowed = grammar.matcher().allowed_tokens()
    assert allowed.shape == (512,) and not allowed[tokenizer_size:].any()


# --------------------------------------------------------------------------------------------------------------------
# The instruction


def test_instruction_states_every_rule_the_checker_enforces():
    """Derived from the caption schema and the checker's constants: every key, every key order, every bound, the
    enum values, the colour format and the bbox rules appear in the instruction."""
    schema = load_caption_schema()
    text = instruction(768, 1024)
    definitions = schema["$defs"]
    for node in (schema, *definitions.values()):
        for key in node.get("properties", {}):
            assert key in text, key
        if node.get("required"):
            lines = [line for line in text.splitlines() if "required" in line]
            assert any(all(key in line for key in node["required"]) for line in lines), node["required"]
        for keyword in ("maxItems", "minimum", "maximum"):
            for value in re.findall(rf'"{keyword}": (\d+)', json.dumps(node)):
                assert value in text, (keyword, value)
    for order in (
        TOP_LEVEL_KEY_ORDER,
        PHOTO_STYLE_KEY_ORDER,
        ART_STYLE_KEY_ORDER,
        COMPOSITION_KEY_ORDER,
        OBJECT_ELEMENT_KEY_ORDER,
        TEXT_ELEMENT_KEY_ORDER,
    ):
        assert ", ".join(order) in text, order
    for kind in definitions["element"]["properties"]["type"]["enum"]:
        assert f'"type" set to "{kind}"' in text
    assert "#RRGGBB with uppercase hex digits" in text
    assert "[y_min, x_min, y_max, x_max]" in text and "y_min <= y_max and x_min <= x_max" in text
    assert "minified" in text and "literal UTF-8" in text and "no other keys" in text
    assert f"at most {MAX_RECOMMENDED_ELEMENTS}" in text
    # The example caption in it is valid, and the image size is stated.
    example = text.rstrip("\n").splitlines()[-1]
    assert check_caption(example) == []
    assert "1024 x 768 pixels (landscape, 4:3 (width:height))" in text
    assert "(portrait, 1:2 (width:height))" in instruction(1024, 512)
    assert "at most 3." in instruction(1024, 1024, SHORT)


def test_idea_is_the_user_turn_verbatim():
    messages = expansion_messages("  a cat\n", 1024, 1024)
    assert [m["role"] for m in messages] == ["system", "user"] and messages[1]["content"] == "  a cat\n"


# --------------------------------------------------------------------------------------------------------------------
# The head and the decoder


def write_head_folder(folder, tensors: dict, hidden_size=16, vocab_size=512):
    """A folder in the upstream repo's format: diffusers' model config and one safetensors file."""
    folder.mkdir()
    config = {
        "_class_name": "Ideogram4PromptEnhancerHead",
        "_diffusers_version": "0.39.0",
        "hidden_size": hidden_size,
        "vocab_size": vocab_size,
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))


def test_head_loads_from_the_upstream_format(tmp_path):
    weight = torch.randn(512, 16, generator=seeded(3))
    write_head_folder(tmp_path / "head", {"lm_head.weight": weight})
    head = Ideogram4PromptEnhancerHead.from_pretrained(tmp_path / "head", dtype=torch.bfloat16)
    assert (head.config.hidden_size, head.config.vocab_size) == (16, 512)
    assert [name for name, _ in head.named_parameters()] == ["lm_head.weight"] and head.lm_head.bias is None
    torch.testing.assert_close(head.lm_head.weight, weight.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"weight": torch.zeros(512, 16)}, r"missing keys: lm_head\.weight"),
        (
            {"lm_head.weight": torch.zeros(512, 16), "lm_head.bias": torch.zeros(512)},
            r"unexpected keys: lm_head\.bias",
        ),
    ],
)
def test_head_loading_is_strict(tmp_path, tensors, message):
    write_head_folder(tmp_path / "head", tensors)
    with pytest.raises(CheckpointMismatchError, match=message):
        Ideogram4PromptEnhancerHead.from_pretrained(tmp_path / "head")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=0), r"^`hidden_size` must be a positive int, got 0\.$"),
        (dict(vocab_size=True), r"^`vocab_size` must be a positive int, got True\.$"),
    ],
)
def test_head_sizes_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Ideogram4PromptEnhancerHead(**kwargs)


def test_head_must_fit_the_text_encoder():
    components = tiny_components()
    components["prompt_enhancer_head"] = Ideogram4PromptEnhancerHead(hidden_size=16, vocab_size=600)
    with pytest.raises(ValueError, match=r"\(hidden_size=16, vocab_size=600\) does not fit `text_encoder` "):
        Ideogram4Pipeline(**components)


def test_decoder_shares_the_text_encoder_weights(pipe):
    decoder = CaptionDecoder(pipe.text_encoder.language_model, pipe.prompt_enhancer_head.lm_head)
    ours = dict(decoder.named_parameters())
    encoder = {f"model.{k}": v for k, v in pipe.text_encoder.language_model.named_parameters()}
    assert set(ours) == set(encoder) | {"lm_head.weight"}
    assert all(ours[name].data_ptr() == encoder[name].data_ptr() for name in encoder)
    assert ours["lm_head.weight"] is pipe.prompt_enhancer_head.lm_head.weight
    # The wrapper is no pipeline component, and it writes its attention choice into a copy of the config.
    assert "decoder" not in " ".join(pipe.components)
    assert decoder.config is not pipe.text_encoder.language_model.config


def test_decoder_is_transformers_qwen3vl_causal_lm(pipe):
    """Same logits and same greedy tokens (KV cache, final norm, head) as transformers' own Qwen3-VL causal LM
    holding the same weights."""
    from transformers import Qwen3VLForConditionalGeneration

    reference = Qwen3VLForConditionalGeneration(pipe.text_encoder.config).eval()
    reference.model.language_model.load_state_dict(pipe.text_encoder.language_model.state_dict())
    reference.lm_head.load_state_dict(pipe.prompt_enhancer_head.lm_head.state_dict())
    decoder = CaptionDecoder(pipe.text_encoder.language_model, pipe.prompt_enhancer_head.lm_head)
    ids = torch.randint(3, 400, (1, 12), generator=seeded(0))
    with torch.no_grad():
        torch.testing.assert_close(decoder(ids).logits[:, -1], reference(input_ids=ids).logits[:, -1])
        settings = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        ours = decoder.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
        theirs = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
    assert ours.tolist() == theirs.tolist()


# --------------------------------------------------------------------------------------------------------------------
# Expansion


def test_expanded_captions_are_valid_canonical_and_reproducible(shallow):
    """30 seeds over four ideas (ASCII, CJK, empty, 5,000 characters): every caption passes the checker with no
    error, is minified canonical JSON, and the same generator gives the same bytes. Across them the random head
    writes style blocks, boxes and palettes: the grammar leaves them open."""
    captions = []
    for seed in range(30):
        idea = list(IDEAS.values())[seed % len(IDEAS)]
        caption = shallow.expand_prompt(idea, generator=seeded(seed), temperature=1.0, limits=SHORT)
        assert_valid_canonical(caption)
        captions.append(caption)
    for seed in (0, 7):
        idea = list(IDEAS.values())[seed % len(IDEAS)]
        assert shallow.expand_prompt(idea, generator=seeded(seed), temperature=1.0, limits=SHORT) == captions[seed]
    assert len(set(captions)) == len(captions)
    parsed = [json.loads(caption) for caption in captions]
    elements = [e for c in parsed for e in c["compositional_deconstruction"]["elements"]]
    assert any("style_description" in c for c in parsed)
    assert any("photo" in c.get("style_description", {}) for c in parsed)
    assert any("art_style" in c.get("style_description", {}) for c in parsed)
    assert any("bbox" in e for e in elements) and any("color_palette" in e for e in elements)
    assert {e["type"] for e in elements} == {"obj", "text"}


def test_default_limits_end_within_the_token_budget(shallow):
    caption = shallow.expand_prompt(IDEAS["ascii"], generator=seeded(0), temperature=1.0)
    assert_valid_canonical(caption)
    assert len(caption) > 4 * max(SHORT.string_chars().values())  # the random head writes long strings


def test_a_list_of_ideas_with_one_generator_each(shallow):
    ideas = [IDEAS["ascii"], IDEAS["cjk"]]
    both = shallow.expand_prompt(ideas, generator=[seeded(1), seeded(2)], limits=SHORT)
    assert both == [
        shallow.expand_prompt(ideas[0], generator=seeded(1), limits=SHORT),
        shallow.expand_prompt(ideas[1], generator=seeded(2), limits=SHORT),
    ]


def test_greedy_decoding_needs_no_generator(shallow):
    first = shallow.expand_prompt(IDEAS["ascii"], temperature=0, limits=SHORT)
    assert_valid_canonical(first)
    assert shallow.expand_prompt(IDEAS["ascii"], temperature=0, limits=SHORT) == first


def test_running_out_of_tokens_is_refused_not_truncated(shallow):
    with pytest.raises(ValueError, match=r"did not end within `max_new_tokens=5` tokens .*nothing is returned trunc"):
        shallow.expand_prompt(IDEAS["ascii"], generator=seeded(0), max_new_tokens=5)


def test_an_idea_longer_than_the_context_is_refused(shallow):
    with pytest.raises(ValueError, match=r"`prompt\[1\]` is too long to expand: .* over the language model's 32768"):
        shallow.expand_prompt(["x", "夜" * 12000], generator=seeded(0), limits=SHORT)


def test_fp8_text_encoder_expands(tmp_path):
    """The fp8 release's text encoder (float8 Linears with per-row scales, dequantized per layer) decodes too."""
    from transformers import Qwen3VLModel

    from diffusers_ideogram4.fp8 import FP8Linear, linear_weight_keys, quantize_fp8_state_dict

    config = tiny_text_encoder_config()
    config.text_config.num_hidden_layers = 2
    torch.manual_seed(0)
    full = Qwen3VLModel(config)
    linears = [f"language_model.{key}" for key in linear_weight_keys(full.language_model)]
    state = quantize_fp8_state_dict({k: v.bfloat16() for k, v in full.state_dict().items()}, linears)
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**full.config.to_dict(), "ideogram_fp8_weight_only": True}))

    components = tiny_components(prompt_enhancer_head=True)
    components["text_encoder"] = Ideogram4TextEncoder.from_pretrained(folder, dtype=torch.bfloat16)
    components["prompt_enhancer_head"].to(torch.bfloat16)
    assert isinstance(components["text_encoder"].language_model.layers[0].self_attn.q_proj, FP8Linear)
    pipe = Ideogram4Pipeline(**components)
    assert_valid_canonical(pipe.expand_prompt(IDEAS["ascii"], generator=seeded(0), limits=SHORT))


# --------------------------------------------------------------------------------------------------------------------
# Errors before any model work


def fail_on_forward(pipe):
    def refuse(*args):
        raise AssertionError("the text encoder ran before the error")

    return pipe.text_encoder.register_forward_pre_hook(refuse)


def test_without_the_head_the_error_says_what_to_load():
    pipe = tiny_pipeline()
    hook = fail_on_forward(pipe)
    for call in (
        lambda: pipe.expand_prompt("a cat"),
        lambda: pipe("a cat", prompt_upsampling=True, height=256, width=256, num_inference_steps=2),
    ):
        with pytest.raises(ValueError) as error:
            call()
        message = str(error.value)
        assert message.startswith("Prompt expansion needs the optional `prompt_enhancer_head` component")
        assert f'Ideogram4PromptEnhancerHead.from_pretrained("{HEAD_REPO}"' in message
        assert "from_pretrained(repo_id, prompt_enhancer_head=head" in message
    hook.remove()


def test_without_llguidance_the_error_says_how_to_install(pipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(ImportError, match=re.escape(EXPAND_EXTRA)):
        pipe.expand_prompt("a cat")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=3), r"`prompt` must be an idea \(a string\) or a non-empty list of them, got int: '3'"),
        (dict(prompt=[]), r"`prompt` must be an idea"),
        (dict(height=100), r"`height=100` is not supported"),
        (dict(temperature=-1.0), r"`temperature` must be a finite number >= 0 \(0 decodes greedily\), got -1.0"),
        (dict(temperature=float("nan")), r"`temperature` must be a finite number >= 0"),
        (dict(temperature="hot"), r"got 'hot'"),
        (dict(max_new_tokens=0), r"`max_new_tokens` must be a positive int or None, got 0"),
        (dict(limits={"max_elements": 2}), r"`limits` must be a `CaptionLimits` or None, got dict"),
        (dict(generator=[seeded(0), seeded(1)]), r"`generator` is a list of 2 generators for 1 idea\(s\)"),
        (dict(generator=0), r"`generator` must be a torch.Generator or a list of them, got 0"),
    ],
)
def test_bad_arguments_are_refused_before_decoding(pipe, kwargs, message):
    hook = fail_on_forward(pipe)
    try:
        with pytest.raises(ValueError, match=message):
            pipe.expand_prompt(**{"prompt": "a cat", **kwargs})
    finally:
        hook.remove()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_upsampling_kwargs={"limits": SHORT}), r"`prompt_upsampling_kwargs` was given without"),
        (
            dict(prompt_upsampling=True, prompt_upsampling_kwargs={"temp": 1}),
            r"`prompt_upsampling_kwargs` must be a dict with keys among \['temperature', 'max_new_tokens', 'limits'\]",
        ),
        (dict(prompt_upsampling=True, prompt_upsampling_kwargs={"temperature": -2}), r"`temperature` must be"),
    ],
)
def test_bad_upsampling_arguments_are_refused_before_decoding(pipe, kwargs, message):
    hook = fail_on_forward(pipe)
    try:
        with pytest.raises(ValueError, match=message):
            pipe("a cat", height=256, width=256, num_inference_steps=2, **kwargs)
    finally:
        hook.remove()


def refused_before_expanding(pipe, monkeypatch, message, **kwargs):
    """The call raises `message` before `prompt_upsampling` expands the idea: the expansion (an LM decode, stubbed
    here with valid captions so that a check left after it would still raise, too late) never runs."""
    expanded = []
    monkeypatch.setattr(type(pipe), "expand_ideas", lambda self, ideas, *a, **kw: expanded.append(ideas) or [CAPTION])
    with pytest.raises(ValueError, match=message):
        pipe("a cat", height=256, width=256, prompt_upsampling=True, output_type="latent", **kwargs)
    assert expanded == []


def test_a_mag_cache_of_another_step_count_is_refused_before_expanding(monkeypatch):
    from diffusers import MagCacheConfig

    pipe = tiny_pipeline(prompt_enhancer_head=True)
    pipe.transformer.enable_cache(MagCacheConfig(mag_ratios=[1.0] * 4, num_inference_steps=4))
    message = r"^`transformer` has a MagCacheConfig\(num_inference_steps=4\), but this call runs that branch 2 times"
    refused_before_expanding(pipe, monkeypatch, message, num_inference_steps=2)


def test_an_unconditional_branch_that_cannot_mask_is_refused_before_expanding(monkeypatch):
    """The unconditional branch needs the mask whenever context parallelism pads its image-only sequence (256 image
    tokens over 3 processes); ring attention cannot apply it. (The conditional branch's need depends on the token
    counts of the expanded captions, so that check stays after the expansion.)"""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    pipe = tiny_pipeline(prompt_enhancer_head=True)
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=3))
    pipe.unconditional_transformer._parallel_config = config
    for processor in pipe.unconditional_transformer.attn_processors.values():
        processor._parallel_config = config
    message = r"^Ring attention \(`ContextParallelConfig\(ring_degree=3\)`\) cannot apply Ideogram 4's segment mask"
    refused_before_expanding(pipe, monkeypatch, message, num_inference_steps=2)


def test_a_long_idea_is_not_held_to_the_caption_length_bound(pipe, monkeypatch):
    """With `prompt_upsampling` the prompt is an idea, the user turn of the expansion (bounded by the language model's
    context, `expand_prompt`), not a caption: the caption's 2048-token length bound does not refuse it (it did)."""
    idea = ("a quiet harbour at dawn, fishing boats, gulls; " * 1300)[:60000]  # over the tiny tokenizer's 57,344 bound
    expanded = []
    monkeypatch.setattr(type(pipe), "expand_ideas", lambda self, ideas, *a, **kw: expanded.append(ideas) or [CAPTION])
    output = pipe(idea, prompt_upsampling=True, generator=seeded(0), **CALL)
    assert expanded == [[idea]] and output.captions == [CAPTION]
    with pytest.raises(ValueError, match=r"^`prompt` is too long: prompt\[0\] has 60,000 characters"):
        pipe(idea, **CALL)


# --------------------------------------------------------------------------------------------------------------------
# In the pipeline


CALL = dict(height=256, width=256, num_inference_steps=2, output_type="latent")
UPSAMPLING = dict(prompt_upsampling=True, prompt_upsampling_kwargs={"limits": SHORT}, **CALL)


@pytest.fixture(scope="module")
def upsampled(pipe):
    """(latents, captions) of one call with prompt_upsampling=True, without offload."""
    return pipe(IDEAS["ascii"], generator=seeded(1), return_dict=False, **UPSAMPLING)


def test_prompt_upsampling_equals_expanding_then_generating(pipe, upsampled):
    latents, captions = upsampled
    caption = pipe.expand_prompt(IDEAS["ascii"], height=256, width=256, generator=seeded(1), limits=SHORT)
    assert captions == [caption]
    direct = pipe(caption, generator=seeded(1), **CALL)
    assert direct.captions is None and len(direct.to_tuple()) == 1
    torch.testing.assert_close(latents, direct.images, rtol=0, atol=0)


def test_model_offload_expands_then_generates(upsampled):
    """Under enable_model_cpu_offload the decoding runs with the text encoder onloaded through its own hook (which
    sends the other components back) and the head beside it; the head goes back before the text encoder encodes
    the caption. Results are those of the pipeline without offload."""
    from accelerate.hooks import CpuOffload

    pipe = tiny_pipeline(seed=0, prompt_enhancer_head=True)
    pipe.enable_model_cpu_offload(device="cpu")
    events = []
    encoder_hook, head_hook = pipe.text_encoder._hf_hook, pipe.prompt_enhancer_head._hf_hook
    assert isinstance(encoder_hook, CpuOffload) and isinstance(head_hook, CpuOffload)
    onload, offload = encoder_hook.pre_forward, head_hook.init_hook
    encoder_hook.pre_forward = lambda module, *a, **k: events.append("onload text_encoder") or onload(module, *a, **k)
    head_hook.init_hook = lambda module: events.append("offload head") or offload(module)
    decode = CaptionDecoder.forward

    def forward(self, *args, **kwargs):
        if events[-1] != "decode":
            events.append("decode")
        return decode(self, *args, **kwargs)

    CaptionDecoder.forward = forward
    try:
        latents, captions = pipe(IDEAS["ascii"], generator=seeded(1), return_dict=False, **UPSAMPLING)
    finally:
        CaptionDecoder.forward = decode
    assert captions == upsampled[1]
    torch.testing.assert_close(latents, upsampled[0], rtol=0, atol=0)
    assert events[:4] == ["onload text_encoder", "decode", "offload head", "onload text_encoder"]


def test_save_and_load_with_the_head(shallow, tmp_path):
    shallow.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["prompt_enhancer_head"] == ["diffusers", "Ideogram4PromptEnhancerHead"]
    loaded = Ideogram4Pipeline.from_pretrained(tmp_path / "pipe")
    assert type(loaded.prompt_enhancer_head) is Ideogram4PromptEnhancerHead
    torch.testing.assert_close(
        loaded.prompt_enhancer_head.lm_head.weight, shallow.prompt_enhancer_head.lm_head.weight, rtol=0, atol=0
    )
    # What `ideogram4 caption expand` loads: the text encoder, the tokenizer and the head, no transformer nor VAE.
    head = Ideogram4PromptEnhancerHead.from_pretrained(tmp_path / "pipe" / "prompt_enhancer_head")
    only = Ideogram4Pipeline.from_pretrained(
        tmp_path / "pipe", transformer=None, unconditional_transformer=None, vae=None, prompt_enhancer_head=head
    )
    assert only.transformer is None and only.vae is None
    expected = shallow.expand_prompt(IDEAS["ascii"], generator=seeded(0), limits=SHORT)
    assert only.expand_prompt(IDEAS["ascii"], generator=seeded(0), limits=SHORT) == expected
    # A folder saved without the head loads without it.
    tiny_pipeline(seed=1).save_pretrained(tmp_path / "plain")
    assert Ideogram4Pipeline.from_pretrained(tmp_path / "plain").prompt_enhancer_head is None


def test_tiny_prompt_enhancer_head_is_seeded():
    torch.testing.assert_close(
        tiny_prompt_enhancer_head(4).lm_head.weight, tiny_prompt_enhancer_head(4).lm_head.weight
    )
