"""Pipeline: parity with a reference run of the sampler math, errors before model work, round trips, offload."""

import json
import math
import re
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch

from conftest import CAPTION, CAPTION_SHORT, needs_peer, seeded
from diffusers_ideogram4 import Ideogram4Pipeline, Ideogram4Transformer2DModel
from diffusers_ideogram4.testing import tiny_pipeline


H, W = 256, 320  # a 16 x 20 token grid


def reference_latents(pipe, prompts, latents, guidance, mu, std, height, width):
    """Ideogram 4's sampler written out from SPEC 3-5, using diffusers' built-in transformer class and text
    encoding (left padding to the longest prompt, as the reference release), on the pipeline's weights."""
    import diffusers

    peer = {}
    for name in ("transformer", "unconditional_transformer"):
        ours = getattr(pipe, name)
        peer[name] = diffusers.Ideogram4Transformer2DModel(**ours.config).eval()
        peer[name].load_state_dict(ours.state_dict())
    reference = diffusers.Ideogram4Pipeline(
        scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, **peer
    )
    grid_h, grid_w = height // 16, width // 16
    lengths = [
        len(
            pipe.tokenizer.apply_chat_template(
                [{"role": "user", "content": [{"type": "text", "text": p}]}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        )
        for p in prompts
    ]
    longest = max(lengths)
    features, position_ids, segment_ids, indicator = reference.encode_prompt(
        prompts, grid_h, grid_w, max_sequence_length=longest, device=torch.device("cpu")
    )
    mu_shifted = mu + 0.5 * math.log(height * width / 512**2)
    steps = len(guidance)

    def tau(u):
        z = NormalDist().inv_cdf(u) if 0 < u < 1 else (-math.inf if u == 0 else math.inf)
        value = 1 - (1 / (1 + math.exp(-(mu_shifted + std * z))) if math.isfinite(z) else float(z > 0))
        return min(max(value, 1 / (1 + math.exp(9))), 1 / (1 + math.exp(-7.5)))

    taus = [tau(1 - k / steps) for k in range(steps + 1)]
    z = latents.clone()
    batch = z.shape[0]
    for k in range(steps):
        t = torch.full((batch,), taus[k])
        with torch.no_grad():
            packed = torch.cat((torch.zeros(batch, longest, 128), z), dim=1)
            v_cond = peer["transformer"](packed, t, features, position_ids, segment_ids, indicator).sample[:, longest:]
            v_uncond = peer["unconditional_transformer"](
                z,
                t,
                torch.zeros(batch, grid_h * grid_w, features.shape[-1]),
                position_ids[:, longest:],
                segment_ids[:, longest:],
                indicator[:, longest:],
            ).sample
        v = guidance[k] * v_cond + (1 - guidance[k]) * v_uncond
        z = z + v * (taus[k + 1] - taus[k])
    return z


@needs_peer
@pytest.mark.parametrize("prompts", [[CAPTION], [CAPTION, CAPTION_SHORT]], ids=["one", "two-lengths"])
def test_latents_match_reference_sampler(tiny_pipe, prompts):
    guidance = [7.0, 7.0, 3.0, 1.0]
    noise = torch.randn(len(prompts), (H // 16) * (W // 16), 128, generator=seeded(1))
    ours = tiny_pipe(
        prompts, height=H, width=W, guidance_schedule=guidance, mu=0.3, std=1.5, latents=noise, output_type="latent"
    ).images
    expected = reference_latents(tiny_pipe, prompts, noise, guidance, 0.3, 1.5, H, W)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@needs_peer
def test_guidance_below_one_still_runs_both_branches(tiny_pipe):
    """Only guidance exactly 1.0 skips the unconditional branch; 0.5 and 0.0 use it (0.0: unconditional only)."""
    guidance = [0.5, 0.0]
    noise = torch.randn(1, (H // 16) * (W // 16), 128, generator=seeded(2))
    calls = []
    hook = tiny_pipe.unconditional_transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        ours = tiny_pipe(CAPTION, height=H, width=W, guidance_schedule=guidance, latents=noise, output_type="latent")
    finally:
        hook.remove()
    assert len(calls) == 2
    expected = reference_latents(tiny_pipe, [CAPTION], noise, guidance, 0.0, 1.5, H, W)
    torch.testing.assert_close(ours.images, expected, rtol=1e-5, atol=1e-5)


def test_latents_must_be_float32_noise(tiny_pipe):
    """The sampler runs in float32; noise in another dtype is refused (issue 17: it used to be cast silently)."""
    noise = torch.randn(1, (H // 16) * (W // 16), 128, generator=seeded(3))
    kwargs = dict(height=H, width=W, num_inference_steps=2, output_type="latent")
    assert tiny_pipe(CAPTION, latents=noise, **kwargs).images.dtype == torch.float32
    with pytest.raises(ValueError, match=r"`latents` has dtype torch\.bfloat16; the sampler runs in float32"):
        tiny_pipe(CAPTION, latents=noise.bfloat16(), **kwargs)


def test_batch_of_two_lengths_equals_each_alone(tiny_pipe):
    both = tiny_pipe(
        [CAPTION, CAPTION_SHORT],
        height=H,
        width=W,
        num_inference_steps=3,
        generator=[seeded(1), seeded(2)],
        output_type="latent",
    ).images
    alone = [
        tiny_pipe(c, height=H, width=W, num_inference_steps=3, generator=seeded(s), output_type="latent").images
        for c, s in ((CAPTION, 1), (CAPTION_SHORT, 2))
    ]
    torch.testing.assert_close(both, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_two_prompts_times_two_images_equal_four_single_runs(tiny_pipe):
    """Image i of [A, B] x 2 is prompt (A, A, B, B)[i] with generator i: text features follow their own images."""
    four = tiny_pipe(
        [CAPTION, CAPTION_SHORT],
        height=H,
        width=W,
        num_inference_steps=2,
        num_images_per_prompt=2,
        generator=[seeded(s) for s in range(4)],
        output_type="latent",
    ).images
    alone = [
        tiny_pipe(c, height=H, width=W, num_inference_steps=2, generator=seeded(s), output_type="latent").images
        for s, c in enumerate((CAPTION, CAPTION, CAPTION_SHORT, CAPTION_SHORT))
    ]
    torch.testing.assert_close(four, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_decode_latents_follows_spec_denormalisation():
    """SPEC 5, written out: z * sqrt(running_var + eps) + running_mean per token channel, unpatch
    (B, gh, gw, 2, 2, 32) -> (B, 32, H/8, W/8), decode, clamp to [-1, 1] (with `latent_normalization="vae_bn"`)."""
    pipe = tiny_pipeline(seed=2, latent_normalization="vae_bn")
    bn = pipe.vae.bn
    generator = torch.Generator().manual_seed(3)
    bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=generator))
    bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=generator) * 3 + 0.1)
    tokens = torch.randn(1, (H // 16) * (W // 16), 128, generator=generator)

    z = tokens * torch.sqrt(bn.running_var + bn.eps) + bn.running_mean
    grid = z.view(1, H // 16, W // 16, 2, 2, 32).permute(0, 5, 1, 3, 2, 4).reshape(1, 32, H // 8, W // 8)
    with torch.no_grad():
        expected = (pipe.vae.decode(grid).sample.clamp(-1, 1) + 1) / 2
        images = pipe.decode_latents(tokens, (H // 16, W // 16), output_type="pt")
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)


def test_seed_determinism_and_num_images_per_prompt(tiny_pipe):
    def run(seed):
        kwargs = dict(height=H, width=W, num_inference_steps=2, num_images_per_prompt=2, output_type="latent")
        return tiny_pipe(CAPTION, generator=seeded(seed), **kwargs).images

    first, again, other = run(5), run(5), run(6)
    assert first.shape == (2, (H // 16) * (W // 16), 128)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert not torch.allclose(first[0], first[1])


def test_output_types(tiny_pipe):
    kwargs = dict(height=H, width=W, num_inference_steps=1)
    pil = tiny_pipe(CAPTION, generator=seeded(0), **kwargs).images
    array = tiny_pipe(CAPTION, output_type="np", generator=seeded(0), **kwargs).images
    tensor = tiny_pipe(CAPTION, output_type="pt", generator=seeded(0), **kwargs).images
    assert pil[0].size == (W, H)
    assert array.shape == (1, H, W, 3) and tensor.shape == (1, 3, H, W)
    assert float(array.min()) >= 0.0 and float(array.max()) <= 1.0
    torch.testing.assert_close(torch.from_numpy(array).permute(0, 3, 1, 2), tensor)
    (images,) = tiny_pipe(CAPTION, return_dict=False, generator=seeded(0), **kwargs)
    assert images[0].tobytes() == pil[0].tobytes()


def test_guidance_one_skips_the_unconditional_pass(tiny_pipe, monkeypatch):
    calls = []
    hook = tiny_pipe.unconditional_transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        tiny_pipe(CAPTION, height=H, width=W, guidance_schedule=[3.0, 1.0, 1.0], output_type="latent")
    finally:
        hook.remove()
    assert len(calls) == 1


def test_single_branch_pipeline_runs_with_guidance_one():
    pipe = tiny_pipeline(unconditional=False)
    out = pipe(CAPTION, height=H, width=W, num_inference_steps=2, generator=seeded(0), output_type="latent").images
    assert out.shape == (1, 320, 128) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"no `unconditional_transformer`.*got \[3\.0, 7\.0\]"):
        pipe(CAPTION, height=H, width=W, preset="default_20")


def test_callback_can_replace_latents(tiny_pipe):
    seen = []

    def callback(pipe, step, tau, tensors):
        seen.append((step, round(tau, 6), pipe.guidance_scale))
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = tiny_pipe(
        CAPTION, height=H, width=W, guidance_schedule=[7.0, 3.0], callback_on_step_end=callback, output_type="latent"
    ).images
    assert [s[0] for s in seen] == [0, 1] and [s[2] for s in seen] == [7.0, 3.0]
    assert tiny_pipe.num_timesteps == 2
    assert torch.equal(out, torch.zeros_like(out))


def test_callback_gets_each_step_start_time_and_can_interrupt(tiny_pipe):
    from diffusers_ideogram4.sampler import model_times

    taus = model_times(3, 0.0, 1.5, H, W).tolist()
    seen, calls = [], []
    hook = tiny_pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))

    def callback(pipe, step, tau, tensors):
        seen.append(tau)
        pipe._interrupt = step == 1
        return {}

    try:
        stopped = tiny_pipe(
            CAPTION,
            height=H,
            width=W,
            num_inference_steps=3,
            generator=seeded(4),
            callback_on_step_end=callback,
            output_type="latent",
        ).images
    finally:
        hook.remove()
    assert seen == taus[:2] and len(calls) == 2  # the third step never ran
    two_steps = []
    tiny_pipe(
        CAPTION,
        height=H,
        width=W,
        num_inference_steps=3,
        generator=seeded(4),
        output_type="latent",
        callback_on_step_end=lambda pipe, step, tau, t: two_steps.append(t["latents"]) or {},
    )
    torch.testing.assert_close(stopped, two_steps[1], rtol=0, atol=0)
    tiny_pipe(CAPTION, height=H, width=W, num_inference_steps=1, generator=seeded(4), output_type="latent")
    assert tiny_pipe.interrupt is False


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(height=1000),
            r"`height=1000` is not supported: .* multiple of 16 between 256 and 2048 .* Try `height=992` or `height=1008`\.",
        ),
        (dict(width=4096), r"`width=4096` is not supported: .* Try `width=2048`"),
        (dict(height=128), r"`height=128` is not supported"),
        (
            dict(guidance_schedule=[7.0] * 3, num_inference_steps=4),
            r"`guidance_schedule` has 3 entries but `num_inference_steps` is 4",
        ),
        (
            dict(guidance_scale=5.0, guidance_schedule=[7.0]),
            r"`guidance_scale` and `guidance_schedule` were both given",
        ),
        (dict(latents=torch.zeros(1, 10, 128)), r"`latents` has shape \(1, 10, 128\), expected \(1, 320, 128\)"),
        (
            dict(output_type="jpeg"),
            r"`output_type='jpeg'` is not supported; use one of \['pil', 'np', 'pt', 'latent'\]",
        ),
        (dict(preset="fast"), r"`preset='fast'` is not a preset"),
        (dict(num_inference_steps=0), r"`num_inference_steps` must be a positive int, got 0"),
        (dict(num_images_per_prompt=True), r"`num_images_per_prompt` must be a positive int, got True"),
        (dict(guidance_schedule=[7.0, "high"]), r"`guidance_schedule\[1\]` must be a finite number, got 'high'"),
        (dict(guidance_schedule="73"), r"`guidance_schedule` must be a list of numbers, one per step, got '73'"),
        (dict(guidance_scale=float("nan")), r"`guidance_scale` must be a finite number, got nan"),
        (dict(guidance_scale="7"), r"`guidance_scale` must be a finite number, got '7'"),
        (dict(std=0.0), r"`std=0\.0` must be positive: .*the preset's is 1\.5"),
        (dict(std=-1.5), r"`std=-1\.5` must be positive"),
        (dict(mu="abc"), r"`mu` must be a finite number, got 'abc'"),
        (dict(mu=float("inf")), r"`mu` must be a finite number, got inf"),
        (dict(generator=0), r"`generator` must be a torch\.Generator or a list of them, got 0"),
        (
            dict(generator=[torch.Generator()] * 3),
            r"`generator` is a list of 3 generators, but 1 prompt\(s\) x "
            r"`num_images_per_prompt=1` make 1 images",
        ),
        (
            dict(generator=torch.Generator(), latents=torch.zeros(1, 320, 128)),
            r"`generator` and `latents` were both given",
        ),
        (dict(callback_on_step_end="oops"), r"`callback_on_step_end` must be callable .*got 'oops'"),
        (
            dict(callback_on_step_end_tensor_inputs="latents"),
            r"`callback_on_step_end_tensor_inputs` must be a list of names, got 'latents'",
        ),
        (dict(attention_kwargs={"scale": "x"}), r"`attention_kwargs\['scale'\]` must be a finite number, got 'x'"),
        (dict(prompt={"compositional_deconstruction": {}}), r"`prompt` must be a caption string or a non-empty list"),
        (dict(caption_check="strict"), r"`caption_check='strict'` is not supported"),
        (dict(attention_kwargs={"scal": 0.5}), r"`attention_kwargs` has unsupported keys \['scal'\]"),
    ],
)
def test_bad_input_raises_before_model_work(tiny_pipe, kwargs, message):
    calls = []
    hooks = [
        m.register_forward_pre_hook(lambda *a: calls.append(1))
        for m in (tiny_pipe.text_encoder, tiny_pipe.transformer, tiny_pipe.unconditional_transformer)
    ]
    try:
        with pytest.raises(ValueError, match=message):
            tiny_pipe(**{"prompt": CAPTION, "height": H, "width": W, **kwargs})
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == []


def test_prompt_over_2048_tokens_is_refused_with_its_count(tiny_pipe):
    long_caption = json.dumps({"compositional_deconstruction": {"background": "zq " * 3000, "elements": []}})
    count = len(
        tiny_pipe.tokenize.__self__.tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": long_caption}]}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
    )
    with pytest.raises(ValueError, match=rf"prompt\[0\] has {count} tokens, over the limit of 2048"):
        tiny_pipe(long_caption, height=H, width=W, caption_check="off")


def test_save_and_load_round_trip(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "Ideogram4Transformer2DModel"]
    assert index["text_encoder"] == ["transformers", "Qwen3VLModel"]
    assert index["_class_name"] == "Ideogram4Pipeline" and not list((tmp_path / "pipe").glob("*.py"))
    # Saving leaves the pipeline's own entries as they were.
    assert tiny_pipe.config["transformer"][0].startswith("diffusers_ideogram4")
    kwargs = dict(height=H, width=W, num_inference_steps=2, generator=seeded(3), output_type="latent")
    expected = tiny_pipe(CAPTION, **kwargs).images
    for loaded in (Ideogram4Pipeline.from_pretrained(tmp_path / "pipe"),):
        assert type(loaded) is Ideogram4Pipeline
        assert type(loaded.transformer).__module__.startswith("diffusers_ideogram4")
        assert type(loaded.text_encoder).__module__.startswith("diffusers_ideogram4")
        loaded.set_progress_bar_config(disable=True)
        torch.testing.assert_close(loaded(CAPTION, **{**kwargs, "generator": seeded(3)}).images, expected)


@needs_peer
def test_a_saved_folder_loads_in_diffusers_builtin_pipeline(tiny_pipe, tmp_path):
    """The folder is a plain hub-layout folder: `DiffusionPipeline.from_pretrained` builds diffusers' own pipeline
    (with diffusers' and transformers' own classes) from it, with no remote code."""
    import diffusers

    tiny_pipe.save_pretrained(tmp_path / "pipe")
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert type(loaded) is diffusers.Ideogram4Pipeline
    assert type(loaded.transformer) is diffusers.Ideogram4Transformer2DModel
    assert all(
        torch.equal(v, tiny_pipe.transformer.state_dict()[k]) for k, v in loaded.transformer.state_dict().items()
    )


def test_push_to_hub_uploads_the_finished_folder(tiny_pipe, tmp_path, monkeypatch):
    """`save_pretrained(push_to_hub=True)` (diffusers' own push) uploads the folder with the official entries."""
    from types import SimpleNamespace

    import diffusers.pipelines.pipeline_utils as module
    from huggingface_hub import ModelCard

    uploads, created = [], []
    monkeypatch.setattr(
        module,
        "create_repo",
        lambda repo_id, **kw: created.append((repo_id, kw)) or SimpleNamespace(repo_id=f"me/{repo_id.split('/')[-1]}"),
    )
    monkeypatch.setattr(module, "load_or_create_model_card", lambda *a, **kw: ModelCard("# card\n"))

    def upload(self, folder, repo_id, **kwargs):
        uploads.append(
            (
                repo_id,
                kwargs,
                sorted(p.name for p in Path(folder).iterdir()),
                json.loads((Path(folder) / "model_index.json").read_text()),
            )
        )

    monkeypatch.setattr(Ideogram4Pipeline, "_upload_folder", upload)
    tiny_pipe.save_pretrained(
        tmp_path / "out", push_to_hub=True, repo_id="me/ideogram-tiny", private=True, commit_message="tiny"
    )
    assert created == [("me/ideogram-tiny", {"exist_ok": True, "private": True, "token": None})]
    [(repo_id, kwargs, files, index)] = uploads
    assert repo_id == "me/ideogram-tiny"
    assert kwargs == {"token": None, "commit_message": "tiny", "create_pr": False}
    assert {"model_index.json", "README.md", "transformer"} <= set(files)
    assert index["_class_name"] == "Ideogram4Pipeline"
    assert index["transformer"] == ["diffusers", "Ideogram4Transformer2DModel"]


def test_hub_layout_folder_with_fused_transformer_and_full_qwen3vl(tiny_pipe, tmp_path):
    """A folder laid out like the hub repos: diffusers' class names, a full Qwen3-VL text encoder (vision tower
    included), the transformers in the original fused layout."""
    from safetensors.torch import save_file
    from transformers import Qwen3VLModel

    from diffusers_ideogram4.loading import diffusers_to_original

    root = tmp_path / "hub"
    tiny_pipe.save_pretrained(root)
    full = Qwen3VLModel(tiny_pipe.text_encoder.config)
    full.language_model.load_state_dict(tiny_pipe.text_encoder.language_model.state_dict())
    full.save_pretrained(root / "text_encoder")
    for name in ("transformer", "unconditional_transformer"):
        folder = root / name
        for file in folder.glob("*.safetensors"):
            file.unlink()
        save_file(diffusers_to_original(getattr(tiny_pipe, name).state_dict()), str(folder / "model.safetensors"))
    index = json.loads((root / "model_index.json").read_text())
    index["_class_name"] = "Ideogram4Pipeline"
    (root / "model_index.json").write_text(json.dumps(index))

    loaded = Ideogram4Pipeline.from_pretrained(root)
    assert type(loaded) is Ideogram4Pipeline
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(height=H, width=W, num_inference_steps=2, output_type="latent")
    torch.testing.assert_close(
        loaded(CAPTION, generator=seeded(4), **kwargs).images, tiny_pipe(CAPTION, generator=seeded(4), **kwargs).images
    )


def test_model_cpu_offload_runs_and_matches():
    pipe = tiny_pipeline(seed=2)
    kwargs = dict(height=H, width=W, num_inference_steps=2, output_type="latent")
    expected = pipe(CAPTION, generator=seeded(7), **kwargs).images
    pipe.enable_model_cpu_offload(device="cpu")
    fired = []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda *a: fired.append(1))
    out = pipe(CAPTION, generator=seeded(7), **kwargs).images
    hook.remove()
    assert fired == [1]  # the encoder runs through its own forward, where the offload hook lives
    assert hasattr(pipe.text_encoder, "_hf_hook")
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    "prompts, masked", [([CAPTION], False), ([CAPTION, CAPTION], False), ([CAPTION, CAPTION_SHORT], True)]
)
def test_attention_mask_only_for_mixed_lengths(tiny_pipe, monkeypatch, prompts, masked):
    """Text is padded to the longest prompt, and SDPA gets no mask unless prompts differ in length."""
    import torch.nn.functional as F

    seen = []
    original = F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, **kwargs):
        seen.append((query.shape[2], attn_mask is not None))
        return original(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    tiny_pipe(prompts, height=H, width=W, num_inference_steps=1, guidance_scale=3.0, output_type="latent")
    longest = max(len(tiny_pipe.tokenize([p])[0]) for p in prompts)
    conditional = [has_mask for length, has_mask in seen if length == longest + 320]
    unconditional = [has_mask for length, has_mask in seen if length == 320]
    assert conditional and unconditional  # both branches ran, the conditional one on text + image tokens only
    assert set(conditional) == {masked} and set(unconditional) == {False}


def test_caption_check_modes(tiny_pipe):
    from diffusers_ideogram4 import CaptionError, CaptionWarning

    bad = json.dumps(
        {
            "compositional_deconstruction": {
                "background": "x",
                "elements": [{"type": "text", "bbox": [0, 0, 10.5, 10], "text": "HI", "desc": "d"}],
            }
        }
    )
    calls = []
    hook = tiny_pipe.text_encoder.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(CaptionError) as raised:
            tiny_pipe([CAPTION, bad, "a cat on a mat"], height=H, width=W)
    finally:
        hook.remove()
    assert calls == []
    paths = [(index, issue.path) for index, issue in raised.value.issues]
    assert (1, "compositional_deconstruction.elements[0].bbox[2]") in paths
    assert any(index == 2 for index, _ in paths) and not any(index == 0 for index, _ in paths)
    assert 'caption_check="off"' in str(raised.value)

    with pytest.warns(CaptionWarning):
        out = tiny_pipe(bad, height=H, width=W, num_inference_steps=1, caption_check="warn", output_type="latent")
    assert out.images.shape == (1, 320, 128)


def test_steps_run_on_their_own(tiny_pipe):
    """encode_prompt -> predict_velocity -> euler_step -> decode_latents, outside __call__, equal one call."""
    from diffusers_ideogram4.layout import image_only_layout, pack_layout
    from diffusers_ideogram4.sampler import euler_step, model_times

    pipe = tiny_pipeline(seed=5)
    noise = torch.randn(1, 320, 128, generator=seeded(2))
    expected = pipe(CAPTION, height=H, width=W, guidance_schedule=[4.0], latents=noise, output_type="np").images
    features, lengths = pipe.encode_prompt(pipe.tokenize([CAPTION]), torch.device("cpu"))
    taus = model_times(1, 0.0, 1.5, H, W).tolist()
    with torch.no_grad():
        velocity = pipe.predict_velocity(
            noise,
            taus[0],
            features,
            pack_layout(lengths, H // 16, W // 16),
            image_only_layout(1, H // 16, W // 16),
            4.0,
        )
        image = pipe.decode_latents(euler_step(noise, velocity, taus[0], taus[1]), (H // 16, W // 16), "np")
    assert np.array_equal(image, expected)


@pytest.mark.parametrize("component", ["vae", "text_encoder"])
def test_pipeline_refuses_a_component_checkpoint_with_missing_or_stray_keys(tiny_pipe, tmp_path, component):
    """diffusers and transformers only log such keys and initialise the missing weights at random."""
    from safetensors.torch import load_file, save_file

    tiny_pipe.save_pretrained(tmp_path)
    [weights] = (tmp_path / component).glob("*.safetensors")
    state = load_file(str(weights))
    dropped = sorted(state)[0]
    state.pop(dropped)
    state["stray.weight"] = torch.zeros(3)
    save_file(state, str(weights))
    with pytest.raises(
        ValueError,
        match=rf"The checkpoint at {re.escape(str(tmp_path / component))} does not match the "
        rf"model; it was not used\..*\n  - missing keys: {re.escape(dropped)}\n  - "
        rf"unexpected keys: stray\.weight$",
    ):
        Ideogram4Pipeline.from_pretrained(tmp_path)


def test_loaded_vae_is_diffusers_own_class(tiny_pipe, tmp_path):
    from diffusers import AutoencoderKLFlux2

    tiny_pipe.save_pretrained(tmp_path)
    loaded = Ideogram4Pipeline.from_pretrained(tmp_path)
    assert type(loaded.vae) is AutoencoderKLFlux2
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.vae.state_dict().values(), tiny_pipe.vae.state_dict().values())
    )


def test_components_of_different_models_are_refused_when_the_pipeline_is_built():
    from diffusers import AutoencoderKLFlux2

    from diffusers_ideogram4 import Ideogram4TextEncoder
    from diffusers_ideogram4.testing import tiny_components, tiny_text_encoder_config

    config = tiny_text_encoder_config()
    config.text_config.hidden_size = 24
    components = tiny_components()
    wide = Ideogram4TextEncoder(config)
    with pytest.raises(
        ValueError,
        match=r"`text_encoder` gives 312 features per token \(13 taps x hidden 24\), "
        r"`transformer` expects llm_features_dim=208\. Load every component",
    ):
        Ideogram4Pipeline(**{**components, "text_encoder": wide})
    vae = AutoencoderKLFlux2.from_config({**components["vae"].config, "latent_channels": 16})
    with pytest.raises(
        ValueError,
        match=r"`vae` has 16 latent channels \(64 per 2x2 token\), `transformer` expects "
        r"in_channels=128",
    ):
        Ideogram4Pipeline(**{**components, "vae": vae})


def test_token_channels_come_from_the_transformer_config():
    """A VAE with 4 latent channels and transformers of 16 token channels: the noise, the unpatching and the
    latent statistics all follow the components (nothing assumes 128)."""
    from diffusers import AutoencoderKLFlux2

    from diffusers_ideogram4.constants import TRANSFORMER_SIZES, VAE_SIZES
    from diffusers_ideogram4.testing import tiny_components

    components = tiny_components(seed=3)
    torch.manual_seed(3)
    components["vae"] = AutoencoderKLFlux2(**{**VAE_SIZES["tiny"], "latent_channels": 4}).eval()
    for name in ("transformer", "unconditional_transformer"):
        components[name] = Ideogram4Transformer2DModel(**{**TRANSFORMER_SIZES["tiny"], "in_channels": 16}).eval()
    pipe = Ideogram4Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(height=H, width=W, num_inference_steps=2, guidance_scale=3.0, generator=seeded(0))
    latents = pipe(CAPTION, output_type="latent", **kwargs).images
    assert latents.shape == (1, (H // 16) * (W // 16), 16)
    images = pipe(CAPTION, output_type="np", **kwargs).images
    assert images.shape == (1, H, W, 3) and np.isfinite(images).all()
