"""Trainers' LoRA key formats (musubi-tuner, OneTrainer's outputs, ai-toolkit, kohya / LyCORIS flat names) and
LyCORIS LoHa / LoKr through PEFT, each made in the test from a PEFT adapter (fused q/k/v modules by hand), against the
weights merged by hand; refusals by name."""

import copy

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from diffusers_ideogram4.lora_formats import convert_lora_state_dict
from diffusers_ideogram4.lora_trainers import (
    FLAT_BLOCK_MODULES,
    FLAT_GLOBAL_MODULES,
    LokrFactors,
    _lokr_layout,
    parse_lycoris_state_dict,
    unflatten_module,
)
from diffusers_ideogram4.testing import tiny_pipeline, tiny_transformer
from test_lora import GLOBALS, TOLERANCE, merged_by_hand, peft_adapter, refused, velocity, write


# --------------------------------------------------------------------------------------------------------------------
# LoRA in each trainer's key format


def original_lora(seed=7):
    """A PEFT LoRA (alpha 8, rank 4, attention, feed-forward and global modules) in the original format: fused q/k/v,
    `diffusion_model.` keys, lora_down / lora_up / alpha."""
    model, config = peft_adapter(seed=seed)
    peft = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(model, adapter_name="a").items()}
    metadata = {f"transformer.{k}": v for k, v in config.to_dict().items() if k in ("r", "lora_alpha")}
    return convert_lora_state_dict(peft, to="original", metadata=metadata)[0], (peft, config)


def flat(key, prefix="lora_unet_"):
    """kohya naming, written here from the description: the module path with `.` -> `_`, the value suffix dotted."""
    module, suffix = key.removeprefix("diffusion_model.").split(".lora_")[0], key.split(".lora_")[-1]
    module, _, alpha = module.partition(".alpha")
    name = prefix + module.replace(".", "_")
    return name + (".alpha" if key.endswith(".alpha") else ".lora_" + suffix)


def trainer_file(kind, folder):
    """-> (path, the tensors in a form `merged_by_hand` reads: dotted names, lora_down / lora_up / alpha or A / B)."""
    original, (peft, config) = original_lora()
    if kind in ("musubi", "onetrainer_kohya", "lycoris_flat"):
        # lora_unet_ + flat original path; musubi and OneTrainer cast every tensor, alpha included, to the save dtype
        dtype = torch.bfloat16 if kind == "musubi" else torch.float16
        tensors = {k: v.to(dtype) for k, v in original.items()}
        prefix = "lycoris_" if kind == "lycoris_flat" else "lora_unet_"
        stored = {flat(k, prefix): v for k, v in tensors.items()}
        metadata = {"ss_network_module": "networks.lora_ideogram4", "modelspec.architecture": "Ideogram-4/lora"}
        return write_with_header(folder / f"{kind}.safetensors", stored, metadata), tensors
    if kind == "onetrainer_comfy":  # diffusion_model. + original names, lora_A / lora_B, alpha kept
        tensors = {
            k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v for k, v in original.items()
        }
        return write(folder / f"{kind}.safetensors", tensors), tensors
    if kind == "onetrainer_diffusers":  # transformer. + split names, alpha folded into lora_B, no alpha key
        scale = config.lora_alpha / config.r
        tensors = {k: v * scale if ".lora_B." in k else v for k, v in peft.items()}
        return write(folder / f"{kind}.safetensors", tensors), tensors
    if kind == "ai_toolkit":  # diffusion_model. + original names, lora_A / lora_B, no alpha (alpha = rank)
        tensors = {}
        for key, value in original.items():
            if key.endswith(".alpha"):
                continue
            if key.endswith(".lora_up.weight"):
                alpha = original[key.replace(".lora_up.weight", ".alpha")]
                value = value * (alpha / value.shape[1])
            tensors[key.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B.")] = value
        return write(folder / f"{kind}.safetensors", tensors), tensors
    raise AssertionError(kind)


def write_with_header(path, tensors, metadata):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt", **metadata})
    return path


TRAINER_FORMATS = [
    "musubi",
    "onetrainer_kohya",
    "lycoris_flat",
    "onetrainer_comfy",
    "onetrainer_diffusers",
    "ai_toolkit",
]


@pytest.mark.parametrize("kind", TRAINER_FORMATS)
def test_each_trainer_format_equals_weights_merged_by_hand(tmp_path, kind):
    pipe = tiny_pipeline()
    path, tensors = trainer_file(kind, tmp_path)
    reference = merged_by_hand(pipe.transformer, {k: v.float() for k, v in tensors.items()})
    before = velocity(pipe.unconditional_transformer, "unconditional_transformer")
    pipe.load_lora_weights(str(path), adapter_name="trained")
    assert pipe.get_list_adapters() == {"transformer": ["trained"]}
    torch.testing.assert_close(velocity(pipe.transformer), velocity(reference), **TOLERANCE)
    assert torch.equal(velocity(pipe.unconditional_transformer, "unconditional_transformer"), before)


def test_flat_names_map_back_through_the_model_table():
    assert unflatten_module("layers_11_attention_qkv") == "layers.11.attention.qkv"
    assert unflatten_module("layers_1_attention_to_out_0") == "layers.1.attention.to_out.0"
    assert unflatten_module("layers_0_feed_forward_w2") == "layers.0.feed_forward.w2"
    assert unflatten_module("t_embedding_mlp_in") == "t_embedding.mlp_in"
    assert unflatten_module("final_layer_adaln_modulation") == "final_layer.adaln_modulation"
    assert unflatten_module("layers_0_attention_norm_q") is None  # not a Linear
    # every Linear of both layouts has its own flat name
    assert len(FLAT_BLOCK_MODULES) == 10 and len(FLAT_GLOBAL_MODULES) == 7
    pipe = tiny_pipeline()
    good = {flat(k): v for k, v in original_lora()[0].items()}
    stray = {**good, "lora_unet_layers_0_attention_qkvx.lora_down.weight": torch.zeros(2, 128)}
    refused(
        pipe, stray, r"not Linear layers of an Ideogram 4 transformer: lora_unet_layers_0_attention_qkvx\.lora_down"
    )


# --------------------------------------------------------------------------------------------------------------------
# LyCORIS LoHa and LoKr


def peft_lycoris(config, seed=11):
    """A PEFT LoHa / LoKr adapter with random factors on a tiny transformer: its state dict (split layout)."""
    torch.manual_seed(seed)
    model = tiny_transformer(seed=seed)
    inject_adapter_in_model(config, model, adapter_name="x")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "hada_" in name or "lokr_" in name:
                parameter.normal_(0.0, 0.2)
    return get_peft_model_state_dict(model, adapter_name="x")


def original_names(state):
    return {k.replace("attention.to_out.0.", "attention.o."): v for k, v in state.items()}


def merged_lycoris(model, tensors, scale=1.0):
    """W += scale * dW per module, dW from the LyCORIS formulas, written out here; fused q/k/v rows split in thirds."""
    merged = copy.deepcopy(model)
    modules = {}
    for key, tensor in tensors.items():
        for prefix in ("diffusion_model.", "transformer."):
            key = key.removeprefix(prefix)
        module, _, part = key.rpartition(".")
        modules.setdefault(module, {})[part] = tensor.double()
    with torch.no_grad():
        for module, p in modules.items():
            if "hada_w1_a" in p:
                r = p["hada_w1_b"].shape[0]
                alpha = p["alpha"].item() if "alpha" in p else r
                delta = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * alpha / r
            else:
                w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
                w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
                decomposed = [p[k] for k in ("lokr_w1_a", "lokr_w2_a") if k in p]
                delta = torch.kron(w1, w2) * (p["alpha"].item() / decomposed[0].shape[1] if decomposed else 1.0)
            if module.endswith("attention.qkv"):
                for name, rows in zip(["to_q", "to_k", "to_v"], delta.chunk(3)):
                    merged.get_submodule(module.removesuffix("qkv") + name).weight += scale * rows.float()
            else:
                merged.get_submodule(module.replace("attention.o", "attention.to_out.0")).weight += (
                    scale * delta.float()
                )
    return merged


LOHA_TARGETS = ["to_out.0", "w1", "w3", *GLOBALS]


def loha_file(folder, kind):
    """A LoHa from PEFT (rank 4, alpha 6) plus a fused q/k/v module made by hand, in a trainer's key format."""
    state = peft_lycoris(LoHaConfig(r=4, alpha=6, target_modules=LOHA_TARGETS))
    tensors = original_names(state)
    tensors.update(
        {k.rpartition(".")[0] + ".alpha": torch.tensor(6.0) for k in list(tensors) if k.endswith("hada_w1_a")}
    )
    generator = torch.Generator().manual_seed(3)
    for name, shape in {
        "hada_w1_a": (384, 2),
        "hada_w1_b": (2, 128),
        "hada_w2_a": (384, 2),
        "hada_w2_b": (2, 128),
    }.items():
        tensors[f"layers.1.attention.qkv.{name}"] = torch.randn(shape, generator=generator) * 0.2
    tensors["layers.1.attention.qkv.alpha"] = torch.tensor(1.0)  # rank 2 here: scale 0.5
    if kind == "lycoris_kohya":  # LyCORIS' kohya wrapper: flat names, factor names without `.weight`
        stored = {
            "lora_unet_" + k.rpartition(".")[0].replace(".", "_") + "." + k.rpartition(".")[2]: v
            for k, v in tensors.items()
        }
    else:  # OneTrainer's Comfy output: diffusion_model. + original names, hada_* and alpha kept
        stored = {f"diffusion_model.{k}": v for k, v in tensors.items()}
    return write(folder / f"loha_{kind}.safetensors", stored), tensors


@pytest.mark.parametrize("kind", ["lycoris_kohya", "onetrainer_comfy"])
def test_loha_equals_weights_merged_by_hand(tmp_path, kind):
    pipe = tiny_pipeline()
    path, tensors = loha_file(tmp_path, kind)
    reference = merged_lycoris(pipe.transformer, tensors)
    half = merged_lycoris(pipe.transformer, tensors, scale=0.5)
    pipe.load_lora_weights(str(path), adapter_name="loha")
    assert type(pipe.transformer.layers[1].attention.to_k).__module__ == "peft.tuners.loha.layer"
    torch.testing.assert_close(velocity(pipe.transformer), velocity(reference), **TOLERANCE)
    torch.testing.assert_close(
        velocity(pipe.transformer, attention_kwargs={"scale": 0.5}), velocity(half), **TOLERANCE
    )
    pipe.set_adapters(["loha"], adapter_weights=[0.5])
    torch.testing.assert_close(velocity(pipe.transformer), velocity(half), **TOLERANCE)
    pipe.set_adapters(["loha"], adapter_weights=[1.0])
    unfused = velocity(pipe.transformer)
    pipe.fuse_lora()
    torch.testing.assert_close(velocity(pipe.transformer), unfused, **TOLERANCE)
    pipe.unfuse_lora()
    with pytest.raises(ValueError, match=r"`loha` is a LOHA adapter; `save_lora_adapter` writes LoRA adapters only"):
        pipe.save_lora_adapter(tmp_path / "out", adapter_name="loha")
    pipe.delete_adapters("loha")
    assert pipe.get_list_adapters() == {}


def test_lokr_from_peft_and_full_rank_lokr_equal_weights_merged_by_hand(tmp_path):
    pipe = tiny_pipeline()
    # PEFT's own layout: w1 full, w2 decomposed at rank 2 (factor -1: 128 = 8 x 16, 256 = 16 x 16)
    state = peft_lycoris(LoKrConfig(r=2, alpha=3, target_modules=["to_k", "to_out.0", "w2", "adaln_proj"]))
    tensors = original_names(state)
    tensors.update(
        {k.rpartition(".")[0] + ".alpha": torch.tensor(3.0) for k in list(tensors) if k.endswith("lokr_w1")}
    )
    # ai-toolkit's full-rank LoKr: both factors full, alpha a meaningless 1e10 (inf once saved in float16)
    generator = torch.Generator().manual_seed(5)
    tensors["layers.0.feed_forward.w1.lokr_w1"] = torch.randn(16, 8, generator=generator) * 0.2
    tensors["layers.0.feed_forward.w1.lokr_w2"] = torch.randn(16, 16, generator=generator) * 0.2
    tensors["layers.0.feed_forward.w1.alpha"] = torch.tensor(9999999999.0).half()
    path = write(tmp_path / "lokr.safetensors", {f"diffusion_model.{k}": v for k, v in tensors.items()})
    reference = merged_lycoris(pipe.transformer, tensors)
    pipe.load_lora_weights(str(path), adapter_name="lokr")
    assert type(pipe.transformer.layers[0].feed_forward.w1).__module__ == "peft.tuners.lokr.layer"
    torch.testing.assert_close(velocity(pipe.transformer), velocity(reference), **TOLERANCE)


def test_lycoris_refusals_name_the_modules(tmp_path):
    pipe = tiny_pipeline()
    g = torch.Generator().manual_seed(0)
    # A LoKr on the fused q/k/v whose 16 Kronecker row blocks do not split in thirds.
    fused = {
        "diffusion_model.layers.0.attention.qkv.lokr_w1": torch.randn(16, 8, generator=g),
        "diffusion_model.layers.0.attention.qkv.lokr_w2": torch.randn(24, 16, generator=g),
    }
    refused(
        pipe,
        fused,
        r"`diffusion_model\.layers\.0\.attention\.qkv`: a LoKr on the fused q/k/v whose Kronecker rows \(16 blocks of 24\)",
    )
    # Thirds that split, into factors no single PEFT factorization reproduces.
    odd = {
        "diffusion_model.layers.0.attention.qkv.lokr_w1": torch.randn(12, 8, generator=g),
        "diffusion_model.layers.0.attention.qkv.lokr_w2": torch.randn(32, 16, generator=g),
    }
    refused(pipe, odd, r"no single LoKr factorization gives these Kronecker factors")
    tucker = {
        "diffusion_model.layers.0.attention.o.hada_w1_a": torch.zeros(128, 2),
        "diffusion_model.layers.0.attention.o.hada_t1": torch.zeros(2, 2, 1, 1),
    }
    refused(
        pipe,
        tucker,
        r"unsupported LyCORIS tensors: diffusion_model\.layers\.0\.attention\.o\.hada_t1 \(LoHa Tucker core\)",
    )
    mixed = {**loha_file(tmp_path, "onetrainer_comfy")[1], "layers.0.attention.o.lora_A.weight": torch.zeros(2, 128)}
    refused(pipe, mixed, r"keys that are not LoHa / LoKr factors: layers\.0\.attention\.o\.lora_A\.weight")
    twice = {**loha_file(tmp_path, "onetrainer_comfy")[1]}
    twice.update(
        {k.replace("layers.1.attention.qkv.", "layers.1.attention.to_k."): v for k, v in twice.items() if ".qkv." in k}
    )
    twice["layers.1.attention.to_k.hada_w1_a"] = twice["layers.1.attention.to_k.hada_w1_a"][:128]
    twice["layers.1.attention.to_k.hada_w2_a"] = twice["layers.1.attention.to_k.hada_w2_a"][:128]
    refused(pipe, twice, r"`transformer\.layers\.1\.attention\.to_k` is given twice")
    incomplete = {"diffusion_model.layers.0.attention.o.hada_w1_a": torch.zeros(128, 2)}
    refused(
        pipe, incomplete, r"`diffusion_model\.layers\.0\.attention\.o` lacks \['hada_w1_b', 'hada_w2_a', 'hada_w2_b'\]"
    )
    nan_alpha = {k: v for k, v in loha_file(tmp_path, "onetrainer_comfy")[1].items()}
    nan_alpha["layers.0.attention.o.alpha"] = torch.tensor(float("nan"))
    refused(pipe, nan_alpha, r"`layers\.0\.attention\.o`: alpha is nan, which scales a decomposed factor")
    with pytest.raises(ValueError, match=r"format is not supported.*LoHa"):
        convert_lora_state_dict(loha_file(tmp_path, "onetrainer_comfy")[1], to="diffusers")


def test_one_adapter_kind_per_transformer(tmp_path):
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(trainer_file("ai_toolkit", tmp_path)[0]), adapter_name="style")
    with pytest.raises(
        ValueError, match=r"(?s)this LoHa adapter cannot join them.*`transformer` holds \['style \(LoRA\)'\]"
    ):
        pipe.load_lora_weights(str(loha_file(tmp_path, "onetrainer_comfy")[0]), adapter_name="loha")
    assert pipe.get_list_adapters() == {"transformer": ["style"]}
    pipe.delete_adapters("style")
    pipe.load_lora_weights(str(loha_file(tmp_path, "onetrainer_comfy")[0]), adapter_name="loha")
    with pytest.raises(ValueError, match=r"(?s)this LoRA adapter cannot join them.*\['loha \(LoHa\)'\]"):
        pipe.load_lora_weights(str(trainer_file("ai_toolkit", tmp_path)[0]), adapter_name="style")


def test_loha_on_the_unconditional_branch_by_target(tmp_path):
    pipe = tiny_pipeline()
    path, tensors = loha_file(tmp_path, "lycoris_kohya")
    reference = merged_lycoris(pipe.unconditional_transformer, tensors)
    before = velocity(pipe.transformer)
    pipe.load_lora_weights(str(path), target="unconditional_transformer")
    unconditional = velocity(pipe.unconditional_transformer, "unconditional_transformer")
    torch.testing.assert_close(unconditional, velocity(reference, "unconditional_transformer"), **TOLERANCE)
    assert torch.equal(velocity(pipe.transformer), before)


# --------------------------------------------------------------------------------------------------------------------
# Adapters on quantized single-file transformers


@pytest.mark.parametrize("kind", ["nvfp4_mixed", "gguf_q8_0"])
def test_lora_on_a_quantized_single_file_equals_its_dequantized_weights_merged_by_hand(tmp_path, kind):
    import gguf

    from diffusers_ideogram4 import Ideogram4Transformer2DModel
    from single_file_formats import comfy_file, gguf_file
    from test_single_file import MIXED, model_on

    if kind == "gguf_q8_0":
        path, dequantized, _ = gguf_file(tmp_path / "q8.gguf", gguf.GGMLQuantizationType.Q8_0)
        tolerance = dict(rtol=0, atol=5e-3)  # diffusers dequantizes GGUF through float16 (see test_gguf.py)
    else:
        path, dequantized, _ = comfy_file(tmp_path / "nvfp4.safetensors", formats=MIXED, dtype=torch.float32)
        tolerance = TOLERANCE
    model, config = peft_adapter()
    tensors = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(model, adapter_name="a").items()}
    metadata = {f"transformer.{k}": v for k, v in config.to_dict().items() if k in ("r", "lora_alpha")}
    pipe = tiny_pipeline()
    pipe.transformer = Ideogram4Transformer2DModel.from_single_file(path, config="tiny")
    reference = merged_by_hand(
        model_on(dequantized, torch.float32), tensors, default_scale=config.lora_alpha / config.r
    )
    pipe.load_lora_weights(tensors, metadata=metadata, adapter_name="style")
    torch.testing.assert_close(velocity(pipe.transformer), velocity(reference), **tolerance)
    with pytest.raises(ValueError, match=r"cannot fold adapters into quantized weight-only layers .*adaln_proj"):
        pipe.fuse_lora()


def test_a_decomposed_lokr_without_alpha_gets_alpha_equal_to_its_rank():
    """LyCORIS reads a missing alpha of a decomposed LoKr as its rank (scale 1), and PEFT is given that alpha."""
    module = "diffusion_model.layers.0.attention.o"
    state = {f"{module}.lokr_w1": torch.ones(2, 2), f"{module}.lokr_w2_a": torch.ones(3, 2)}
    state[f"{module}.lokr_w2_b"] = torch.ones(2, 4)
    (factors,) = parse_lycoris_state_dict(state)["transformer"].values()
    assert (factors.rank, factors.alpha) == (2, 2.0)


def test_lokr_layout_at_peft_rank_boundary_keeps_w2_full():
    # PEFT decomposes w2 only when r < max(b, d) / 2: at r = 2 with a full 4 x 4 w2 it stays full, as in the file.
    lokr = LokrFactors((torch.ones(8, 2), torch.ones(2, 8)), (torch.ones(4, 4),), alpha=2.0)
    arguments, problems = _lokr_layout({"layers.0.attention.to_out.0": lokr})
    assert problems == []
    assert arguments == {
        "ranks": {"layers.0.attention.to_out.0": 2},
        "alphas": {"layers.0.attention.to_out.0": 2.0},
        "decompose_both": True,
        "decompose_factor": 8,
    }


def test_a_peft_saved_loha_with_its_adapter_config_is_refused_not_loaded_at_another_scale(tmp_path):
    # PEFT keeps a LoHa's alpha in adapter_config.json (here 16 over rank 4: scale 4); the LyCORIS loader reads alpha
    # from `.alpha` tensors only, so loading the tensors alone would apply scale 1.
    from peft import get_peft_model

    torch.manual_seed(3)
    config = LoHaConfig(r=4, alpha=16, target_modules=["to_q", "w1"], init_weights=False)
    get_peft_model(tiny_transformer(seed=3), config).save_pretrained(tmp_path / "peft")
    pipe = tiny_pipeline()
    before = velocity(pipe.transformer)
    refused(
        pipe,
        str(tmp_path / "peft" / "adapter_model.safetensors"),
        r"This LoHa / LoKr adapter comes with PEFT metadata \(adapter_config\.json or `metadata=`: \[.*\]\), which "
        r"the LyCORIS loader does not apply",
    )
    torch.testing.assert_close(velocity(pipe.transformer), before, rtol=0, atol=0)


def test_a_module_holding_both_loha_and_lokr_tensors_is_refused():
    loha = peft_lycoris(LoHaConfig(r=4, alpha=6, target_modules=["to_out.0"]))
    lokr = peft_lycoris(LoKrConfig(r=2, alpha=3, target_modules=["to_out.0"]))
    module = next(key for key in loha if key.endswith("hada_w1_a")).rpartition(".")[0]
    mixed = {**loha, **{key: value for key, value in lokr.items() if key.startswith(module + ".")}}
    assert any(".lokr_" in key for key in mixed) and len({k.rpartition(".")[0] for k in mixed}) == len(
        {k.rpartition(".")[0] for k in loha}
    )
    with pytest.raises(ValueError, match="the file mixes LoHa and LoKr modules; PEFT holds one adapter kind"):
        parse_lycoris_state_dict(mixed)
