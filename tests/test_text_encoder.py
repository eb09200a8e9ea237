"""Text encoder wrapper: tapped, interleaved, raw layer outputs; strict loading; no vision tower in memory."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3VLModel

from conftest import CAPTION
from diffusers_ideogram4 import CheckpointMismatchError, Ideogram4TextEncoder, count_caption_tokens
from diffusers_ideogram4.constants import TEXT_ENCODER_TAP_LAYERS
from diffusers_ideogram4.testing import tiny_text_encoder, tiny_text_encoder_config, tiny_tokenizer


@pytest.fixture(scope="module")
def full_qwen3vl(tmp_path_factory):
    torch.manual_seed(0)
    model = Qwen3VLModel(tiny_text_encoder_config()).eval()
    folder = tmp_path_factory.mktemp("qwen3vl")
    model.save_pretrained(folder)
    return model, folder


def test_features_are_interleaved_raw_layer_outputs(full_qwen3vl):
    reference, folder = full_qwen3vl
    encoder = Ideogram4TextEncoder.from_pretrained(folder).eval()
    input_ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = encoder(input_ids)
        captured = {}
        hooks = [
            reference.language_model.layers[i].register_forward_hook(
                lambda module, args, output, i=i: captured.__setitem__(i, output)
            )
            for i in TEXT_ENCODER_TAP_LAYERS
        ]
        reference.language_model(input_ids=input_ids)
        for hook in hooks:
            hook.remove()
    hidden = reference.config.text_config.hidden_size
    assert features.dtype == torch.float32 and features.shape == (1, 9, hidden * 13)
    for k, layer in enumerate(TEXT_ENCODER_TAP_LAYERS):
        # feature d of tap k sits at index d * 13 + k
        torch.testing.assert_close(features[..., k::13], captured[layer], rtol=1e-6, atol=1e-6)


def test_vision_tower_is_not_loaded(full_qwen3vl):
    _, folder = full_qwen3vl
    encoder = Ideogram4TextEncoder.from_pretrained(folder)
    assert not any(name.startswith("visual") for name, _ in encoder.named_parameters())
    assert sum(p.numel() for p in encoder.parameters()) == sum(
        p.numel() for p in full_qwen3vl[0].language_model.parameters()
    )


def test_right_padding_equals_the_unpadded_prompt():
    encoder = tiny_text_encoder()
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        batch = encoder(ids, mask)
        alone = encoder(ids[1:, :5])
    torch.testing.assert_close(batch[1, :5], alone[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(batch[1, 5:], torch.zeros_like(batch[1, 5:]))
    with pytest.raises(ValueError, match="must be right-padded"):
        encoder(ids, mask.flip(1))


def test_missing_language_model_weight_is_refused(full_qwen3vl, tmp_path):
    _, folder = full_qwen3vl
    state = load_file(str(folder / "model.safetensors"))
    state.pop("language_model.layers.7.mlp.up_proj.weight")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        CheckpointMismatchError,
        match=r"does not match the model; it was not used\. Expected a Qwen3-VL "
        r"checkpoint .*\n  - missing keys: language_model\.layers\.7\.mlp\.up_proj\.weight$",
    ):
        Ideogram4TextEncoder.from_pretrained(tmp_path)


def test_tap_layers_are_the_released_ones():
    assert TEXT_ENCODER_TAP_LAYERS == (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 35)  # SPEC 3, written out


def test_features_are_float32_whatever_the_encoder_dtype():
    encoder = tiny_text_encoder().to(torch.bfloat16)
    features = encoder(torch.tensor([[1, 2, 3]]))
    assert features.dtype == torch.float32 and features.shape == (1, 3, 13 * 16)


def test_the_token_limit_is_inclusive():
    from diffusers_ideogram4.text_encoder import check_token_counts

    check_token_counts([[0] * 2048, [0] * 5])  # exactly 2048 is allowed
    with pytest.raises(ValueError, match=r"prompt\[1\] has 2049 tokens, over the limit of 2048"):
        check_token_counts([[0] * 5, [0] * 2049])


def test_count_caption_tokens_uses_the_chat_template():
    tokenizer = tiny_tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": CAPTION}]}], add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<|im_start|>user\n" + CAPTION) and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert count_caption_tokens(CAPTION, tokenizer) == len(tokenizer(text, add_special_tokens=False)["input_ids"])
