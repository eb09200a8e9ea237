"""Loading arguments shared by every component: `dtype` / `torch_dtype`, and quantization configs (torchao on the
fly on CPU; bitsandbytes validated by the host's quantizer)."""

import importlib.util
import warnings

import pytest
import torch

from conftest import CAPTION, seeded
from diffusers_ideogram4 import Ideogram4Pipeline, Ideogram4Transformer2DModel
from diffusers_ideogram4.testing import tiny_pipeline
from diffusers_ideogram4.text_encoder import Ideogram4TextEncoder


KWARGS = dict(height=256, width=256, num_inference_steps=2, output_type="latent")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    tiny_pipeline(seed=5).save_pretrained(root)
    return root


@pytest.mark.parametrize("name", ["dtype", "torch_dtype"])
def test_each_component_takes_dtype_under_either_name(folder, name):
    transformer = Ideogram4Transformer2DModel.from_pretrained(
        folder, subfolder="transformer", **{name: torch.bfloat16}
    )
    text_encoder = Ideogram4TextEncoder.from_pretrained(folder, subfolder="text_encoder", **{name: torch.bfloat16})
    assert transformer.dtype == text_encoder.dtype == torch.bfloat16


def test_pipeline_takes_dtype_without_deprecation_warning(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        pipe = Ideogram4Pipeline.from_pretrained(folder, dtype=torch.bfloat16)
    dtypes = {
        name: getattr(pipe, name).dtype for name in ("transformer", "unconditional_transformer", "text_encoder", "vae")
    }
    assert set(dtypes.values()) == {torch.bfloat16}, dtypes


def test_disagreeing_dtype_names_are_refused(folder):
    message = r"`dtype=torch\.bfloat16` and `torch_dtype=torch\.float32` disagree: pass only `dtype`\."
    with pytest.raises(ValueError, match=message):
        Ideogram4Transformer2DModel.from_pretrained(
            folder, subfolder="transformer", dtype=torch.bfloat16, torch_dtype=torch.float32
        )
    with pytest.raises(ValueError, match=message):
        Ideogram4Pipeline.from_pretrained(folder, dtype=torch.bfloat16, torch_dtype=torch.float32)


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is not None, reason="checks the host's refusal without bitsandbytes"
)
def test_bitsandbytes_quantization_is_validated_by_the_host(folder):
    """No check of our own in front of diffusers' bitsandbytes quantizer: its environment check is the one that
    runs (here: bitsandbytes is not installed)."""
    from diffusers.quantizers import PipelineQuantizationConfig

    config = PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit",
        quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        components_to_quantize=["transformer", "unconditional_transformer", "text_encoder"],
    )
    with pytest.raises(ImportError, match="bitsandbytes"):
        Ideogram4Pipeline.from_pretrained(folder, quantization_config=config)


def test_torchao_int8_weight_only_on_the_fly(folder):
    """`PipelineQuantizationConfig` with torchao quantizes both transformers' Linears at load time (on CPU too);
    the result stays close to the unquantized pipeline and is not the same computation."""
    from diffusers import TorchAoConfig
    from diffusers.quantizers import PipelineQuantizationConfig
    from torchao.quantization import Int8WeightOnlyConfig

    branches = ("transformer", "unconditional_transformer")
    config = PipelineQuantizationConfig(
        quant_mapping={name: TorchAoConfig(Int8WeightOnlyConfig()) for name in branches}
    )
    quantized = Ideogram4Pipeline.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=config)
    reference = Ideogram4Pipeline.from_pretrained(folder, dtype=torch.bfloat16)
    for name in branches:
        weight = getattr(quantized, name).layers[0].attention.to_q.weight
        assert type(weight) is not torch.nn.Parameter and "int8" in repr(weight).lower(), (name, type(weight))
    assert type(quantized.text_encoder.language_model.layers[0].self_attn.q_proj.weight) is torch.nn.Parameter

    out = quantized(CAPTION, generator=seeded(2), **KWARGS).images.float()
    ref = reference(CAPTION, generator=seeded(2), **KWARGS).images.float()
    relative = ((out - ref).norm() / ref.norm()).item()
    assert 0 < relative < 0.05, relative
