"""The fp8 release format: loading (split and fused), parity with the dequantized model, refusal of broken files."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import save_file

from diffusers_ideogram4 import CheckpointMismatchError, Ideogram4Transformer2DModel
from diffusers_ideogram4.constants import TRANSFORMER_SIZES
from diffusers_ideogram4.fp8 import (
    FP8_DTYPE,
    FP8Linear,
    dequantize_fp8_state_dict,
    linear_weight_keys,
    quantize_fp8_state_dict,
    set_fp8_matmul,
    weight_bytes,
)
from diffusers_ideogram4.loading import diffusers_to_original
from diffusers_ideogram4.testing import tiny_transformer
from test_transformer import image_velocity, packed_inputs


def fp8_release(seed=0):
    """A tiny transformer in the fp8 release format: every Linear weight float8 with a float32 row scale, the rest
    in bf16."""
    model = tiny_transformer(seed=seed)
    state = {k: v.bfloat16() for k, v in model.state_dict().items()}
    return quantize_fp8_state_dict(state, linear_weight_keys(model))


def write(folder, state):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(TRANSFORMER_SIZES["tiny"]))
    return folder


def test_fp8_format_counts_one_scale_per_linear():
    state = fp8_release()
    scales = [k for k in state if k.endswith(".weight_scale")]
    # 8 Linears per block (q, k, v, out, w1, w2, w3, modulation) + 7 global ones; fused, 6 per block: with 34 blocks
    # that is the release's 34 * 6 + 7 = 211.
    assert len(scales) == len(linear_weight_keys(tiny_transformer())) == 8 * 2 + 7
    assert len([k for k in diffusers_to_original(state) if k.endswith(".weight_scale")]) == 6 * 2 + 7
    assert state["layers.0.attention.to_q.weight"].dtype == FP8_DTYPE
    assert state["layers.0.attention.to_q.weight_scale"].dtype == torch.float32


def test_computed_weight_bytes_equal_the_stored_tensors():
    """The sizes `bench_memory.py --weights-only` prints for the full model, checked on the tiny one."""
    model = tiny_transformer()
    assert weight_bytes(model, "fp8") == sum(t.nbytes for t in fp8_release().values())
    assert weight_bytes(model, "bf16") == sum(t.nbytes for t in model.bfloat16().state_dict().values())


def test_dtype_cast_moves_fp8_layers_without_touching_the_stored_format(tmp_path):
    state = fp8_release(seed=2)
    model = Ideogram4Transformer2DModel.from_pretrained(write(tmp_path / "f", state), dtype=torch.float32)
    model.to(torch.bfloat16)
    stored = model.state_dict()
    kept = [k for k in state if k in linear_weight_keys(model) or k.endswith("_scale")]
    assert len(kept) == 2 * len(linear_weight_keys(model))
    for key in kept:  # bit for bit, in the stored dtype
        assert stored[key].dtype == state[key].dtype
        assert torch.equal(stored[key].view(torch.uint8), state[key].view(torch.uint8)), key
    assert stored["layers.0.attention.to_q.weight"].dtype == FP8_DTYPE
    assert stored["layers.0.attention.to_q.weight_scale"].dtype == torch.float32
    assert stored["layers.0.attention_norm1.weight"].dtype == torch.bfloat16


def test_fp8_linear_dequantizes_like_the_reference():
    """SPEC 2.2: the scale is cast to the compute dtype first, then W = fp8 * scale, then a plain linear."""
    weight, scale = quantize_fp8_state_dict({"w": torch.randn(6, 8)}, ["w"]).values()
    layer = FP8Linear(8, 6, bias=True).to(torch.bfloat16)
    layer.weight.data, layer.weight_scale.data = weight, scale
    layer.bias.data = torch.randn(6).bfloat16()
    x = torch.randn(3, 8).bfloat16()
    expected = torch.nn.functional.linear(x, weight.to(torch.bfloat16) * scale.to(torch.bfloat16)[:, None], layer.bias)
    assert torch.equal(layer(x), expected)


def test_fp8_model_reports_its_compute_dtype(tmp_path):
    model = Ideogram4Transformer2DModel.from_pretrained(write(tmp_path / "f", fp8_release()), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == FP8_DTYPE  # what diffusers' `dtype` would have reported
    assert model.dtype == torch.bfloat16


def test_sequential_offload_streams_fp8_weights(tmp_path):
    """diffusers' enable_sequential_cpu_offload calls accelerate's cpu_offload with offload_buffers=False for models
    without root parameters: buffers would stay on the accelerator, so the fp8 weights are parameters."""
    from accelerate import cpu_offload

    folder = write(tmp_path / "f", fp8_release(seed=3))
    model = Ideogram4Transformer2DModel.from_pretrained(folder, dtype=torch.bfloat16)
    inputs = {k: v.bfloat16() if v is not None and v.is_floating_point() else v for k, v in packed_inputs().items()}
    expected = image_velocity(model, inputs)
    cpu_offload(model, torch.device("cpu"), offload_buffers=len(model._parameters) > 0)
    assert model.layers[0].attention.to_q.weight.device.type == "meta"  # streamed in at each call, not resident
    assert model.layers[0].attention.to_q.weight_scale.device.type == "meta"
    torch.testing.assert_close(image_velocity(model, inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["split", "fused"])
def test_fp8_checkpoint_equals_bf16_model_on_dequantized_weights(tmp_path, layout):
    state = fp8_release(seed=1)
    folder = write(tmp_path / layout, state if layout == "split" else diffusers_to_original(state))
    model = Ideogram4Transformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert isinstance(model.layers[0].attention.to_q, FP8Linear)
    assert model.dtype == torch.bfloat16
    assert model.layers[1].feed_forward.w2.weight.dtype == FP8_DTYPE

    reference = Ideogram4Transformer2DModel(**TRANSFORMER_SIZES["tiny"]).to(torch.bfloat16).eval()
    reference.load_state_dict(dequantize_fp8_state_dict(state, torch.bfloat16))
    inputs = {
        k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v
        for k, v in packed_inputs().items()
    }
    torch.testing.assert_close(image_velocity(model, inputs), image_velocity(reference, inputs), rtol=0, atol=0)


def test_fp8_model_saves_back_to_the_release_format(tmp_path):
    state = fp8_release(seed=2)
    model = Ideogram4Transformer2DModel.from_pretrained(write(tmp_path / "a", state), torch_dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "b")
    again = Ideogram4Transformer2DModel.from_pretrained(tmp_path / "b", torch_dtype=torch.bfloat16)
    for key, value in state.items():
        assert torch.equal(again.state_dict()[key].view(torch.uint8), value.view(torch.uint8)), key


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (
            lambda s: s.pop("layers.0.feed_forward.w1.weight_scale"),
            r"float8 weights without their `\.weight_scale`: layers\.0\.feed_forward\.w1\.weight",
        ),
        (
            lambda s: s.update({"input_proj.weight_scale": torch.ones(5)}),
            r"mis-shaped keys: input_proj\.weight_scale \(checkpoint \[5\], model \[128\]\)",
        ),
        (
            lambda s: s.update({"layers.1.attention_norm1.weight_scale": torch.ones(128)}),
            r"`\.weight_scale` tensors without a float8 weight: layers\.1\.attention_norm1\.weight_scale",
        ),
        # Weights and scales only in the release's dtypes.
        (
            lambda s: s.update({"input_proj.weight_scale": s["input_proj.weight_scale"].half()}),
            r"input_proj\.weight_scale \(F16, not F32\)",
        ),
        (
            lambda s: s.update({"input_proj.weight_scale": torch.ones(128, dtype=torch.int32)}),
            r"input_proj\.weight_scale \(I32, not F32\)",
        ),
        (
            lambda s: s.update({"input_proj.weight": s["input_proj.weight"].float().to(torch.float8_e5m2)}),
            r"input_proj\.weight \(F8_E5M2, not F8_E4M3\)",
        ),
    ],
    ids=["scale-missing", "scale-wrong-shape", "scale-on-a-norm", "f16-scale", "int-scale", "e5m2-weight"],
)
def test_corrupted_fp8_checkpoint_is_refused_by_name(tmp_path, corrupt, message):
    state = fp8_release(seed=3)
    corrupt(state)
    with pytest.raises(CheckpointMismatchError, match=message):
        Ideogram4Transformer2DModel.from_pretrained(write(tmp_path / "bad", state))


def test_fused_fp8_scale_with_wrong_rows_is_refused(tmp_path):
    state = diffusers_to_original(fp8_release(seed=4))
    state["layers.0.attention.qkv.weight_scale"] = state["layers.0.attention.qkv.weight_scale"][:-2]
    with pytest.raises(CheckpointMismatchError, match=r"`layers\.0\.attention\.qkv\.weight_scale` has shape \[382\]"):
        Ideogram4Transformer2DModel.from_pretrained(write(tmp_path / "bad", state))


def test_fp8_matmul_path_is_close_to_weight_only(tmp_path):
    model = Ideogram4Transformer2DModel.from_pretrained(
        write(tmp_path / "m", fp8_release(seed=5)), torch_dtype=torch.bfloat16
    )
    inputs = {
        k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v
        for k, v in packed_inputs().items()
    }
    weight_only = image_velocity(model, inputs).float()
    assert set_fp8_matmul(model, True) == 23
    fast = image_velocity(model, inputs).float()
    relative = ((fast - weight_only).norm() / weight_only.norm()).item()
    assert 0 < relative < 0.1  # activations are rounded to fp8 too: close, not equal
    set_fp8_matmul(model, False)
    torch.testing.assert_close(image_velocity(model, inputs).float(), weight_only, rtol=0, atol=0)


def test_fp8_matmul_needs_fp8_layers():
    with pytest.raises(ValueError, match="this model has no fp8 layers"):
        set_fp8_matmul(tiny_transformer(), True)


def fp8_text_encoder_folder(tmp_path, corrupt=None):
    """A full Qwen3-VL checkpoint (vision tower included) with every language-model Linear in fp8."""
    from transformers import Qwen3VLModel

    from diffusers_ideogram4.testing import tiny_text_encoder_config

    torch.manual_seed(0)
    full = Qwen3VLModel(tiny_text_encoder_config())
    linears = [f"language_model.{k}" for k in linear_weight_keys(full.language_model)]
    state = quantize_fp8_state_dict({k: v.bfloat16() for k, v in full.state_dict().items()}, linears)
    if corrupt:
        corrupt(state)
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    config = full.config.to_dict()
    config["ideogram_fp8_weight_only"] = True
    (folder / "config.json").write_text(json.dumps(config))
    return folder, state


def test_fp8_text_encoder_equals_dequantized_model(tmp_path):
    from diffusers_ideogram4 import Ideogram4TextEncoder

    folder, state = fp8_text_encoder_folder(tmp_path)
    encoder = Ideogram4TextEncoder.from_pretrained(folder, dtype=torch.bfloat16)
    assert isinstance(encoder.language_model.layers[0].mlp.up_proj, FP8Linear)
    assert not any(name.startswith("visual") for name in encoder.state_dict())

    reference = Ideogram4TextEncoder(encoder.config).to(torch.bfloat16).eval()
    language = {k: v for k, v in dequantize_fp8_state_dict(state, torch.bfloat16).items() if k.startswith("language")}
    reference.load_state_dict(language)
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids), reference(ids), rtol=0, atol=0)


def test_fp8_text_encoder_missing_scale_is_refused(tmp_path):
    from diffusers_ideogram4 import Ideogram4TextEncoder

    folder, _ = fp8_text_encoder_folder(
        tmp_path, corrupt=lambda s: s.pop("language_model.layers.3.self_attn.q_proj.weight_scale")
    )
    with pytest.raises(
        CheckpointMismatchError,
        match=r"without their `\.weight_scale`: language_model\.layers\.3\.self_attn\.q_proj\.weight",
    ):
        Ideogram4TextEncoder.from_pretrained(folder)


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is not None, reason="checks the host's refusal without bitsandbytes"
)
def test_nf4_checkpoint_goes_to_the_host_quantizer(tmp_path):
    """A pre-quantized bitsandbytes checkpoint is diffusers' to load (and to refuse where it cannot run)."""
    folder = write(tmp_path / "nf4", {k: v for k, v in tiny_transformer().state_dict().items()})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
    }
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ImportError, match="bitsandbytes"):
        Ideogram4Transformer2DModel.from_pretrained(folder)
