"""Transformer: parity with diffusers' built-in model, both checkpoint layouts, strict loading."""

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import needs_peer
from diffusers_ideogram4 import CheckpointMismatchError, Ideogram4Transformer2DModel
from diffusers_ideogram4.constants import TRANSFORMER_SIZES
from diffusers_ideogram4.layout import pack_layout
from diffusers_ideogram4.loading import diffusers_to_original, original_key_plan, original_to_diffusers
from diffusers_ideogram4.testing import tiny_transformer


CONFIG = TRANSFORMER_SIZES["tiny"]


def packed_inputs(text_lengths=(5, 3), grid=(3, 4), seed=0):
    generator = torch.Generator().manual_seed(seed)
    layout = pack_layout(list(text_lengths), *grid)
    batch, length = layout.indicator.shape
    return dict(
        hidden_states=torch.randn(batch, length, CONFIG["in_channels"], generator=generator),
        timestep=torch.tensor([0.3, 0.71][:batch]),
        encoder_hidden_states=torch.randn(batch, length, CONFIG["llm_features_dim"], generator=generator),
        position_ids=layout.position_ids,
        segment_ids=layout.segment_ids,
        indicator=layout.indicator,
    )


def peer_transformer(state_dict):
    from diffusers import Ideogram4Transformer2DModel as PeerTransformer

    peer = PeerTransformer(**CONFIG).eval()
    peer.load_state_dict(state_dict, strict=True)
    return peer


def image_velocity(model, inputs):
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return out[inputs["indicator"] == 2]


@needs_peer
@pytest.mark.parametrize("text_lengths", [(5, 3), (4, 4)])
def test_forward_matches_diffusers_builtin(text_lengths):
    ours = tiny_transformer(seed=3)
    inputs = packed_inputs(text_lengths)
    if inputs["segment_ids"] is None:  # the peer always needs segment ids
        inputs["segment_ids"] = torch.zeros_like(inputs["indicator"])
    expected = image_velocity(peer_transformer(ours.state_dict()), inputs)
    torch.testing.assert_close(image_velocity(ours, inputs), expected, rtol=1e-5, atol=1e-5)


def test_text_prefix_and_no_text_inputs_give_the_same_velocity():
    model = tiny_transformer(seed=4)
    inputs = packed_inputs((5, 3))
    full = image_velocity(model, inputs)
    num_text = 5
    prefix = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"][:, :num_text])
    torch.testing.assert_close(image_velocity(model, prefix), full, rtol=1e-6, atol=1e-6)
    # Without any text token the text features cannot matter: None equals zeros.
    image_only = dict(inputs, indicator=torch.where(inputs["indicator"] == 3, 0, inputs["indicator"]))
    torch.testing.assert_close(
        image_velocity(model, dict(image_only, encoder_hidden_states=None)), image_velocity(model, image_only)
    )


def save_checkpoint(folder, state_dict, config=CONFIG, name="diffusion_pytorch_model.safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / name))
    (folder / "config.json").write_text(json.dumps({"_class_name": "Ideogram4Transformer2DModel", **config}))
    return folder


def test_diffusers_layout_round_trip(tmp_path):
    model = tiny_transformer(seed=5)
    model.save_pretrained(tmp_path / "t")
    loaded = Ideogram4Transformer2DModel.from_pretrained(tmp_path / "t")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@needs_peer
def test_original_fused_layout_loads_and_matches_builtin(tmp_path):
    model = tiny_transformer(seed=6)
    original = diffusers_to_original(model.state_dict())
    assert "layers.0.attention.qkv.weight" in original and "layers.0.attention.to_q.weight" not in original
    folder = save_checkpoint(tmp_path / "orig", original, name="model.safetensors")
    loaded = Ideogram4Transformer2DModel.from_pretrained(folder)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    inputs = packed_inputs()
    torch.testing.assert_close(
        image_velocity(loaded, inputs),
        image_velocity(peer_transformer(model.state_dict()), inputs),
        rtol=1e-5,
        atol=1e-5,
    )


def test_sharded_original_layout(tmp_path):
    model = tiny_transformer(seed=7)
    original = diffusers_to_original(model.state_dict())
    keys = sorted(original)
    folder = tmp_path / "sharded"
    folder.mkdir()
    weight_map = {}
    for shard, chunk in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-{shard + 1:05d}-of-00002.safetensors"
        save_file({k: original[k].contiguous() for k in chunk}, str(folder / name))
        weight_map.update(dict.fromkeys(chunk, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    loaded = Ideogram4Transformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.layers[1].attention.to_v.weight, model.layers[1].attention.to_v.weight.bfloat16())


def test_layout_conversion_is_lossless():
    state = tiny_transformer(seed=8).state_dict()
    back = original_to_diffusers(diffusers_to_original(state))
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda sd: sd.pop("layers.1.feed_forward.w2.weight"), r"missing keys: layers\.1\.feed_forward\.w2\.weight"),
        (
            lambda sd: sd.update({"layers.0.attention.extra.weight": torch.zeros(2)}),
            r"unexpected keys: layers\.0\.attention\.extra\.weight",
        ),
        (
            lambda sd: sd.update({"input_proj.bias": torch.zeros(7)}),
            r"mis-shaped keys: input_proj\.bias \(checkpoint \[7\], model \[128\]\)",
        ),
        (lambda sd: sd.pop("layers.0.attention.to_k.weight"), r"missing keys: layers\.0\.attention\.to_k\.weight"),
    ],
    ids=["missing", "unexpected", "wrong-shape", "missing-split-part"],
)
def test_strict_loading_names_the_bad_key(tmp_path, corrupt, message):
    state = dict(tiny_transformer(seed=9).state_dict())
    corrupt(state)
    folder = save_checkpoint(tmp_path / "bad", state)
    with pytest.raises(CheckpointMismatchError, match=message):
        Ideogram4Transformer2DModel.from_pretrained(folder)


def test_a_checkpoint_with_both_layouts_of_a_layer_is_refused(tmp_path):
    """Fused qkv plus a split to_q for the same layer: one of them would silently win."""
    original = diffusers_to_original(tiny_transformer(seed=9).state_dict())
    original["layers.0.attention.to_q.weight"] = torch.zeros(128, 128)
    folder = save_checkpoint(tmp_path / "both", original)
    with pytest.raises(CheckpointMismatchError, match=r"`layers\.0\.attention\.to_q\.weight` is given twice"):
        Ideogram4Transformer2DModel.from_pretrained(folder)


def test_fused_qkv_rows_are_q_then_k_then_v():
    """SPEC 2.1: `attention.qkv.weight` rows are [q; k; v], contiguous thirds."""
    q, k, v = (torch.full((4, 2), float(i)) for i in range(3))
    plan = original_key_plan("layers.3.attention.qkv.weight", (12, 2))
    fused = torch.cat((q, k, v))
    assert [key for key, _ in plan] == [f"layers.3.attention.to_{name}.weight" for name in "qkv"]
    for key, rows in plan:
        expected = {"to_q": q, "to_k": k, "to_v": v}[key.split(".")[-2]]
        assert torch.equal(fused[rows], expected), key
    assert original_key_plan("layers.3.attention.o.weight", (4, 4)) == [("layers.3.attention.to_out.0.weight", None)]


def test_float32_timesteps_are_used_in_the_compute_dtype():
    """The pipeline passes float32 model times; a bf16 model embeds them as bf16 (as the reference does)."""
    model = tiny_transformer(seed=4).to(torch.bfloat16)
    inputs = {
        k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in packed_inputs().items()
    }
    float32_times = {**inputs, "timestep": torch.tensor([0.3, 0.71])}
    bf16_times = {**inputs, "timestep": torch.tensor([0.3, 0.71]).bfloat16()}
    assert torch.equal(image_velocity(model, float32_times), image_velocity(model, bf16_times))


def test_fused_qkv_with_wrong_row_count_is_refused(tmp_path):
    original = diffusers_to_original(tiny_transformer(seed=9).state_dict())
    original["layers.0.attention.qkv.weight"] = original["layers.0.attention.qkv.weight"][:-1]
    folder = save_checkpoint(tmp_path / "badqkv", original)
    with pytest.raises(CheckpointMismatchError, match=r"`layers\.0\.attention\.qkv\.weight` has shape \[383, 128\]"):
        Ideogram4Transformer2DModel.from_pretrained(folder)


def test_unknown_from_pretrained_argument_is_refused(tmp_path):
    folder = save_checkpoint(tmp_path / "ok", tiny_transformer().state_dict())
    with pytest.raises(TypeError, match=r"unexpected arguments: \['torch_dtyp'\]"):
        Ideogram4Transformer2DModel.from_pretrained(folder, torch_dtyp=torch.float16)


def test_config_rejects_impossible_mrope_section():
    with pytest.raises(ValueError, match=r"`mrope_section` \(24, 20, 20\) does not fit `attention_head_dim` 64"):
        Ideogram4Transformer2DModel(**dict(CONFIG, mrope_section=(24, 20, 20)))


def test_attention_kwargs_only_accept_scale():
    model = tiny_transformer()
    with pytest.raises(ValueError, match=r"`attention_kwargs` has unsupported keys \['foo'\]"):
        model(**packed_inputs(), attention_kwargs={"foo": 1})


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = packed_inputs()
    grads = []
    for checkpointing in (False, True):
        model = tiny_transformer(seed=10).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(**inputs).sample.square().mean().backward()
        grads.append(model.layers[0].attention.to_q.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_mrope_angles_keep_float32_precision_near_65536_under_autocast():
    """Image positions sit near 65536, where bfloat16 cannot tell neighbouring integers apart. Under bf16 autocast
    the angles still match float64 math to float32 precision (an angle computed through a matmul, which CPU autocast
    runs in bfloat16, would be off by whole radians)."""
    model = tiny_transformer()
    positions = pack_layout([3], 4, 4).position_ids
    assert positions.max() > 60000
    rotary = model.rotary_emb
    angles = positions.double()[..., rotary.axis_of_slot] * rotary.inv_freq(positions.device).double()
    angles = torch.cat((angles, angles), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = rotary(positions)
    assert cos.dtype == sin.dtype == torch.float32
    # float32 spacing at 65536 is 2 ** -7: the angle is exact to half of that, and so are cos and sin
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=2**-8)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=2**-8)
    # the same in bfloat16 (spacing 256 there) is far off: the check above can tell the two apart
    coarse = angles.to(torch.bfloat16).double()
    assert (coarse.cos() - angles.cos()).abs().max() > 0.5


def test_rotary_frequencies_survive_a_cast_to_bfloat16():
    """A float buffer would be rounded by `model.to(torch.bfloat16)` (diffusers' built-in model loses RoPE precision
    that way); ours computes the frequencies in float32 at every call."""
    model = tiny_transformer()
    positions = pack_layout([3], 4, 4).position_ids
    reference = model.rotary_emb(positions)
    cast = model.to(torch.bfloat16).rotary_emb(positions)
    torch.testing.assert_close(cast[0], reference[0], rtol=0, atol=0)


def test_device_map_load_goes_through_diffusers_and_stays_strict(tmp_path):
    """A device map (or a quantization config) is handled by diffusers' own loader; the keys are still checked
    first, and the fused layout is refused there with a pointer to the converter."""
    model = tiny_transformer(seed=11)
    model.save_pretrained(tmp_path / "ok")
    loaded, info = Ideogram4Transformer2DModel.from_pretrained(
        tmp_path / "ok", device_map={"": "cpu"}, output_loading_info=True
    )
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())

    state = dict(model.state_dict())
    state.pop("final_layer.linear.bias")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: final_layer\.linear\.bias"):
        Ideogram4Transformer2DModel.from_pretrained(save_checkpoint(tmp_path / "bad", state), device_map={"": "cpu"})
    fused = save_checkpoint(tmp_path / "fused", diffusers_to_original(model.state_dict()))
    with pytest.raises(ValueError, match=r"original fused-attention layout.*convert_ideogram4_to_diffusers\.py"):
        Ideogram4Transformer2DModel.from_pretrained(fused, device_map={"": "cpu"})


@needs_peer
def test_bfloat16_forward_equals_diffusers_builtin_bit_for_bit():
    """In bf16 our forward is bit-identical to the built-in model's, once the built-in model's rotary buffer is
    given back its float32 values (`.to(torch.bfloat16)` rounds it; ours has no such buffer)."""
    ours = tiny_transformer(seed=12)
    peer = peer_transformer(ours.state_dict())
    inv_freq = peer.rotary_emb.inv_freq.clone()
    ours, peer = ours.to(torch.bfloat16), peer.to(torch.bfloat16)
    assert peer.rotary_emb.inv_freq.dtype == torch.bfloat16
    peer.rotary_emb.inv_freq = inv_freq
    inputs = {
        k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in packed_inputs().items()
    }
    assert torch.equal(image_velocity(ours, inputs), image_velocity(peer, inputs))
