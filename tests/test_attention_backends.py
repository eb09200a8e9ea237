"""Attention through diffusers' dispatcher: backends switch the kernel actually called, the segment mask is never
dropped, processors and q/k/v fusion follow diffusers' API."""

import functools
from unittest import mock

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend

from conftest import CAPTION, CAPTION_SHORT
from diffusers_ideogram4.testing import tiny_pipeline, tiny_transformer
from diffusers_ideogram4.transformer_ideogram4 import Ideogram4AttnProcessor
from test_transformer import image_velocity, packed_inputs


NUM_LAYERS = 2  # the tiny transformer's blocks: one attention call each per forward
MASKED = dict(text_lengths=(5, 3))  # rows of different text lengths: the segment mask is on
UNMASKED = dict(text_lengths=(4, 4))


@pytest.fixture
def kernel_calls():
    """Count the calls of every backend's function in diffusers' registry (looked up at every dispatch)."""
    calls = {}

    def counting(name, function, *args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return function(*args, **kwargs)

    registry = _AttentionBackendRegistry._backends
    wrapped = {name: functools.partial(counting, name.value, function) for name, function in registry.items()}
    with mock.patch.dict(registry, wrapped):
        yield calls


@pytest.fixture(autouse=True)
def native_default():
    """Each test starts and ends with diffusers' process-wide backend at its default."""
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["flex", "_native_math"])
@pytest.mark.parametrize("inputs", [MASKED, UNMASKED], ids=["mask", "no-mask"])
def test_backend_switches_the_kernel_and_keeps_the_output(kernel_calls, backend, inputs):
    model = tiny_transformer(seed=1)
    batch = packed_inputs(**inputs)
    if inputs is UNMASKED:
        batch["segment_ids"] = None
    native = image_velocity(model, batch)
    assert kernel_calls == {"native": NUM_LAYERS}
    kernel_calls.clear()
    model.set_attention_backend(backend)
    switched = image_velocity(model, batch)
    assert kernel_calls == {backend: NUM_LAYERS}
    torch.testing.assert_close(switched, native, rtol=1e-5, atol=1e-5)
    kernel_calls.clear()
    model.reset_attention_backend()
    assert torch.equal(image_velocity(model, batch), native)
    assert kernel_calls == {"native": NUM_LAYERS}  # reset goes back to the default, not to the last backend set


def test_set_attention_backend_does_not_leak_to_other_models(kernel_calls):
    """diffusers' `set_attention_backend` also sets the process-wide default; ours leaves it, so that the other
    branch's transformer keeps its own backend."""
    first, other = tiny_transformer(seed=1), tiny_transformer(seed=2)
    first.set_attention_backend("_native_math")
    assert _AttentionBackendRegistry.get_active_backend()[0] is AttentionBackendName.NATIVE
    image_velocity(first, packed_inputs())
    image_velocity(other, packed_inputs())
    assert kernel_calls == {"_native_math": NUM_LAYERS, "native": NUM_LAYERS}


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_attention_backend_context_manager_applies_unless_a_backend_is_set(kernel_calls):
    model = tiny_transformer(seed=1)
    with attention_backend("_native_math"):
        image_velocity(model, packed_inputs())
    assert kernel_calls == {"_native_math": NUM_LAYERS}
    kernel_calls.clear()
    model.set_attention_backend("flex")
    with attention_backend("_native_math"):  # the model's own choice wins, as in diffusers
        image_velocity(model, packed_inputs())
    assert kernel_calls == {"flex": NUM_LAYERS}


@pytest.mark.parametrize("backend", ["flash_varlen", "sage_varlen", "xformers", "flash", "_native_flash"])
def test_backend_that_would_drop_the_mask_is_refused_by_name(backend):
    model = tiny_transformer(seed=1)
    for module in model.modules():
        if hasattr(module, "set_processor"):
            module.set_attention_backend(backend)  # the module-level switch checks no installed package
    with pytest.raises(ValueError) as error:
        image_velocity(model, packed_inputs(**MASKED))
    assert str(error.value) == (
        f"Attention backend `{backend}` cannot apply Ideogram 4's boolean segment mask (it refuses a mask, or reduces "
        "it to key padding and so drops it), and this batch needs the mask: its sequences hold padding (prompts of "
        "different token lengths, or padding to a length context parallelism can split). Use one of ['native', "
        "'_native_math', '_native_efficient', '_native_cudnn', '_native_npu', 'flex'] "
        "(`transformer.set_attention_backend(...)`), or batch prompts of equal token length (one prompt per call "
        "needs no mask without context parallelism)."
    )


def test_pipeline_refuses_a_masking_backend_before_any_model_work():
    pipe = tiny_pipeline(seed=0)
    for module in pipe.transformer.modules():
        if hasattr(module, "set_processor"):
            module.set_attention_backend("flash_varlen")
    with mock.patch.object(pipe.text_encoder, "forward", side_effect=AssertionError("text encoder ran")):
        with pytest.raises(ValueError, match=r"^Attention backend `flash_varlen` cannot apply"):
            pipe([CAPTION, CAPTION_SHORT], height=256, width=256, num_inference_steps=1, output_type="latent")


def test_attention_processors_can_be_read_and_replaced():
    model = tiny_transformer(seed=1)
    processors = model.attn_processors
    assert list(processors) == [f"layers.{i}.attention.processor" for i in range(NUM_LAYERS)]
    assert all(type(p) is Ideogram4AttnProcessor for p in processors.values())
    expected = image_velocity(model, packed_inputs())

    class CountingProcessor(Ideogram4AttnProcessor):
        calls = 0

        def __call__(self, *args):
            CountingProcessor.calls += 1
            return super().__call__(*args)

    model.set_attn_processor(CountingProcessor())
    assert torch.equal(image_velocity(model, packed_inputs()), expected)
    assert CountingProcessor.calls == NUM_LAYERS
    with pytest.raises(ValueError, match="number of processors"):
        model.set_attn_processor({"layers.0.attention.processor": Ideogram4AttnProcessor()})


def test_fused_qkv_projections_give_the_same_velocity_and_unfuse_exactly(tmp_path):
    model = tiny_transformer(seed=5)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    inputs = packed_inputs()
    expected = image_velocity(model, inputs)
    model.fuse_qkv_projections()
    fused_keys = [key for key in model.state_dict() if key.startswith("layers.0.attention.to_")]
    assert sorted(fused_keys) == ["layers.0.attention.to_out.0.weight", "layers.0.attention.to_qkv.weight"]
    torch.testing.assert_close(image_velocity(model, inputs), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError) as error:
        model.save_pretrained(tmp_path / "fused")
    assert str(error.value) == (
        "Cannot save the model while q/k/v are fused (`fuse_qkv_projections`): the fused layer is not part of the "
        "checkpoint layout. Call `unfuse_qkv_projections()` first."
    )
    with pytest.raises(ValueError, match=r"^Cannot load a LoRA adapter while q/k/v are fused"):
        model.load_lora_adapter({}, prefix=None)
    model.unfuse_qkv_projections()
    restored = model.state_dict()
    assert list(restored) == list(state) and all(torch.equal(restored[k], state[k]) for k in state)
    assert torch.equal(image_velocity(model, inputs), expected)


def test_fusing_is_refused_for_lora_and_fp8_layers():
    from peft import LoraConfig

    from diffusers_ideogram4.fp8 import replace_linears_with_fp8

    model = tiny_transformer(seed=5)
    model.add_adapter(LoraConfig(r=2, target_modules=["to_k"]))
    with pytest.raises(ValueError) as error:
        model.fuse_qkv_projections()
    assert str(error.value) == (
        "`fuse_qkv_projections` cannot fuse these projections: `layers.0.attention.to_k` is a peft.tuners.lora.layer."
        "Linear (LoRA adapter, quantized or fp8 layer); `layers.1.attention.to_k` is a peft.tuners.lora.layer.Linear "
        "(LoRA adapter, quantized or fp8 layer). Fuse only plain float weights: merge LoRA adapters first "
        "(`fuse_lora`, then `unload_lora_weights`), fuse before enabling offload or layerwise casting, and leave fp8 "
        "or quantized checkpoints unfused. Nothing was fused."
    )
    assert not any(getattr(m, "fused_projections", False) for m in model.modules())

    fp8 = tiny_transformer(seed=5)
    replace_linears_with_fp8(fp8, [f"layers.{i}.attention.to_q.weight" for i in range(NUM_LAYERS)])
    with pytest.raises(ValueError, match=r"`layers\.0\.attention\.to_q` is a diffusers_ideogram4\.fp8\.FP8Linear"):
        fp8.fuse_qkv_projections()


def test_ring_attention_with_a_mask_is_refused_by_name():
    """Ring attention hands every key chunk the whole mask; refused before any exchange (checked on the processors,
    no processes needed)."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    model = tiny_transformer(seed=1)
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    for processor in model.attn_processors.values():
        processor._parallel_config = config
    with pytest.raises(ValueError) as error:
        image_velocity(model, packed_inputs(**MASKED))
    assert str(error.value) == (
        "Ring attention (`ContextParallelConfig(ring_degree=2)`) cannot apply Ideogram 4's segment mask, and this "
        "batch needs it: its sequences hold padding (prompts of different token lengths, or padding to a length 2 "
        "processes can split). Use Ulysses (`ulysses_degree=`), or batch prompts of equal token length whose sequence "
        "is a multiple of 2 tokens long."
    )
