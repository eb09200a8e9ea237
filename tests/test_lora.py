"""LoRA adapters: every key format against weights merged by hand, fuse / unfuse, several adapters, both branches,
strict refusal, save / load and converter round trips."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from conftest import CAPTION, seeded
from diffusers_ideogram4.constants import TRANSFORMER_SIZES
from diffusers_ideogram4.layout import image_only_layout, pack_layout
from diffusers_ideogram4.lora_formats import convert_lora_state_dict, read_lora_file
from diffusers_ideogram4.testing import tiny_pipeline, tiny_transformer


CONFIG = TRANSFORMER_SIZES["tiny"]
REPO_ROOT = Path(__file__).resolve().parents[1]
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
GLOBALS = [
    "input_proj",
    "llm_cond_proj",
    "adaln_proj",
    "t_embedding.mlp_in",
    "t_embedding.mlp_out",
    "final_layer.linear",
    "final_layer.adaln_modulation",
]
# Key prefixes a test file may use; the hand merge strips them.
PREFIXES = (
    "unconditional_transformer.",
    "conditional_transformer.",
    "transformer.",
    "diffusion_model.",
    "base_model.model.",
)
TOLERANCE = dict(rtol=1e-5, atol=1e-5)

try:
    import diffusers_ideogram4.captions  # noqa: F401

    CAPTION_CHECK = "error"
except ImportError:
    CAPTION_CHECK = "off"


# --------------------------------------------------------------------------------------------------------------------
# Inputs and outputs


def conditional_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    layout = pack_layout([5, 3], 3, 4)
    batch, length = layout.indicator.shape
    return dict(
        hidden_states=torch.randn(batch, length, CONFIG["in_channels"], generator=generator),
        timestep=torch.tensor([0.3, 0.71]),
        encoder_hidden_states=torch.randn(batch, length, CONFIG["llm_features_dim"], generator=generator),
        position_ids=layout.position_ids,
        segment_ids=layout.segment_ids,
        indicator=layout.indicator,
    )


def unconditional_inputs(seed=1):
    generator = torch.Generator().manual_seed(seed)
    layout = image_only_layout(2, 3, 4)
    return dict(
        hidden_states=torch.randn(2, 12, CONFIG["in_channels"], generator=generator),
        timestep=torch.tensor([0.3, 0.71]),
        encoder_hidden_states=None,
        position_ids=layout.position_ids,
        segment_ids=None,
        indicator=layout.indicator,
    )


INPUTS = {"transformer": conditional_inputs, "unconditional_transformer": unconditional_inputs}


def velocity(model, component="transformer", **kwargs):
    with torch.no_grad():
        return model(**INPUTS[component](), **kwargs, return_dict=False)[0]


def outputs(pipe, **kwargs):
    return {component: velocity(getattr(pipe, component), component, **kwargs) for component in INPUTS}


def base_weights(model):
    """The model's own parameters by their plain names, whether or not PEFT wrapped the Linear layers."""
    return {
        key.replace(".base_layer", ""): value.detach().clone()
        for key, value in model.state_dict().items()
        if "lora_" not in key
    }


# --------------------------------------------------------------------------------------------------------------------
# The reference: weights merged by hand from a file's tensors


def merged_by_hand(model, tensors, scale=1.0, default_scale=1.0):
    """A copy of `model` with W += scale * up @ down * alpha / rank for every LoRA'd module of `tensors` (any prefix,
    lora_A/B or lora_down/up, fused or split attention). Modules without an alpha key use `default_scale`."""
    merged = copy.deepcopy(model)
    modules = {}
    for key, tensor in tensors.items():
        for prefix in PREFIXES:
            key = key.removeprefix(prefix)
        module, _, part = key.removesuffix(".weight").rpartition(".")
        modules.setdefault(module, {})[part] = tensor
    with torch.no_grad():
        for module, parts in modules.items():
            down = parts.get("lora_A", parts.get("lora_down"))
            up = parts.get("lora_B", parts.get("lora_up"))
            alpha_over_rank = parts["alpha"].item() / down.shape[0] if "alpha" in parts else default_scale
            delta = scale * alpha_over_rank * (up.double() @ down.double())
            if module.endswith("attention.qkv"):
                layer = module.removesuffix("qkv")
                for name, rows in zip(["to_q", "to_k", "to_v"], delta.chunk(3)):
                    merged.get_submodule(layer + name).weight += rows.float()
            else:
                name = module.replace("attention.o", "attention.to_out.0")
                merged.get_submodule(name).weight += delta.float()
    return merged


# --------------------------------------------------------------------------------------------------------------------
# LoRA files in every format


def peft_adapter(seed=7, r=4, alpha=8, targets=ATTENTION + ["w1", "w2", *GLOBALS]):
    """A PEFT LoRA with random non-zero factors on a tiny transformer: (model with adapter "a", config)."""
    torch.manual_seed(seed)
    model = tiny_transformer(seed=seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    model.add_adapter(config, "a")
    return model, model.peft_config["a"]


def random_original(seed, prefix, with_alpha=True, split=False):
    """Original-format factors (fused qkv, lora_down / lora_up / alpha; or split lora_A / lora_B + alpha) with ranks
    that differ per module, on attention, feed-forward, modulation and every global module."""
    model = tiny_transformer()
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    modules = {
        "layers.0.attention.qkv": 4,
        "layers.1.attention.qkv": 2,
        "layers.0.attention.o": 3,
        "layers.1.feed_forward.w2": 2,
        "layers.0.adaln_modulation": 2,
        **dict.fromkeys(GLOBALS, 3),
    }
    if split:
        modules = {
            name.replace("attention.qkv", "attention.to_k").replace("attention.o", "attention.to_out.0"): r
            for name, r in modules.items()
        }
    down_name, up_name = ("lora_A", "lora_B") if split else ("lora_down", "lora_up")
    for index, (name, rank) in enumerate(modules.items()):
        if name.endswith("qkv"):
            out, inp = (
                3 * model.get_submodule(name.replace("qkv", "to_q")).out_features,
                CONFIG["attention_head_dim"] * 2,
            )
        else:
            linear = model.get_submodule(name.replace("attention.o", "attention.to_out.0"))
            out, inp = linear.out_features, linear.in_features
        tensors[f"{prefix}{name}.{down_name}.weight"] = torch.randn(rank, inp, generator=generator) * 0.1
        tensors[f"{prefix}{name}.{up_name}.weight"] = torch.randn(out, rank, generator=generator) * 0.1
        if with_alpha:
            tensors[f"{prefix}{name}.alpha"] = torch.tensor(float(rank + index % 3))  # alpha != rank mostly
    return tensors


def write(path, tensors, metadata=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt", **({"lora_adapter_metadata": json.dumps(metadata)} if metadata else {})}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=header)
    return path


def make_lora(kind, folder):
    """-> (path, component it goes to, tensors as the file holds them, scale of modules without an alpha key)."""
    if kind in ("diffusers", "unconditional_diffusers"):
        model, config = peft_adapter()
        component = "transformer" if kind == "diffusers" else "unconditional_transformer"
        tiny_pipeline().save_lora_weights(
            folder,
            **{
                f"{component}_lora_layers": get_peft_model_state_dict(model, adapter_name="a"),
                f"{component}_lora_adapter_metadata": config.to_dict(),
            },
        )
        path = folder / "pytorch_lora_weights.safetensors"
        return path, component, read_lora_file(path)[0], config.lora_alpha / config.r
    if kind == "unprefixed":
        model, config = peft_adapter(seed=8, r=2, alpha=3)
        model.save_lora_adapter(folder, adapter_name="a")  # diffusers' model-level format: no prefix
        path = folder / "pytorch_lora_weights.safetensors"
        return path, "transformer", read_lora_file(path)[0], config.lora_alpha / config.r
    prefix, component, split = {
        "original": ("diffusion_model.", "transformer", False),
        "conditional_split_alpha": ("conditional_transformer.", "transformer", True),
        "unconditional_original": ("unconditional_transformer.", "unconditional_transformer", False),
    }[kind]
    tensors = random_original(seed=len(kind), prefix=prefix, split=split)
    return write(folder / f"{kind}.safetensors", tensors), component, tensors, 1.0


FORMATS = [
    "diffusers",
    "original",
    "unprefixed",
    "conditional_split_alpha",
    "unconditional_original",
    "unconditional_diffusers",
]


# --------------------------------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_matches_weights_merged_by_hand(kind, tmp_path):
    pipe = tiny_pipeline()
    path, component, tensors, default_scale = make_lora(kind, tmp_path)
    other = "unconditional_transformer" if component == "transformer" else "transformer"
    reference = merged_by_hand(getattr(pipe, component), tensors, default_scale=default_scale)
    half = merged_by_hand(getattr(pipe, component), tensors, scale=0.5, default_scale=default_scale)
    before = outputs(pipe)
    other_weights = base_weights(getattr(pipe, other))

    pipe.load_lora_weights(str(path), adapter_name="style")

    assert pipe.get_list_adapters() == {component: ["style"]}
    torch.testing.assert_close(
        velocity(getattr(pipe, component), component), velocity(reference, component), **TOLERANCE
    )
    assert not torch.allclose(velocity(getattr(pipe, component), component), before[component])
    # The other branch is untouched: same weights, bit-identical output.
    assert torch.equal(velocity(getattr(pipe, other), other), before[other])
    after = base_weights(getattr(pipe, other))
    assert all(torch.equal(after[key], other_weights[key]) for key in other_weights)

    # A runtime scale through `attention_kwargs` equals the delta scaled by hand.
    torch.testing.assert_close(
        velocity(getattr(pipe, component), component, attention_kwargs={"scale": 0.5}),
        velocity(half, component),
        **TOLERANCE,
    )


def test_target_sends_an_unprefixed_lora_to_the_unconditional_transformer(tmp_path):
    pipe = tiny_pipeline()
    path, _, tensors, default_scale = make_lora("unprefixed", tmp_path)
    reference = merged_by_hand(pipe.unconditional_transformer, tensors, default_scale=default_scale)
    before = velocity(pipe.transformer)
    pipe.load_lora_weights(str(path), adapter_name="u", target="unconditional_transformer")
    assert pipe.get_list_adapters() == {"unconditional_transformer": ["u"]}
    torch.testing.assert_close(
        velocity(pipe.unconditional_transformer, "unconditional_transformer"),
        velocity(reference, "unconditional_transformer"),
        **TOLERANCE,
    )
    assert torch.equal(velocity(pipe.transformer), before)


def test_fused_qkv_splits_exactly(tmp_path):
    """lora_down is shared by q, k and v, lora_up is cut in row thirds, alpha / rank folded into lora_B."""
    tensors = random_original(seed=3, prefix="diffusion_model.")
    state_dict = tiny_pipeline().lora_state_dict(tensors)
    down = tensors["diffusion_model.layers.0.attention.qkv.lora_down.weight"]
    up = tensors["diffusion_model.layers.0.attention.qkv.lora_up.weight"]
    scale = tensors["diffusion_model.layers.0.attention.qkv.alpha"].item() / down.shape[0]
    for name, rows in zip(["to_q", "to_k", "to_v"], up.chunk(3)):
        assert torch.equal(state_dict[f"transformer.layers.0.attention.{name}.lora_A.weight"], down)
        torch.testing.assert_close(state_dict[f"transformer.layers.0.attention.{name}.lora_B.weight"], rows * scale)


def test_a_lora_for_both_transformers_loads_each_part_into_its_own(tmp_path):
    pipe = tiny_pipeline()
    conditional = random_original(seed=11, prefix="diffusion_model.")
    unconditional = random_original(seed=12, prefix="unconditional_transformer.")
    path = write(tmp_path / "both.safetensors", {**conditional, **unconditional})
    references = {
        "transformer": merged_by_hand(pipe.transformer, conditional),
        "unconditional_transformer": merged_by_hand(pipe.unconditional_transformer, unconditional),
    }
    pipe.load_lora_weights(str(path), adapter_name="both")
    assert pipe.get_list_adapters() == {"transformer": ["both"], "unconditional_transformer": ["both"]}
    for component, reference in references.items():
        torch.testing.assert_close(
            velocity(getattr(pipe, component), component), velocity(reference, component), **TOLERANCE
        )


def test_pipeline_call_with_lora_equals_pipeline_with_merged_weights(tmp_path):
    pipe, merged_pipe = tiny_pipeline(), tiny_pipeline()
    path, _, tensors, _ = make_lora("original", tmp_path)
    pipe.load_lora_weights(str(path))
    merged_pipe.transformer = merged_by_hand(merged_pipe.transformer, tensors, scale=0.8)
    call = dict(
        height=256,
        width=256,
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="latent",
        caption_check=CAPTION_CHECK,
    )
    with_lora = pipe(CAPTION, generator=seeded(0), attention_kwargs={"scale": 0.8}, **call).images
    expected = merged_pipe(CAPTION, generator=seeded(0), **call).images
    torch.testing.assert_close(with_lora, expected, **TOLERANCE)


# --------------------------------------------------------------------------------------------------------------------
# Using adapters


def test_fuse_then_unfuse_restores_the_weights_bit_exactly(tmp_path):
    pipe = tiny_pipeline()
    path, _, tensors, _ = make_lora("original", tmp_path)
    original = base_weights(pipe.transformer)
    reference = merged_by_hand(pipe.transformer, tensors, scale=0.7)
    pipe.load_lora_weights(str(path), adapter_name="a")
    unfused = velocity(pipe.transformer)

    pipe.fuse_lora(lora_scale=0.7, exact_unfuse=True)
    assert pipe.fused_loras == {"a"}
    torch.testing.assert_close(velocity(pipe.transformer), velocity(reference), **TOLERANCE)
    pipe.unfuse_lora()

    assert pipe.fused_loras == set()
    restored = base_weights(pipe.transformer)
    assert all(torch.equal(restored[key], original[key]) for key in original)
    # The adapter's scaling is back too (diffusers would leave it multiplied by lora_scale).
    assert torch.equal(velocity(pipe.transformer), unfused)


def test_fusing_one_adapter_then_unfusing_restores_the_others_scaling(tmp_path):
    """diffusers' fuse multiplies every LoRA layer's scaling by lora_scale, also the layers of adapters not fused."""
    pipe = tiny_pipeline()
    path_a, *_ = make_lora("original", tmp_path / "a")
    path_b, *_ = make_lora("diffusers", tmp_path / "b")
    pipe.load_lora_weights(str(path_a), adapter_name="a")
    pipe.load_lora_weights(str(path_b), adapter_name="b")
    pipe.set_adapters(["a", "b"])
    before = velocity(pipe.transformer)
    pipe.fuse_lora(adapter_names=["a"], lora_scale=0.5, exact_unfuse=True)
    pipe.unfuse_lora()
    assert torch.equal(velocity(pipe.transformer), before)


def test_inexact_fuse_then_exact_fuse_unfuses_without_a_double_delta(tmp_path):
    pipe = tiny_pipeline()
    path_a, *_ = make_lora("original", tmp_path / "a")
    path_b, *_ = make_lora("conditional_split_alpha", tmp_path / "b")
    original = base_weights(pipe.transformer)
    pipe.load_lora_weights(str(path_a), adapter_name="a")
    pipe.load_lora_weights(str(path_b), adapter_name="b")
    pipe.fuse_lora(adapter_names=["a"], exact_unfuse=False)
    pipe.fuse_lora(adapter_names=["b"], exact_unfuse=True)
    pipe.unfuse_lora()
    restored = base_weights(pipe.transformer)
    for key in original:  # PEFT's subtraction where the first fuse chose it: close, not bit-exact
        torch.testing.assert_close(restored[key], original[key], rtol=1e-5, atol=1e-5)


def test_peft_save_pretrained_adapter_uses_its_adapter_config_alpha(tmp_path):
    from peft import get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "w1", "input_proj"], init_lora_weights=False)
    get_peft_model(tiny_transformer(seed=3), config).save_pretrained(tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = read_lora_file(weights)[0]
    assert all(key.startswith("base_model.model.") for key in tensors)
    pipe = tiny_pipeline()
    reference = merged_by_hand(pipe.transformer, tensors, default_scale=16 / 4)
    pipe.load_lora_weights(str(weights), adapter_name="peft")
    torch.testing.assert_close(velocity(pipe.transformer), velocity(reference), **TOLERANCE)

    (tmp_path / "peft" / "adapter_config.json").unlink()
    refused(
        tiny_pipeline(),
        str(weights),
        r"PEFT adapter \(`base_model\.model\.` keys\) without its "
        r"adapter_config\.json, so its `lora_alpha` is unknown",
    )


def test_metadata_must_match_the_key_prefixes():
    model, config = peft_adapter(r=4, alpha=16)
    tensors = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(model, adapter_name="a").items()}
    pipe = tiny_pipeline()
    reference = merged_by_hand(pipe.transformer, tensors, default_scale=16 / 4)
    pipe.load_lora_weights(tensors, metadata=config.to_dict(), adapter_name="plain")  # unprefixed: applies to all
    torch.testing.assert_close(velocity(pipe.transformer), velocity(reference), **TOLERANCE)
    wrong = {f"unconditional_transformer.{k}": v for k, v in config.to_dict().items()}
    refused(
        tiny_pipeline(),
        tensors,
        r"metadata is for key prefixes \['unconditional_transformer\.'\], but the "
        r"LoRA's keys have \['transformer\.'\]",
        metadata=wrong,
    )


def test_rslora_scales_by_alpha_over_the_root_of_the_rank():
    torch.manual_seed(4)
    model = tiny_transformer(seed=4)
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["to_q", "w2"], init_lora_weights=False)
    model.add_adapter(config, "rs")
    tensors = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(model, adapter_name="rs").items()}
    pipe = tiny_pipeline()
    reference = merged_by_hand(pipe.transformer, tensors, default_scale=8 / 4**0.5)
    pipe.load_lora_weights(tensors, metadata=model.peft_config["rs"].to_dict(), adapter_name="rs")
    torch.testing.assert_close(velocity(pipe.transformer), velocity(reference), **TOLERANCE)


def test_two_adapters_with_weights_equal_both_merged_by_hand(tmp_path):
    pipe = tiny_pipeline()
    path_a, _, tensors_a, scale_a = make_lora("diffusers", tmp_path / "a")
    path_b, _, tensors_b, _ = make_lora("original", tmp_path / "b")
    both = merged_by_hand(pipe.transformer, tensors_a, scale=0.6, default_scale=scale_a)
    both = merged_by_hand(both, tensors_b, scale=-1.3)
    only_b = merged_by_hand(pipe.transformer, tensors_b)
    pipe.load_lora_weights(str(path_a), adapter_name="a")
    pipe.load_lora_weights(str(path_b), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.6, -1.3])
    torch.testing.assert_close(velocity(pipe.transformer), velocity(both), **TOLERANCE)

    pipe.set_adapters("b")  # only "b", at full weight
    torch.testing.assert_close(velocity(pipe.transformer), velocity(only_b), **TOLERANCE)


def test_runtime_scale_zero_keeps_the_adapter_weights(tmp_path):
    """`attention_kwargs={"scale": 0}` switches the adapters off for one call; the `set_adapters` weights survive
    (diffusers' `unscale_lora_layers` would reset them to 1.0)."""
    pipe = tiny_pipeline()
    base = velocity(pipe.transformer)
    path, _, tensors, scale = make_lora("diffusers", tmp_path / "a")
    reference = merged_by_hand(pipe.transformer, tensors, scale=0.6, default_scale=scale)
    pipe.load_lora_weights(str(path), adapter_name="a")
    pipe.set_adapters("a", adapter_weights=0.6)
    weighted = velocity(pipe.transformer)
    torch.testing.assert_close(weighted, velocity(reference), **TOLERANCE)
    torch.testing.assert_close(velocity(pipe.transformer, attention_kwargs={"scale": 0.0}), base, **TOLERANCE)
    assert torch.equal(velocity(pipe.transformer), weighted)


def test_disable_enable_delete_and_unload(tmp_path):
    pipe = tiny_pipeline()
    before = outputs(pipe)
    path, _, _, _ = make_lora("original", tmp_path / "c")
    upath, _, _, _ = make_lora("unconditional_original", tmp_path / "u")
    pipe.load_lora_weights(str(path), adapter_name="c")
    pipe.load_lora_weights(str(upath), adapter_name="u")
    with_lora = outputs(pipe)

    pipe.disable_lora()
    assert all(torch.equal(outputs(pipe)[c], before[c]) for c in INPUTS)
    pipe.enable_lora()
    assert all(torch.equal(outputs(pipe)[c], with_lora[c]) for c in INPUTS)

    pipe.delete_adapters("u")
    assert pipe.get_list_adapters() == {"transformer": ["c"]}
    assert torch.equal(
        velocity(pipe.unconditional_transformer, "unconditional_transformer"), before["unconditional_transformer"]
    )

    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {}
    assert all(torch.equal(outputs(pipe)[c], before[c]) for c in INPUTS)
    assert not any("lora" in name for name, _ in pipe.transformer.named_modules())


# --------------------------------------------------------------------------------------------------------------------
# Saving


def test_save_load_round_trip_keeps_outputs_and_alpha(tmp_path):
    pipe = tiny_pipeline()
    conditional = make_lora("diffusers", tmp_path / "c")[0]  # alpha 8, rank 4: scale 2, held by the metadata only
    unconditional = make_lora("unconditional_original", tmp_path / "u")[0]
    pipe.load_lora_weights(str(conditional), adapter_name="style")
    pipe.load_lora_weights(str(unconditional), adapter_name="style")  # one adapter name over both branches
    expected = outputs(pipe)

    pipe.save_lora_adapter(tmp_path / "saved", adapter_name="style")
    file = tmp_path / "saved" / "pytorch_lora_weights.safetensors"
    tensors, metadata = read_lora_file(file)
    assert {key.split(".")[0] for key in tensors} == {"transformer", "unconditional_transformer"}
    assert all(".lora_A.weight" in key or ".lora_B.weight" in key for key in tensors)
    assert metadata["transformer.r"] == 4 and metadata["unconditional_transformer.target_modules"]

    fresh = tiny_pipeline()
    fresh.load_lora_weights(str(tmp_path / "saved"), weight_name="pytorch_lora_weights.safetensors")
    assert fresh.get_list_adapters() == {"transformer": ["default_0"], "unconditional_transformer": ["default_0"]}
    reloaded = outputs(fresh)
    assert all(torch.equal(reloaded[c], expected[c]) for c in INPUTS)

    # lora_state_dict gives the same diffusers-format dict and metadata back, loadable as it is.
    state_dict, lora_metadata = fresh.lora_state_dict(str(file), return_lora_metadata=True)
    again = tiny_pipeline()
    again.load_lora_weights(state_dict, metadata=lora_metadata)
    assert all(torch.equal(outputs(again)[c], expected[c]) for c in INPUTS)


def test_save_lora_weights_writes_both_prefixes_with_metadata(tmp_path):
    model, config = peft_adapter(r=2, alpha=5)
    layers = get_peft_model_state_dict(model, adapter_name="a")
    pipe = tiny_pipeline()
    pipe.save_lora_weights(
        tmp_path,
        transformer_lora_layers=layers,
        unconditional_transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=config.to_dict(),
        unconditional_transformer_lora_adapter_metadata=config.to_dict(),
    )
    tensors, metadata = read_lora_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert {key.split(".")[0] for key in tensors} == {"transformer", "unconditional_transformer"}
    assert metadata["transformer.lora_alpha"] == 5 and metadata["unconditional_transformer.r"] == 2
    pipe.load_lora_weights(str(tmp_path))
    for component in INPUTS:
        reference = merged_by_hand(getattr(tiny_pipeline(), component), layers, default_scale=2.5)
        torch.testing.assert_close(
            velocity(getattr(pipe, component), component), velocity(reference, component), **TOLERANCE
        )
    with pytest.raises(ValueError, match=r"lora_down"):
        pipe.save_lora_weights(tmp_path, transformer_lora_layers=random_original(1, ""))


# --------------------------------------------------------------------------------------------------------------------
# Refusals


def refused(pipe, tensors, match, **kwargs):
    with pytest.raises(ValueError, match=match):
        pipe.load_lora_weights(tensors, **kwargs)
    assert pipe.get_list_adapters() == {}
    assert not any("lora" in name for name, _ in pipe.transformer.named_modules())


def test_leftover_and_unknown_keys_are_refused_by_name():
    pipe = tiny_pipeline()
    good = random_original(seed=5, prefix="diffusion_model.")
    refused(
        pipe,
        {**good, "diffusion_model.layers.0.attention.qkv.lora_down.bias": torch.zeros(4)},
        r"not LoRA factors: diffusion_model\.layers\.0\.attention\.qkv\.lora_down\.bias",
    )
    refused(
        pipe,
        {**good, "diffusion_model.layers.0.attention_norm1.lora_up.weight": torch.zeros(4, 2)},
        r"not Linear layers of an Ideogram 4 transformer: diffusion_model\.layers\.0\.attention_norm1",
    )
    refused(
        pipe,
        {**good, "text_encoder.layers.0.mlp.lora_A.weight": torch.zeros(2, 4)},
        r"text_encoder\.layers\.0\.mlp\.lora_A\.weight",
    )
    incomplete = {k: v for k, v in good.items() if k != "diffusion_model.layers.0.attention.o.lora_up.weight"}
    refused(pipe, incomplete, r"`diffusion_model\.layers\.0\.attention\.o` has no up")
    too_deep = {
        **good,
        "diffusion_model.layers.9.feed_forward.w1.lora_down.weight": torch.zeros(2, 128),
        "diffusion_model.layers.9.feed_forward.w1.lora_up.weight": torch.zeros(256, 2),
    }
    refused(pipe, too_deep, r"does not have: transformer\.layers\.9\.feed_forward\.w1")
    wrong_shape = {**good, "diffusion_model.layers.0.attention.o.lora_down.weight": torch.zeros(3, 64)}
    refused(pipe, wrong_shape, r"of another shape: transformer\.layers\.0\.attention\.to_out\.0")
    twice = {
        **good,
        "diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 128),
        "diffusion_model.layers.0.attention.to_q.lora_B.weight": torch.zeros(128, 2),
    }
    refused(pipe, twice, r"`transformer\.layers\.0\.attention\.to_q` is given twice")


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("transformer.layers.0.attention.to_q.lora_magnitude_vector", "DoRA"),
        ("diffusion_model.layers.0.attention.qkv.dora_scale", "DoRA"),
        ("diffusion_model.layers.0.attention_norm1.diff", "full weight differences"),
    ],
)
def test_other_adapter_kinds_are_refused_clearly(key, kind):
    pipe = tiny_pipeline()
    refused(
        pipe,
        {**random_original(seed=5, prefix="diffusion_model."), key: torch.zeros(4, 4)},
        rf"format is not supported.*{kind}",
    )


def test_target_conflicts_and_missing_branch_are_refused():
    pipe = tiny_pipeline()
    conditional = random_original(seed=1, prefix="conditional_transformer.")
    refused(
        pipe,
        conditional,
        r"conflicts with the LoRA's key prefix 'conditional_transformer\.'",
        target="unconditional_transformer",
    )
    both = {
        **random_original(seed=1, prefix="transformer."),
        **random_original(seed=2, prefix="unconditional_transformer."),
    }
    refused(pipe, both, r"holds adapters for both transformers", target="transformer")
    refused(pipe, conditional, r"`target='vae'` is not a LoRA-loadable component", target="vae")
    distilled = tiny_pipeline(unconditional=False)
    refused(
        distilled,
        random_original(seed=2, prefix="unconditional_transformer."),
        r"weights for `unconditional_transformer`, which this pipeline does not have",
    )


def test_alpha_twice_and_wrong_metadata_are_refused():
    pipe = tiny_pipeline()
    model, config = peft_adapter(r=4, alpha=8)
    layers = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(model, adapter_name="a").items()}
    metadata = {f"transformer.{k}": v for k, v in config.to_dict().items() if k in ("r", "lora_alpha")}
    with_alpha = {**layers, "transformer.input_proj.alpha": torch.tensor(4.0)}
    refused(pipe, with_alpha, r"both an `alpha` key and LoRA metadata", metadata=metadata)
    refused(pipe, layers, r"has rank 4 but the LoRA metadata says 16", metadata={**metadata, "transformer.r": 16})
    refused(pipe, layers, r"DoRA", metadata={**metadata, "transformer.use_dora": True})


def fp8_transformer_pipeline():
    """A tiny pipeline whose conditional transformer is in the fp8 release format, and that model's weights
    dequantized into a plain float32 transformer (the reference)."""
    from diffusers_ideogram4.fp8 import (
        dequantize_fp8_state_dict,
        linear_weight_keys,
        quantize_fp8_state_dict,
        replace_linears_with_fp8,
    )

    pipe = tiny_pipeline()
    names = linear_weight_keys(pipe.transformer)
    quantized = quantize_fp8_state_dict(pipe.transformer.state_dict(), names)
    replace_linears_with_fp8(pipe.transformer, names)
    pipe.transformer.load_state_dict(quantized, strict=True)
    reference = tiny_transformer()
    reference.load_state_dict(dequantize_fp8_state_dict(quantized, torch.float32), strict=True)
    return pipe, reference


def test_lora_on_fp8_layers_matches_dequantized_weights_merged_by_hand():
    from diffusers_ideogram4.fp8 import FP8_DTYPE, FP8Linear

    pipe, reference = fp8_transformer_pipeline()
    tensors = random_original(seed=5, prefix="diffusion_model.")
    before = velocity(pipe.transformer)
    torch.testing.assert_close(before, velocity(reference), **TOLERANCE)

    pipe.load_lora_weights(tensors, adapter_name="style")

    to_q = pipe.transformer.layers[0].attention.to_q
    assert isinstance(to_q.base_layer, FP8Linear) and to_q.base_layer.weight.dtype == FP8_DTYPE
    assert to_q.lora_A["style"].weight.dtype == torch.float32  # not cast to the float8 weight's dtype
    torch.testing.assert_close(velocity(pipe.transformer), velocity(merged_by_hand(reference, tensors)), **TOLERANCE)
    torch.testing.assert_close(
        velocity(pipe.transformer, attention_kwargs={"scale": 0.5}),
        velocity(merged_by_hand(reference, tensors, scale=0.5)),
        **TOLERANCE,
    )

    with_lora = velocity(pipe.transformer)
    with pytest.raises(
        ValueError,
        match=r"`fuse_lora` cannot fold adapters into quantized weight-only layers \(fp8, nvfp4, GGUF, SDNQ\): "
        r"transformer\.adaln_proj.*run the adapters unfused",
    ):
        pipe.fuse_lora()
    assert torch.equal(velocity(pipe.transformer), with_lora)
    pipe.unload_lora_weights()
    assert torch.equal(velocity(pipe.transformer), before)


def test_offline_hub_style_folder_and_pickle_refusal(tmp_path):
    pipe = tiny_pipeline()
    path, _, _, _ = make_lora("original", tmp_path)
    with pytest.raises(ValueError, match="safetensors files only"):
        pipe.load_lora_weights(str(tmp_path), weight_name="lora.bin")
    with pytest.raises(TypeError, match="unexpected_argument"):
        pipe.load_lora_weights(str(path), unexpected_argument=1)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    assert pipe.get_list_adapters() == {"transformer": ["default_0"]}


# --------------------------------------------------------------------------------------------------------------------
# Conversion


def deltas(tensors, metadata=None):
    """{(component, diffusers module): float64 delta} of any format, computed from the tensors by hand."""
    default = {}
    for key, value in (metadata or {}).items():
        component, _, field = key.rpartition(".")
        default.setdefault(component, {})[field] = value
    result = {}
    modules = {}
    for key, tensor in tensors.items():
        component = "unconditional_transformer" if key.startswith("unconditional_transformer.") else "transformer"
        for prefix in PREFIXES:
            key = key.removeprefix(prefix)
        module, _, part = key.removesuffix(".weight").rpartition(".")
        modules.setdefault((component, module), {})[part] = tensor
    for (component, module), parts in modules.items():
        down = parts.get("lora_A", parts.get("lora_down")).double()
        up = parts.get("lora_B", parts.get("lora_up")).double()
        config = default.get(component, {})
        alpha = parts["alpha"].item() if "alpha" in parts else config.get("lora_alpha", down.shape[0])
        delta = up @ down * alpha / (config.get("r", down.shape[0]) if "alpha" not in parts else down.shape[0])
        if module.endswith("attention.qkv"):
            for name, rows in zip(["to_q", "to_k", "to_v"], delta.chunk(3)):
                result[component, module.replace("qkv", name)] = rows
        else:
            result[component, module.replace("attention.o", "attention.to_out.0")] = delta
    return result


def assert_same_deltas(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=1e-7)


def test_converter_round_trips_keep_the_delta(tmp_path):
    model, config = peft_adapter(r=4, alpha=8)  # separately trained q, k, v: fuse block-diagonally
    layers = get_peft_model_state_dict(model, adapter_name="a")
    source = {f"transformer.{k}": v for k, v in layers.items()}
    metadata = {"transformer.r": 4, "transformer.lora_alpha": 8}
    original, none = convert_lora_state_dict(source, to="original", metadata=metadata)
    assert none is None
    assert "diffusion_model.layers.0.attention.qkv.lora_down.weight" in original
    assert "diffusion_model.layers.0.attention.o.alpha" in original
    back, back_metadata = convert_lora_state_dict(original, to="diffusers")
    expected = deltas(source, metadata)
    assert_same_deltas(deltas(original), expected)
    assert_same_deltas(deltas(back, back_metadata), expected)
    # Nothing is trimmed: the block-diagonal qkv splits back at the summed rank (3 x 4), with the same deltas.
    assert back["transformer.layers.0.attention.to_q.lora_A.weight"].shape == (12, 128)

    kohya = {
        **random_original(seed=4, prefix="diffusion_model."),
        **random_original(seed=5, prefix="unconditional_transformer."),
    }
    diffusers_format, diffusers_metadata = convert_lora_state_dict(kohya, to="diffusers")
    again, _ = convert_lora_state_dict(diffusers_format, to="original", metadata=diffusers_metadata)
    assert_same_deltas(deltas(diffusers_format, diffusers_metadata), deltas(kohya))
    assert_same_deltas(deltas(again), deltas(kohya))
    # A shared down factor fuses back as it was: same keys and shapes as the source.
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in kohya.items()}


def test_convert_lora_script(tmp_path, capsys):
    source = write(tmp_path / "kohya.safetensors", random_original(seed=6, prefix="diffusion_model."))
    spec = importlib.util.spec_from_file_location("convert_lora", REPO_ROOT / "conversion" / "convert_lora.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert (
        script.main(["--input", str(source), "--output", str(tmp_path / "diffusers.safetensors"), "--to", "diffusers"])
        == 0
    )
    assert (
        script.main(
            [
                "--input",
                str(tmp_path / "diffusers.safetensors"),
                "--output",
                str(tmp_path / "original.safetensors"),
                "--to",
                "original",
            ]
        )
        == 0
    )
    converted, metadata = read_lora_file(tmp_path / "diffusers.safetensors")
    assert metadata["transformer.lora_alpha"] == metadata["transformer.r"]
    assert_same_deltas(deltas(converted, metadata), deltas(read_lora_file(source)[0]))
    assert_same_deltas(deltas(read_lora_file(tmp_path / "original.safetensors")[0]), deltas(read_lora_file(source)[0]))
    stray = write(
        tmp_path / "stray.safetensors", {**read_lora_file(source)[0], "diffusion_model.x.weight": torch.ones(1)}
    )
    assert script.main(["--input", str(stray), "--output", str(tmp_path / "no.safetensors"), "--to", "diffusers"]) == 1
    assert "keys that are not LoRA factors: diffusion_model.x.weight" in capsys.readouterr().err
    assert not (tmp_path / "no.safetensors").exists()
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(tmp_path / "diffusers.safetensors"))
    torch.testing.assert_close(
        velocity(pipe.transformer),
        velocity(merged_by_hand(tiny_pipeline().transformer, read_lora_file(source)[0])),
        **TOLERANCE,
    )


def test_an_in_memory_peft_adapter_needs_its_metadata_like_a_file(tmp_path):
    from peft import get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "w1"], init_lora_weights=False)
    get_peft_model(tiny_transformer(seed=3), config).save_pretrained(tmp_path / "peft")
    tensors = read_lora_file(tmp_path / "peft" / "adapter_model.safetensors")[0]
    refused(
        tiny_pipeline(),
        tensors,
        r"The LoRA state dict holds a PEFT adapter \(`base_model\.model\.` keys\) without `metadata=`, so its "
        r"`lora_alpha` is unknown",
    )
    # With the config as metadata it loads at alpha / r = 4, as from the folder.
    from_folder, in_memory = tiny_pipeline(), tiny_pipeline()
    from_folder.load_lora_weights(str(tmp_path / "peft" / "adapter_model.safetensors"))
    in_memory.load_lora_weights(tensors, metadata=json.loads((tmp_path / "peft" / "adapter_config.json").read_text()))
    torch.testing.assert_close(velocity(in_memory.transformer), velocity(from_folder.transformer), rtol=0, atol=0)
