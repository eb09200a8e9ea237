"""GGUF single files through diffusers' GGUF support: every supported quantization type against the same model on
the weights gguf-py dequantizes, each type's error budget against the unquantized model, bf16 compute, refusal by
name of unsupported types and broken files before any tensor is read."""

import gguf
import numpy as np
import pytest
import torch

from diffusers_ideogram4 import CheckpointMismatchError, Ideogram4Transformer2DModel
from single_file_formats import CONFIG, gguf_file, original_state, write_gguf
from test_transformer import image_velocity, packed_inputs


TYPES = gguf.GGMLQuantizationType
# diffusers' dequantizers return float16 (then cast to the compute dtype): against a model on gguf-py's exact float32
# dequantization the velocity differs by that rounding, 2^-11 of a weight at most (measured: 0 for F16 / BF16, at
# most 6.3e-4 relative L2 for the block types).
FLOAT16_ROUNDING = 1e-3
# Quantization error of the velocity against the unquantized float32 model (relative L2, tiny model, weights
# N(0, 0.05^2), seed 0, measured 2026-12-02): F16 4.1e-4, BF16 2.2e-3, Q8_0 6.7e-3, Q5_1 0.048, Q5_0 0.053, Q4_1 0.098,
# Q4_0 0.111; asserted with some room.
BUDGET = {"F16": 1e-3, "BF16": 5e-3, "Q8_0": 0.015, "Q5_1": 0.08, "Q5_0": 0.08, "Q4_1": 0.15, "Q4_0": 0.15}
# gguf-py cannot quantize these; their test files hold random valid blocks on `feed_forward.w2` (256 inputs, one
# 256-wide super-block per row), the other Linears in F32, compared with gguf-py's dequantization.
RANDOM_BLOCK_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
W2 = ["layers.0.feed_forward.w2.weight", "layers.1.feed_forward.w2.weight"]


def relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def reference(state, dtype=torch.float32):
    model = Ideogram4Transformer2DModel(**CONFIG).to(dtype).eval()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("type_name", list(BUDGET))
def test_gguf_equals_the_model_on_dequantized_weights(tmp_path, type_name):
    path, dequantized, original = gguf_file(tmp_path / f"ideogram4-{type_name}.gguf", TYPES[type_name])
    loaded = Ideogram4Transformer2DModel.from_single_file(path, config="tiny")
    quantized_linear = type(loaded.layers[0].attention.to_k).__name__
    assert quantized_linear == ("Linear" if type_name == "F16" else "GGUFLinear")
    velocity = image_velocity(loaded, packed_inputs())
    error = relative(velocity, image_velocity(reference(dequantized), packed_inputs()))
    assert error < FLOAT16_ROUNDING
    if type_name in ("F16", "BF16"):
        assert error == 0
    assert relative(velocity, image_velocity(original, packed_inputs())) < BUDGET[type_name]


@pytest.mark.parametrize("type_name", RANDOM_BLOCK_TYPES)
def test_gguf_random_block_types_equal_the_model_on_dequantized_weights(tmp_path, type_name):
    path, dequantized, _ = gguf_file(tmp_path / f"{type_name}.gguf", TYPES[type_name], k_quant_keys=W2)
    loaded = Ideogram4Transformer2DModel.from_single_file(path, config="tiny")
    assert loaded.layers[1].feed_forward.w2.weight.quant_type == TYPES[type_name]
    velocity = image_velocity(loaded, packed_inputs())
    assert relative(velocity, image_velocity(reference(dequantized), packed_inputs())) < FLOAT16_ROUNDING


def test_gguf_with_prefix_in_bfloat16_and_its_quantization_config(tmp_path):
    from diffusers import GGUFQuantizationConfig

    path, dequantized, _ = gguf_file(tmp_path / "q8.gguf", TYPES.Q8_0, prefix="model.diffusion_model.")
    inputs = {
        k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v
        for k, v in packed_inputs().items()
    }
    by_dtype = Ideogram4Transformer2DModel.from_single_file(path, config="tiny", dtype=torch.bfloat16)
    config = GGUFQuantizationConfig(compute_dtype=torch.bfloat16)
    by_config = Ideogram4Transformer2DModel.from_single_file(path, config="tiny", quantization_config=config)
    assert by_dtype.dtype == by_config.dtype == torch.bfloat16
    velocity = image_velocity(by_dtype, inputs)
    assert velocity.dtype == torch.bfloat16
    assert torch.equal(velocity, image_velocity(by_config, inputs))
    assert relative(velocity, image_velocity(reference(dequantized, torch.bfloat16), inputs)) < 0.01
    with pytest.raises(ValueError, match=r"`dtype=torch.float32` and the GGUFQuantizationConfig's `compute_dtype="):
        Ideogram4Transformer2DModel.from_single_file(
            path, config="tiny", dtype=torch.float32, quantization_config=config
        )


def broken_gguf(tmp_path, change):
    state, _ = original_state(seed=2, dtype=torch.float32)
    tensors = {
        key: (tensor.numpy(), TYPES.Q8_0 if key.endswith("qkv.weight") else TYPES.F32) for key, tensor in state.items()
    }
    change(tensors)
    return write_gguf(tmp_path / "broken.gguf", tensors)


BROKEN = {
    "unsupported-type": (
        lambda t: t.update(
            {"layers.1.feed_forward.w2.weight": (t["layers.1.feed_forward.w2.weight"][0], TYPES.TQ1_0)}
        ),
        r"GGUF types diffusers cannot dequantize \(TQ1_0: layers\.1\.feed_forward\.w2\.weight\)",
    ),
    "key-missing": (
        lambda t: t.pop("layers.0.attention_norm2.weight"),
        r"missing keys: layers\.0\.attention_norm2\.weight",
    ),
    "key-unexpected": (
        lambda t: t.update({"layers.0.attention.qkv.bias": (np.zeros(384, np.float32), TYPES.F32)}),
        r"unexpected keys: layers\.0\.attention\.to_k\.bias, layers\.0\.attention\.to_q\.bias",
    ),
    "mis-shaped": (
        lambda t: t.update({"final_layer.linear.weight": (np.zeros((128, 96), np.float32), TYPES.Q8_0)}),
        r"mis-shaped keys: final_layer\.linear\.weight \(checkpoint \[128, 96\], model \[128, 128\]\)",
    ),
    "qkv-rows": (
        lambda t: t.update({"layers.1.attention.qkv.weight": (np.zeros((382, 128), np.float32), TYPES.F32)}),
        r"`layers\.1\.attention\.qkv\.weight` has shape \[382, 128\]; a fused q/k/v tensor needs 3 \* hidden rows",
    ),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_gguf_is_refused_by_name_before_reading_tensors(tmp_path, monkeypatch, kind):
    change, message = BROKEN[kind]
    path = broken_gguf(tmp_path, change)
    import diffusers.models.model_loading_utils as host

    monkeypatch.setattr(host, "load_gguf_checkpoint", lambda *a, **k: pytest.fail("read a refused file"))
    with pytest.raises(CheckpointMismatchError, match=message):
        Ideogram4Transformer2DModel.from_single_file(path, config="tiny")


def test_truncated_gguf_is_refused_by_file_name(tmp_path):
    path, _, _ = gguf_file(tmp_path / "q8.gguf", TYPES.Q8_0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointMismatchError, match=r"q8\.gguf is not a readable GGUF file"):
        Ideogram4Transformer2DModel.from_single_file(path, config="tiny")
