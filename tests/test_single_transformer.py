"""Single-transformer mode: the unconditional branch as a LoRA on the conditional transformer, adapters scoped per
branch, and what offload moves."""

import copy

import pytest
import torch

from conftest import CAPTION, needs_cpu_group_offload, seeded
from diffusers_ideogram4 import Ideogram4Img2ImgPipeline, Ideogram4Pipeline
from diffusers_ideogram4.constants import TRANSFORMER_SIZES
from diffusers_ideogram4.layout import image_only_layout, pack_layout
from diffusers_ideogram4.testing import tiny_pipeline
from test_lora import CAPTION_CHECK, TOLERANCE, make_lora, merged_by_hand, random_original, write
from test_lora_trainers import loha_file, merged_lycoris
from test_offload import simulate_residency


CONFIG = TRANSFORMER_SIZES["tiny"]
# Three steps, the middle one at guidance 1.0 (no unconditional pass there).
CALL = dict(
    height=256, width=256, guidance_schedule=[5.0, 1.0, 3.0], output_type="latent", caption_check=CAPTION_CHECK
)


def single(seed=0):
    """A tiny pipeline loaded like `from_pretrained(repo, unconditional_transformer=None)`."""
    return tiny_pipeline(seed=seed, unconditional=False)


def two_transformers(unconditional, seed=0):
    """A tiny pipeline with the same conditional transformer and `unconditional` as its unconditional one."""
    pipe = tiny_pipeline(seed=seed, unconditional=False)
    pipe.unconditional_transformer = unconditional
    return pipe


def base_transformer(seed=0):
    """The conditional transformer as a fresh pipeline has it, without adapters: what LoRAs are merged into."""
    return tiny_pipeline(seed=seed, unconditional=False).transformer


def passes(pipe, scale=None):
    """(conditional, unconditional) velocity of one step on fixed inputs, each pass as `predict_velocity` runs it."""
    generator = seeded(5)
    layout, uncond_layout = pack_layout([5, 3], 2, 3), image_only_layout(2, 2, 3)
    latents = torch.randn(2, 6, CONFIG["in_channels"], generator=generator)
    text = torch.randn(2, 5, CONFIG["llm_features_dim"], generator=generator)
    timestep = torch.full((1,), 0.4)
    pipe._attention_kwargs = None if scale is None else {"scale": scale}
    with torch.no_grad():
        with pipe.branch_pass("conditional") as model:
            conditional = pipe.branch_velocity(model, latents, timestep, text, layout)
        with pipe.branch_pass("unconditional") as model:
            unconditional = pipe.branch_velocity(model, latents, timestep, None, uncond_layout)
    pipe._attention_kwargs = None
    return conditional, unconditional


def generate(pipe, **kwargs):
    return pipe(CAPTION, generator=seeded(0), **{**CALL, **kwargs}).images


# --------------------------------------------------------------------------------------------------------------------
# The unconditional LoRA against the unconditional transformer it stands for


@pytest.mark.parametrize("kind", ["original", "unconditional_original", "unprefixed", "unconditional_diffusers"])
def test_single_transformer_mode_equals_two_transformers_with_the_lora_merged_by_hand(kind, tmp_path):
    """ai-toolkit's format (`diffusion_model.`, fused qkv, alpha), the unconditional branch's prefix, an unprefixed
    diffusers LoRA and one with PEFT metadata: each equals a second transformer with the LoRA merged by hand."""
    pipe = single()
    if kind in ("original", "unconditional_original"):
        prefix = "diffusion_model." if kind == "original" else "unconditional_transformer."
        tensors, default_scale = random_original(seed=21, prefix=prefix), 1.0
        path = write(tmp_path / f"{kind}.safetensors", tensors)
    else:
        path, _, tensors, default_scale = make_lora(kind, tmp_path)
    reference = two_transformers(merged_by_hand(base_transformer(), tensors, default_scale=default_scale))

    pipe.load_unconditional_lora(str(path))

    assert pipe.unconditional_adapter == "unconditional"
    assert pipe.has_unconditional_branch and pipe.unconditional_transformer is None
    assert pipe.get_branch_adapters() == {"conditional": [], "unconditional": ["unconditional"]}
    for mine, theirs in zip(passes(pipe), passes(reference)):
        torch.testing.assert_close(mine, theirs, **TOLERANCE)
    torch.testing.assert_close(generate(pipe), generate(reference), **TOLERANCE)
    # The default preset is the two-branch one again (quality_48's guidance), not the distilled one.
    schedule = pipe.resolve_sampling(None, None, None, None, None, None)[0]
    assert len(schedule) == 48 and schedule[0] == 7.0


def test_loha_as_the_unconditional_lora(tmp_path):
    pipe = single()
    path, tensors = loha_file(tmp_path, "onetrainer_comfy")
    reference = two_transformers(merged_lycoris(pipe.transformer, tensors))
    pipe.load_unconditional_lora(str(path), adapter_name="uncond")
    assert type(pipe.transformer.layers[1].attention.to_k).__module__ == "peft.tuners.loha.layer"
    for mine, theirs in zip(passes(pipe), passes(reference)):
        torch.testing.assert_close(mine, theirs, **TOLERANCE)


def test_only_one_transformer_exists_in_the_pipeline(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "repo")
    # Never read: a pipeline loaded without the unconditional transformer does not open its weights.
    weights = tmp_path / "repo" / "unconditional_transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    pipe = Ideogram4Pipeline.from_pretrained(tmp_path / "repo", unconditional_transformer=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_unconditional_lora(random_original(seed=4, prefix="diffusion_model."))

    models = {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    assert sorted(models) == ["text_encoder", "transformer", "vae"]
    base = [p for n, p in pipe.transformer.named_parameters() if "lora_" not in n]
    assert sum(p.numel() for p in base) == sum(p.numel() for p in tiny_pipeline().transformer.parameters())
    assert generate(pipe).shape == (1, 256, CONFIG["in_channels"])


def test_save_and_reload_the_unconditional_adapter(tmp_path):
    pipe = single()
    pipe.load_unconditional_lora(random_original(seed=22, prefix="diffusion_model."), adapter_name="u")
    expected = passes(pipe)
    pipe.save_lora_adapter(tmp_path / "saved", adapter_name="u")
    again = single()
    again.load_unconditional_lora(str(tmp_path / "saved"), adapter_name="u")
    for mine, theirs in zip(passes(again), expected):
        torch.testing.assert_close(mine, theirs, **TOLERANCE)
    with_diffs = single()
    with_diffs.load_unconditional_lora(
        {
            **random_original(seed=22, prefix="diffusion_model."),
            "diffusion_model.final_layer.linear.diff_b": torch.ones(128),
        }
    )
    with pytest.raises(
        ValueError, match=r"carries weight differences \(1 modules' .*keep the file it was loaded from"
    ):
        with_diffs.save_lora_adapter(tmp_path / "refused", adapter_name="unconditional")
    assert not (tmp_path / "refused").exists()


def test_unload_restores_the_single_branch_output(tmp_path):
    pipe = single()
    distilled = generate(pipe, guidance_schedule=[1.0, 1.0])
    pipe.load_unconditional_lora(random_original(seed=6, prefix="diffusion_model."))
    assert not torch.equal(generate(pipe), generate(pipe, guidance_schedule=[1.0, 1.0, 1.0]))
    # At guidance 1.0 the unconditional pass does not run: the output is the single-branch one, bit for bit.
    assert torch.equal(generate(pipe, guidance_schedule=[1.0, 1.0]), distilled)

    pipe.unload_unconditional_lora()

    assert pipe.unconditional_adapter is None and not pipe.has_unconditional_branch
    assert torch.equal(generate(pipe, guidance_schedule=[1.0, 1.0]), distilled)
    with pytest.raises(ValueError, match=r"guidance must be 1.0 at every step.*`load_unconditional_lora`"):
        generate(pipe)
    with pytest.raises(ValueError, match=r"No unconditional LoRA is loaded"):
        pipe.unload_unconditional_lora()
    # Deleting the adapter by name, or unloading every LoRA, leaves single-transformer mode the same way.
    for leave in (lambda p: p.delete_adapters("unconditional"), lambda p: p.unload_lora_weights()):
        pipe.load_unconditional_lora(random_original(seed=6, prefix="diffusion_model."))
        leave(pipe)
        assert pipe.unconditional_adapter is None and pipe.get_list_adapters() == {}
        assert torch.equal(generate(pipe, guidance_schedule=[1.0, 1.0]), distilled)


# --------------------------------------------------------------------------------------------------------------------
# Adapters per branch


def test_a_style_lora_changes_only_the_conditional_pass(tmp_path):
    pipe = single()
    uncond = random_original(seed=8, prefix="diffusion_model.")
    style = random_original(seed=9, prefix="diffusion_model.")
    pipe.load_unconditional_lora(uncond)
    conditional, unconditional = passes(pipe)

    pipe.load_lora_weights(style, adapter_name="style")

    assert pipe.get_branch_adapters() == {"conditional": ["style"], "unconditional": ["unconditional"]}
    with_style = passes(pipe)
    assert torch.equal(with_style[1], unconditional)  # the unconditional pass: untouched, bit for bit
    styled = two_transformers(merged_by_hand(base_transformer(), uncond))
    styled.transformer = merged_by_hand(styled.transformer, style)
    torch.testing.assert_close(with_style[0], passes(styled)[0], **TOLERANCE)
    assert not torch.allclose(with_style[0], conditional)
    # The whole call equals the two-transformer pipeline with the style LoRA on the conditional transformer only.
    torch.testing.assert_close(generate(pipe), generate(styled), **TOLERANCE)

    # branch="both": the style LoRA runs in the unconditional pass too, at the weight set for it.
    pipe.set_adapters(["style"], [0.5], branch="both")
    assert pipe.get_branch_adapters() == {"conditional": ["style"], "unconditional": ["unconditional", "style"]}
    both = two_transformers(merged_by_hand(merged_by_hand(base_transformer(), uncond), style, scale=0.5))
    both.transformer = merged_by_hand(both.transformer, style, scale=0.5)
    for mine, theirs in zip(passes(pipe), passes(both)):
        torch.testing.assert_close(mine, theirs, **TOLERANCE)

    # A branch's call sets that pass only; the unconditional pass gets its own adapters back, the same bits again.
    pipe.set_adapters(["style"], [1.0])
    assert pipe.get_branch_adapters()["unconditional"] == ["unconditional", "style"]
    pipe.set_adapters(["unconditional"], branch="unconditional")
    assert pipe.get_branch_adapters() == {"conditional": ["style"], "unconditional": ["unconditional"]}
    assert torch.equal(passes(pipe)[1], unconditional)


def test_unconditional_branch_weights_and_runtime_scale(tmp_path):
    pipe = single()
    uncond = random_original(seed=10, prefix="diffusion_model.")
    style = random_original(seed=11, prefix="diffusion_model.")
    pipe.load_unconditional_lora(uncond)
    pipe.load_lora_weights(style, adapter_name="style")

    # The unconditional adapter's weight is set on its branch; the conditional pass keeps its adapters.
    pipe.set_adapters(["unconditional"], [0.5], branch="unconditional")
    assert pipe.get_branch_adapters() == {"conditional": ["style"], "unconditional": ["unconditional"]}
    half = two_transformers(merged_by_hand(base_transformer(), uncond, scale=0.5))
    torch.testing.assert_close(passes(pipe)[1], passes(half)[1], **TOLERANCE)
    pipe.set_adapters(["unconditional"], branch="unconditional")

    # attention_kwargs' scale scales the conditional pass only.
    reference = two_transformers(merged_by_hand(base_transformer(), uncond))
    reference.transformer = merged_by_hand(reference.transformer, style, scale=0.3)
    for mine, theirs in zip(passes(pipe, scale=0.3), passes(reference)):
        torch.testing.assert_close(mine, theirs, **TOLERANCE)

    # disable_lora(): no adapter in the conditional pass; the unconditional pass keeps the unconditional LoRA only,
    # even when its branch also runs the style adapter.
    pipe.set_adapters(["unconditional", "style"], branch="unconditional")
    pipe.disable_lora()
    assert pipe.get_branch_adapters() == {"conditional": [], "unconditional": ["unconditional"]}
    plain = two_transformers(merged_by_hand(base_transformer(), uncond))
    for mine, theirs in zip(passes(pipe), passes(plain)):
        torch.testing.assert_close(mine, theirs, **TOLERANCE)
    pipe.enable_lora()
    assert pipe.get_branch_adapters() == {"conditional": ["style"], "unconditional": ["unconditional", "style"]}


def test_branch_scopes_with_two_transformers(tmp_path):
    pipe = tiny_pipeline()
    style = random_original(seed=12, prefix="diffusion_model.")
    pipe.load_lora_weights(style, adapter_name="a")
    pipe.load_lora_weights(style, adapter_name="u", target="unconditional_transformer")
    pipe.load_lora_weights(style, adapter_name="b", target="unconditional_transformer")
    pipe.set_adapters(["b"], branch="unconditional")
    assert pipe.get_branch_adapters() == {"conditional": ["a"], "unconditional": ["b"]}
    pipe.set_adapters(["u", "b"], [1.0, 0.5], branch="unconditional")
    assert pipe.get_branch_adapters() == {"conditional": ["a"], "unconditional": ["u", "b"]}
    assert pipe.unconditional_transformer.layers[0].attention.to_q.scaling["b"] == 0.5  # alpha folded: scale 1
    with pytest.raises(
        ValueError, match=r"\['a'\] not loaded in `unconditional_transformer`, which holds \['b', 'u'\]"
    ):
        pipe.set_adapters(["a"], branch="unconditional")
    with pytest.raises(ValueError, match=r"`branch='negative'` is not a branch; use one of"):
        pipe.set_adapters(["a"], branch="negative")
    with pytest.raises(ValueError, match=r"adapter_weights\[0\]"):
        pipe.set_adapters(["a"], [float("nan")], branch="conditional")
    distilled = single()
    with pytest.raises(
        ValueError, match=r"`branch='unconditional'`: this pipeline has no `unconditional_transformer`"
    ):
        distilled.set_adapters(["a"], branch="unconditional")


def test_scoping_refusals_in_single_transformer_mode(tmp_path):
    pipe = single()
    pipe.load_unconditional_lora(random_original(seed=13, prefix="diffusion_model."))
    pipe.load_lora_weights(random_original(seed=14, prefix="diffusion_model."), adapter_name="style")
    with pytest.raises(ValueError, match=r"names the unconditional LoRA 'unconditional', which runs in the uncond"):
        pipe.set_adapters(["style", "unconditional"])
    with pytest.raises(ValueError, match=r"names the unconditional LoRA 'unconditional'"):
        pipe.set_adapters(["unconditional"], branch="both")
    with pytest.raises(
        ValueError, match=r"runs on the unconditional LoRA 'unconditional'; name it .*\['unconditional', 'style'\]"
    ):
        pipe.set_adapters(["style"], branch="unconditional")
    # Made active through the transformer itself, the unconditional adapter still stays out of the conditional pass.
    expected = passes(pipe)
    pipe.transformer.set_adapters(["style", "unconditional"])
    assert pipe.get_branch_adapters() == {"conditional": ["style"], "unconditional": ["unconditional"]}
    for mine, theirs in zip(passes(pipe), expected):
        assert torch.equal(mine, theirs)
    with pytest.raises(ValueError, match=r"`fuse_lora` is not available in single-transformer mode"):
        pipe.fuse_lora()
    with pytest.raises(ValueError, match=r"`branch='negative'`: a pass is 'conditional' or 'unconditional'"):
        with pipe.branch_pass("negative"):
            pass
    # Fused through the transformer itself: refused when the pipeline is called, before any model work.
    pipe.transformer.fuse_lora(adapter_names=["style"])
    with pytest.raises(ValueError, match=r"An adapter was fused into `transformer`'s weights"):
        generate(pipe)
    pipe.transformer.unfuse_lora()
    # An unconditional transformer set beside the LoRA: ambiguous, refused by name.
    pipe.unconditional_transformer = copy.deepcopy(pipe.transformer)
    with pytest.raises(ValueError, match=r"both an `unconditional_transformer` and the unconditional LoRA"):
        generate(pipe)


def test_load_refusals_name_the_problem(tmp_path):
    tensors = random_original(seed=15, prefix="diffusion_model.")
    with pytest.raises(ValueError, match=r"has an `unconditional_transformer`.*unconditional_transformer=None"):
        tiny_pipeline().load_unconditional_lora(tensors)
    pipe = single()
    with pytest.raises(ValueError, match=r"keys name the conditional branch or both.*conditional_transformer\."):
        pipe.load_unconditional_lora(random_original(seed=15, prefix="conditional_transformer."))
    both = {**tensors, **random_original(seed=16, prefix="unconditional_transformer.")}
    with pytest.raises(ValueError, match=r"keys name the conditional branch or both branches \(prefixes"):
        pipe.load_unconditional_lora(both)
    bad_diffs = {
        **tensors,
        "diffusion_model.layers.0.feed_forward.w1.diff": torch.zeros(256, 128),
        "diffusion_model.layers.0.ffn_norm1.diff": torch.zeros(64),
        "diffusion_model.layers.0.attention.norm_q.diff_b": torch.zeros(64),
        "diffusion_model.layers.9.ffn_norm1.diff": torch.zeros(128),
        "diffusion_model.input_proj.diff_b": torch.full((128,), float("nan")),
    }
    with pytest.raises(ValueError) as error:
        pipe.load_unconditional_lora(bad_diffs)
    assert str(error.value).splitlines() == [
        "The unconditional LoRA's weight differences do not fit the model; nothing was loaded.",
        "  - `diffusion_model.input_proj.diff_b` holds NaN or infinite values",
        "  - `diffusion_model.layers.0.attention.norm_q.diff_b`: `layers.0.attention.norm_q` is not a Linear with a "
        "bias",
        "  - `diffusion_model.layers.0.feed_forward.w1.diff`: `layers.0.feed_forward.w1` is a Linear weight (LoRA "
        "factors hold those); `.diff` patches RMSNorm and embedding weights",
        "  - `diffusion_model.layers.0.ffn_norm1.diff`: torch.float32 [64], the model's weight is [128] floats",
        "  - `diffusion_model.layers.9.ffn_norm1.diff`: the model has no module `layers.9.ffn_norm1`",
    ]
    with pytest.raises(ValueError, match=r"holds no LoRA factors"):
        pipe.load_unconditional_lora({"diffusion_model.layers.0.ffn_norm1.diff": torch.zeros(128)})
    with pytest.raises(ValueError, match=r"`adapter_name=''` must be a non-empty name"):
        pipe.load_unconditional_lora(tensors, adapter_name="")
    assert pipe.get_list_adapters() == {} and pipe.unconditional_adapter is None  # nothing was loaded
    pipe.load_lora_weights(tensors, adapter_name="style")
    with pytest.raises(ValueError, match=r"An adapter named 'style' is already loaded in `transformer`"):
        pipe.load_unconditional_lora(tensors, adapter_name="style")
    pipe.fuse_lora()
    with pytest.raises(ValueError, match=r"An adapter is fused into `transformer`'s weights"):
        pipe.load_unconditional_lora(tensors)
    pipe.unfuse_lora()
    pipe.load_unconditional_lora(tensors)
    with pytest.raises(ValueError, match=r"The unconditional LoRA 'unconditional' is already loaded"):
        pipe.load_unconditional_lora(tensors, adapter_name="other")
    # A LoRA for the unconditional branch through load_lora_weights points here.
    with pytest.raises(ValueError, match=r"which this pipeline does not have.*`load_unconditional_lora`"):
        pipe.load_lora_weights(tensors, target="unconditional_transformer")


# --------------------------------------------------------------------------------------------------------------------
# fp8 weights, offload, and pipelines sharing the transformer


def test_fp8_release_weights(tmp_path):
    from test_lora import fp8_transformer_pipeline

    pipe, reference = fp8_transformer_pipeline()
    pipe.unconditional_transformer = None
    uncond = random_original(seed=17, prefix="diffusion_model.")
    pipe.load_unconditional_lora(uncond)
    expected = two_transformers(merged_by_hand(reference, uncond))
    expected.transformer = reference
    for mine, theirs in zip(passes(pipe), passes(expected)):
        torch.testing.assert_close(mine, theirs, **TOLERANCE)


def test_model_offload_moves_one_transformer_never_two(monkeypatch):
    """Residency simulated (test_offload.simulate_residency). The transformer moves once per call: both passes of every step run on it."""
    uncond = random_original(seed=18, prefix="diffusion_model.")
    expected_pipe = single(seed=3)
    expected_pipe.load_unconditional_lora(uncond)
    expected = generate(expected_pipe)
    pipe = single(seed=3)
    pipe.load_unconditional_lora(uncond)
    pipe.enable_model_cpu_offload(device="cpu")
    moves, peak = simulate_residency(pipe, ("text_encoder", "transformer", "vae"), monkeypatch)
    forwards = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: forwards.append(1))
    out = generate(pipe)
    handle.remove()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert len(forwards) == 3 + 2  # three conditional passes, two unconditional ones (guidance 1.0 in between)
    assert moves == ["text_encoder", "transformer"]
    assert max(peak) == 1


@needs_cpu_group_offload
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level", "per_module"])
def test_group_and_per_module_offload_with_weight_differences(offload_type):
    from accelerate import cpu_offload

    uncond = random_original(seed=19, prefix="diffusion_model.")
    generator = seeded(2)
    uncond.update(
        {
            "diffusion_model.layers.0.ffn_norm2.diff": torch.randn(128, generator=generator) * 0.1,
            "diffusion_model.layers.1.adaln_modulation.diff_b": torch.randn(512, generator=generator) * 0.1,
            "diffusion_model.embed_image_indicator.diff": torch.randn(2, 128, generator=generator) * 0.1,
        }
    )
    merged = merged_by_hand(
        base_transformer(seed=3), {k: v for k, v in uncond.items() if not k.endswith((".diff", ".diff_b"))}
    )
    with torch.no_grad():  # the differences added by hand
        merged.layers[0].ffn_norm2.weight += uncond["diffusion_model.layers.0.ffn_norm2.diff"]
        merged.layers[1].adaln_modulation.bias += uncond["diffusion_model.layers.1.adaln_modulation.diff_b"]
        merged.embed_image_indicator.weight += uncond["diffusion_model.embed_image_indicator.diff"]
    reference = two_transformers(merged, seed=3)
    pipe = single(seed=3)
    pipe.load_unconditional_lora(uncond)
    for mine, theirs in zip(passes(pipe), passes(reference)):
        torch.testing.assert_close(mine, theirs, **TOLERANCE)
    expected = generate(pipe)
    torch.testing.assert_close(expected, generate(reference), **TOLERANCE)
    if offload_type == "per_module":  # the hooks of sequential offload, on a machine without an accelerator
        for name in ("text_encoder", "transformer", "vae"):
            cpu_offload(getattr(pipe, name), torch.device("cpu"))
    else:
        extra = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
        pipe.enable_group_offload(
            onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type=offload_type, **extra
        )
    torch.testing.assert_close(generate(pipe), expected, rtol=0, atol=0)


def test_pipelines_made_with_from_pipe_share_single_transformer_mode():
    pipe = single()
    pipe.load_unconditional_lora(random_original(seed=20, prefix="diffusion_model."))
    img2img = Ideogram4Img2ImgPipeline.from_pipe(pipe)
    assert img2img.unconditional_adapter == "unconditional" and img2img.has_unconditional_branch
    assert img2img.get_branch_adapters() == pipe.get_branch_adapters()


def test_caches_in_single_transformer_mode_keep_the_branches_apart_or_are_refused(tmp_path):
    """Both passes run on one transformer: FirstBlockCache keeps a state per branch (`cache_context`), a MagCache must
    count each branch's steps, and Pyramid Attention Broadcast (one state per attention module) is refused."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig

    pipe = single()
    pipe.load_unconditional_lora(str(make_lora("original", tmp_path)[0]))
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))  # never skips: same output as no cache
    torch.testing.assert_close(generate(pipe), generate(single_with(tmp_path)), rtol=0, atol=0)
    pipe.transformer.disable_cache()
    pipe.transformer.enable_cache(MagCacheConfig(num_inference_steps=3, mag_ratios=[1.0] * 3))
    with pytest.raises(ValueError, match=r"the unconditional pass's transformer` has a MagCacheConfig\(num_inference"):
        generate(pipe)  # 3 conditional steps, 2 unconditional ones
    pipe.transformer.disable_cache()
    pipe.transformer.enable_cache(PyramidAttentionBroadcastConfig(current_timestep_callback=lambda: 500))
    with pytest.raises(ValueError, match=r"Pyramid Attention Broadcast keeps one state per attention module"):
        generate(pipe)


def single_with(tmp_path):
    pipe = single()
    pipe.load_unconditional_lora(str(make_lora("original", tmp_path / "again")[0]))
    return pipe


def test_batch_refuses_single_transformer_mode_that_the_model_does_not_name(tmp_path):
    from diffusers_ideogram4.batch import generate_batch
    from diffusers_ideogram4.recipe import ModelSpec

    pipe = single()
    pipe.load_unconditional_lora(str(make_lora("unprefixed", tmp_path)[0]))
    with pytest.raises(
        ValueError,
        match=r"runs with single-transformer mode \(the unconditional LoRA 'unconditional'\) that `model` does not "
        r"name \(ModelSpec\(\.\.\., unconditional_lora=\.\.\.\)\)",
    ):
        generate_batch(pipe, [{"caption": CAPTION}], tmp_path / "out", model=ModelSpec("tiny-random", seed=0))
    assert not (tmp_path / "out").exists()


def test_weight_differences_follow_the_dtype_of_each_pass():
    """A difference is converted once per device and dtype: after a float32 pass, a bfloat16 pass adds it in
    bfloat16 (not the float32 copy, which would promote the output)."""
    from diffusers_ideogram4.unconditional_lora import WeightDiffs

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    difference = torch.tensor([0.1, -0.2, 0.3])
    diffs = WeightDiffs(model, {"0": {"bias": difference}})
    x = torch.randn(2, 4, generator=seeded(0))
    with diffs.applied():
        full = model(x)
    assert torch.equal(full, torch.nn.functional.linear(x, model[0].weight, model[0].bias) + difference)
    model.to(torch.bfloat16)
    with diffs.applied():
        half = model(x.bfloat16())
    assert half.dtype == torch.bfloat16
    plain = torch.nn.functional.linear(x.bfloat16(), model[0].weight, model[0].bias)
    assert torch.equal(half, plain + difference.bfloat16())
    assert torch.equal(model(x.bfloat16()), plain)  # outside the unconditional pass: nothing added


def test_a_weight_difference_given_twice_is_refused():
    tensors = random_original(seed=15, prefix="diffusion_model.")
    twice = {
        **tensors,
        "diffusion_model.layers.0.ffn_norm1.diff": torch.zeros(128),
        "unconditional_transformer.layers.0.ffn_norm1.diff": torch.ones(128),
    }
    pipe = single()
    with pytest.raises(ValueError) as error:
        pipe.load_unconditional_lora(twice)
    assert str(error.value).splitlines() == [
        "The LoRA file is malformed; nothing was loaded.",
        "  - weight differences given twice: unconditional_transformer.layers.0.ffn_norm1.diff (and "
        "diffusion_model.layers.0.ffn_norm1.diff)",
    ]
    assert pipe.get_list_adapters() == {} and pipe.unconditional_adapter is None
