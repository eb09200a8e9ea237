"""SDNQ checkpoints (SD.Next's `sdnq` package) through diffusers' quantizer registry: a quantized folder written by
the host and `sdnq`, reloaded by this package's classes and pipeline, against the model on its dequantized weights;
refusal by name, before the model is built, of broken and fused-layout folders and of a missing `sdnq`."""

import builtins
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CAPTION, seeded
from diffusers_ideogram4 import CheckpointMismatchError, Ideogram4Pipeline, Ideogram4Transformer2DModel
from diffusers_ideogram4.loading import diffusers_to_original
from diffusers_ideogram4.testing import tiny_transformer
from test_transformer import image_velocity, packed_inputs


pytest.importorskip("sdnq", reason="SDNQ checkpoints need `pip install 'diffusers-ideogram4[sdnq]'`")
pytestmark = pytest.mark.skipif(
    not __import__("diffusers_ideogram4.sdnq_loading", fromlist=["x"]).host_reads_sdnq(),
    reason=f"diffusers {__import__('diffusers').__version__} has no SDNQ quantizer (0.39 and newer have)",
)
WEIGHTS = "diffusion_pytorch_model.safetensors"
# Velocity error of the quantized model against the bf16 one (relative L2, tiny model, seed 0, measured 2026-12-02:
# float8_e4m3fn 0.0077, int8 0.0039, uint4 0.0216); asserted with some room. uint4 packs two weights per byte, so its
# stored weights do not have the model's shapes (the header check must leave quantized modules' shapes to SDNQ).
BUDGET = {"float8_e4m3fn": 0.015, "int8": 0.008, "uint4": 0.04}


def bf16(inputs):
    return {
        k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v
        for k, v in inputs.items()
    }


def relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def sdnq_folder(tmp_path, weights_dtype="float8_e4m3fn", seed=0):
    """A tiny transformer quantized with SDNQ as the host does it (`quantization_config=SDNQConfig(...)`), saved."""
    from diffusers.quantizers.quantization_config import SDNQConfig

    model = tiny_transformer(seed=seed).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    config = SDNQConfig(weights_dtype=weights_dtype, use_quantized_matmul=False)
    quantized = Ideogram4Transformer2DModel.from_pretrained(
        tmp_path / "bf16", quantization_config=config, dtype=torch.bfloat16
    )
    quantized.save_pretrained(tmp_path / "sdnq")
    return tmp_path / "sdnq", model


def dequantized_reference(folder):
    """The plain bf16 model on the weights as SDNQ dequantizes them (the host's `ModelMixin.dequantize`)."""
    quantized = Ideogram4Transformer2DModel.from_pretrained(folder, dtype=torch.bfloat16)
    quantized.dequantize()
    config = {k: v for k, v in quantized.config.items() if not k.startswith("_") and k != "quantization_config"}
    model = Ideogram4Transformer2DModel(**config).to(torch.bfloat16).eval()
    model.load_state_dict(quantized.state_dict())
    return model


@pytest.mark.parametrize("weights_dtype", list(BUDGET))
def test_sdnq_folder_equals_the_model_on_dequantized_weights(tmp_path, weights_dtype):
    folder, original = sdnq_folder(tmp_path, weights_dtype)
    loaded = Ideogram4Transformer2DModel.from_pretrained(folder, dtype=torch.bfloat16)
    assert type(loaded.layers[0].attention.to_q).__name__ == "SDNQLinear"
    inputs = bf16(packed_inputs())
    velocity = image_velocity(loaded, inputs)
    torch.testing.assert_close(velocity, image_velocity(dequantized_reference(folder), inputs), rtol=0, atol=0)
    assert relative(velocity, image_velocity(original, inputs)) < BUDGET[weights_dtype]


def test_pipeline_loads_an_sdnq_transformer(tmp_path, tiny_pipe):
    folder, _ = sdnq_folder(tmp_path)
    tiny_pipe.save_pretrained(tmp_path / "repo")
    shutil.rmtree(tmp_path / "repo" / "transformer")
    shutil.copytree(folder, tmp_path / "repo" / "transformer")
    pipe = Ideogram4Pipeline.from_pretrained(tmp_path / "repo", dtype=torch.bfloat16)
    assert type(pipe.transformer.layers[1].feed_forward.w1).__name__ == "SDNQLinear"
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(CAPTION, height=256, width=256, num_inference_steps=2, output_type="latent", generator=seeded(2))
    assert torch.isfinite(latents.images).all()


def rewrite(folder, change):
    state = load_file(str(folder / WEIGHTS))
    change(state)
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("layers.0.attention.to_q.scale"), None),  # reported after the host loads (see below)
        (
            lambda s: s.update({"layers.0.attention.to_q.zero_points": torch.ones(128, 1)}),
            r"unexpected keys: layers\.0\.attention\.to_q\.zero_points",
        ),
        (
            lambda s: s.update({"layers.0.attention.to_z.scale": torch.ones(128, 1)}),
            r"unexpected keys: layers\.0\.attention\.to_z\.scale",
        ),
        (lambda s: s.pop("layers.1.ffn_norm2.weight"), r"missing keys: layers\.1\.ffn_norm2\.weight"),
        (
            lambda s: s.update({"layers.1.ffn_norm2.weight": torch.ones(64, dtype=torch.bfloat16)}),
            r"mis-shaped keys: layers\.1\.ffn_norm2\.weight \(checkpoint \[64\], model \[128\]\)",
        ),
    ],
    ids=["scale-missing", "key-unexpected", "sdnq-tensor-of-no-module", "key-missing", "mis-shaped"],
)
def test_broken_sdnq_folder_is_refused_by_name(tmp_path, monkeypatch, change, message):
    folder = rewrite(sdnq_folder(tmp_path)[0], change)
    if message is None:
        # A missing `scale` leaves the header valid for the names alone; the host's loading info names it.
        with pytest.raises(CheckpointMismatchError, match=r"missing keys: layers\.0\.attention\.to_q\.scale"):
            Ideogram4Transformer2DModel.from_pretrained(folder, dtype=torch.bfloat16)
        return
    from diffusers.models.modeling_utils import ModelMixin

    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("host loaded it")))
    with pytest.raises(CheckpointMismatchError, match=message):
        Ideogram4Transformer2DModel.from_pretrained(folder, dtype=torch.bfloat16)


def test_fused_layout_sdnq_is_refused_with_the_way_out(tmp_path):
    folder, _ = sdnq_folder(tmp_path)
    state = diffusers_to_original(load_file(str(folder / WEIGHTS)))  # attention.qkv.weight and .scale
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS))
    with pytest.raises(ValueError, match=r"SDNQ checkpoint in the original fused-attention layout.*convert_ideogram4"):
        Ideogram4Transformer2DModel.from_pretrained(folder)


def test_missing_sdnq_package_is_named_with_the_install_command(tmp_path, monkeypatch):
    folder, _ = sdnq_folder(tmp_path)
    real_import = builtins.__import__

    def without_sdnq(name, *args, **kwargs):
        if name == "sdnq" or name.startswith("sdnq."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_sdnq)
    with pytest.raises(ImportError, match=r"quantized with SDNQ.*pip install 'diffusers-ideogram4\[sdnq\]'"):
        Ideogram4Transformer2DModel.from_pretrained(folder)
