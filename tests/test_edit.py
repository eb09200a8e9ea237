"""Editing: image-to-image and inpainting against the sampler formulas of SPEC 4-5, the kept region exactly, the
geometry of masks and canvases, every error before model work, sharing components, and `ideogram4 edit`."""

import json
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import CAPTION, CAPTION_SHORT, seeded
from diffusers_ideogram4 import (
    BBox,
    Caption,
    Ideogram4Img2ImgPipeline,
    Ideogram4InpaintPipeline,
    Ideogram4Pipeline,
    ObjectElement,
    TextElement,
    expand_canvas,
    expand_caption,
    mask_from_caption,
    repainted_area,
)
from diffusers_ideogram4.canvas import overlay_mask, token_weights
from diffusers_ideogram4.cli import main
from diffusers_ideogram4.sampler import model_times
from diffusers_ideogram4.testing import tiny_pipeline


S = 256  # a 16 x 16 token grid
GRID = S // 16
NORM = Path(__file__).resolve().parents[1] / "src" / "diffusers_ideogram4" / "reference_latent_norm.json"
# CAPTION's only element, a text box [100, 100, 400, 900] -> pixel rows 26..101 and columns 26..229 at 256 x 256:
# token rows 1..6 and columns 1..14 (84 of 256 tokens) are repainted.
REPAINTED_TOKENS = torch.zeros(GRID, GRID, dtype=torch.bool)
REPAINTED_TOKENS[1:7, 1:15] = True
REPAINTED_TOKENS = REPAINTED_TOKENS.flatten()


@pytest.fixture(scope="module")
def pipes():
    t2i = tiny_pipeline(seed=3)
    return t2i, Ideogram4Img2ImgPipeline.from_pipe(t2i), Ideogram4InpaintPipeline.from_pipe(t2i)


def picture(seed=0, width=S, height=S) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def noise(seed=1, batch=1) -> torch.Tensor:
    return torch.randn(batch, GRID * GRID, 128, generator=seeded(seed))


def headline_mask(height=S, width=S) -> PIL.Image.Image:
    return mask_from_caption(CAPTION, 0, height=height, width=width)


def encode_by_hand(pipe, image: PIL.Image.Image) -> torch.Tensor:
    """SPEC 5 backwards: pixels in [-1, 1], the VAE encoder's mode, (ph, pw, c) token channels, the reference vectors."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None].contiguous() * 2 - 1
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mode()  # (1, 32, H/8, W/8)
    batch, channels, height, width = latents.shape
    tokens = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 3, 5, 1)
    tokens = tokens.reshape(batch, height // 2 * width // 2, 4 * channels)  # channel (ph * 2 + pw) * 32 + c
    norm = json.loads(NORM.read_text())
    return (tokens - torch.tensor(norm["latent_shift"])) / torch.tensor(norm["latent_scale"])


def spec_taus(steps, mu, std, height, width) -> list[float]:
    """SPEC 4: tau(u) = clamp(1 - sigmoid(mu' + std * Phi^-1(u)), tau_min, tau_max), walked from u = 1 to u = 0."""
    shifted = mu + 0.5 * math.log(height * width / 512**2)

    def tau(u):
        if u in (0, 1):
            value = float(u == 0)
        else:
            value = 1 - 1 / (1 + math.exp(-(shifted + std * NormalDist().inv_cdf(u))))
        return min(max(value, 1 / (1 + math.exp(9))), 1 / (1 + math.exp(-7.5)))

    return [tau(1 - k / steps) for k in range(steps + 1)]


def first_model_input(pipe, monkeypatch, **kwargs):
    """Run a call and return (latents, tau) that the first velocity was computed from."""
    seen = []
    original = pipe.predict_velocity

    def recording(latents, tau, *args):
        seen.append((latents.clone(), tau))
        return original(latents, tau, *args)

    monkeypatch.setattr(pipe, "predict_velocity", recording)
    pipe(CAPTION, output_type="latent", **kwargs)
    monkeypatch.undo()
    return seen[0]


# --------------------------------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_first_step_latents_are_the_image_noised_to_the_start_time(pipes, monkeypatch, kind):
    _, img2img, inpaint = pipes
    pipe, extra = (img2img, {}) if kind == "img2img" else (inpaint, {"mask_image": headline_mask()})
    image, given = picture(), noise()
    latents, tau = first_model_input(
        pipe, monkeypatch, image=image, strength=0.5, num_inference_steps=4, latents=given, **extra
    )
    taus = model_times(4, 0.0, 1.5, S, S).tolist()  # quality_48's mu and std
    assert tau == taus[2]  # round(0.5 x 4) = 2: the last two steps
    with torch.no_grad():
        x0 = pipe.encode_image(pipe.image_processor.preprocess(image), torch.device("cpu"))
    assert torch.equal(latents, tau * x0 + (1 - tau) * given)


@pytest.mark.parametrize("kind", ["img2img", "inpaint with a full mask"])
def test_strength_one_equals_text_to_image_bit_for_bit(pipes, kind):
    t2i, img2img, inpaint = pipes
    call = dict(num_inference_steps=3, guidance_schedule=[5.0, 3.0, 1.0], output_type="latent")
    if kind == "img2img":
        edited = img2img(CAPTION, image=picture(), strength=1.0, generator=seeded(5), **call).images
    else:
        full = PIL.Image.new("L", (S, S), 255)
        edited = inpaint(CAPTION, image=picture(), mask_image=full, generator=seeded(5), **call).images
    assert torch.equal(edited, t2i(CAPTION, height=S, width=S, generator=seeded(5), **call).images)


def test_img2img_at_strength_one_does_not_encode_the_image(pipes, monkeypatch):
    _, img2img, inpaint = pipes
    encoded = []
    for pipe in (img2img, inpaint):
        monkeypatch.setattr(pipe, "encode_image", lambda pixels, device: encoded.append(pixels.shape) or 1 / 0)
    call = dict(num_inference_steps=2, guidance_scale=1.0, output_type="latent", latents=noise())
    img2img(CAPTION, image=picture(), strength=1.0, **call)  # starts from the noise alone: the image is not read
    assert encoded == []
    with pytest.raises(ZeroDivisionError):  # inpainting at strength 1.0 still needs the image for the kept tokens
        inpaint(CAPTION, image=picture(), mask_image=headline_mask(), **call)
    assert encoded == [(1, 3, S, S)]


def test_inpainting_keeps_the_encoded_original_exactly(pipes):
    _, _, inpaint = pipes
    image = picture(2)
    final = inpaint(
        CAPTION, image=image, mask_image=headline_mask(), num_inference_steps=3, latents=noise(), output_type="latent"
    ).images[0]
    x0 = encode_by_hand(inpaint, image)[0]
    kept = ~REPAINTED_TOKENS
    assert kept.sum() == 172
    assert torch.equal(final[kept], x0[kept])
    assert (final[REPAINTED_TOKENS] - x0[REPAINTED_TOKENS]).abs().amin(dim=-1).gt(0).all()


def test_kept_tokens_follow_the_original_at_every_step(pipes):
    """After step k the kept tokens are x0 noised to taus[k + 1] (the time the step reached), after the last x0."""
    _, _, inpaint = pipes
    image, given, seen = picture(2), noise(3), []
    inpaint(
        CAPTION,
        image=image,
        mask_image=headline_mask(),
        strength=0.75,
        num_inference_steps=4,
        latents=given,
        output_type="latent",
        callback_on_step_end=lambda pipe, step, tau, tensors: seen.append(tensors["latents"][0].clone()) or {},
    )
    taus = model_times(4, 0.0, 1.5, S, S).tolist()[1:]  # round(0.75 x 4) = 3 steps from taus[1]
    x0, kept = encode_by_hand(inpaint, image)[0], ~REPAINTED_TOKENS
    expected = [taus[1] * x0 + (1 - taus[1]) * given[0], taus[2] * x0 + (1 - taus[2]) * given[0], x0]
    assert len(seen) == 3
    for latents, target in zip(seen, expected):
        assert torch.equal(latents[kept], target[kept])


def test_encoding_is_spec_5_backwards():
    pipe = Ideogram4Img2ImgPipeline.from_pipe(tiny_pipeline(seed=1))
    image = picture(3)
    with torch.no_grad():
        ours = pipe.encode_image(pipe.image_processor.preprocess(image), torch.device("cpu"))
    torch.testing.assert_close(ours, encode_by_hand(pipe, image), rtol=0, atol=0)


def test_img2img_equals_the_sampler_written_from_spec(pipes):
    """N = 5, strength 0.5: round(2.5) = 3 steps (half up), from tau_2 with guidance [5, 3, 1]."""
    t2i, img2img, _ = pipes
    image, given, guidance, mu, std = picture(4), noise(6), [7.0, 7.0, 5.0, 3.0, 1.0], 0.3, 1.5
    ours = img2img(
        CAPTION,
        image=image,
        strength=0.5,
        guidance_schedule=guidance,
        mu=mu,
        std=std,
        latents=given,
        output_type="latent",
    ).images

    taus = spec_taus(5, mu, std, S, S)
    with torch.no_grad():
        features, (length,) = t2i.encode_prompt(t2i.tokenize([CAPTION]), torch.device("cpu"))
    text_positions = torch.arange(length)[:, None].expand(length, 3)
    rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    image_positions = torch.stack((torch.zeros_like(rows), rows, cols), dim=-1).reshape(-1, 3) + 65536
    positions = torch.cat((text_positions, image_positions))[None]
    indicator = torch.tensor([3] * length + [2] * GRID * GRID)[None]

    z = taus[2] * encode_by_hand(t2i, image) + (1 - taus[2]) * given
    for k in range(2, 5):
        t = torch.full((1,), taus[k])
        with torch.no_grad():
            packed = torch.cat((torch.zeros(1, length, 128), z), dim=1)
            v_cond = t2i.transformer(
                hidden_states=packed,
                timestep=t,
                encoder_hidden_states=features,
                position_ids=positions,
                segment_ids=None,
                indicator=indicator,
                return_dict=False,
            )[0][:, length:]
            v = v_cond
            if guidance[k] != 1.0:
                v_uncond = t2i.unconditional_transformer(
                    hidden_states=z,
                    timestep=t,
                    encoder_hidden_states=None,
                    position_ids=image_positions[None],
                    segment_ids=None,
                    indicator=indicator[:, length:],
                    return_dict=False,
                )[0]
                v = guidance[k] * v_cond + (1 - guidance[k]) * v_uncond
        z = z + v * (taus[k + 1] - taus[k])
    torch.testing.assert_close(ours, z, rtol=1e-6, atol=1e-6)


def test_strength_runs_the_last_steps_and_the_callback_counts_them(pipes):
    _, img2img, _ = pipes
    seen = []
    img2img(
        CAPTION,
        image=picture(),
        strength=0.75,
        guidance_schedule=[7.0, 6.0, 5.0, 4.0],
        generator=seeded(0),
        output_type="latent",
        callback_on_step_end=lambda pipe, step, tau, tensors: seen.append((step, tau, pipe.guidance_scale)) or {},
    )
    taus = model_times(4, 0.0, 1.5, S, S).tolist()
    assert seen == [(0, taus[1], 6.0), (1, taus[2], 5.0), (2, taus[3], 4.0)]
    assert img2img.num_timesteps == 3


def test_vae_round_trip_keeps_the_token_layout(pipes):
    from diffusers_ideogram4.layout import patchify, unpatchify

    latents = torch.randn(2, 32, 8, 12, generator=seeded(8))
    tokens = patchify(latents)
    assert torch.equal(unpatchify(tokens, 4, 6), latents)
    # token (row r, column c), channel (ph * 2 + pw) * 32 + ch holds latent pixel (2r + ph, 2c + pw) of channel ch
    assert tokens[1, 2 * 6 + 5, (1 * 2 + 0) * 32 + 7] == latents[1, 7, 2 * 2 + 1, 2 * 5 + 0]

    t2i, _, inpaint = pipes
    pixels = inpaint.image_processor.preprocess(picture(5)).contiguous()
    with torch.no_grad():
        mode = t2i.vae.encode(pixels).latent_dist.mode()
        x0 = inpaint.encode_image(pixels, torch.device("cpu"))
        ours = inpaint.decode_latents(x0, (GRID, GRID), "pt")
        direct = inpaint.image_processor.postprocess(t2i.vae.decode(mode).sample.clamp(-1, 1), output_type="pt")
    from diffusers_ideogram4.layout import latent_statistics

    scale, shift, _ = latent_statistics(t2i.vae, "reference")
    restored = unpatchify(x0 * scale + shift, GRID, GRID)
    # normalise -> denormalise: float32 rounding of (x - shift) / scale * scale + shift, a few ulps of max |x|
    torch.testing.assert_close(restored, mode, rtol=0, atol=4 * torch.finfo(torch.float32).eps * mode.abs().max())
    with torch.no_grad():
        decoded = inpaint.image_processor.postprocess(t2i.vae.decode(restored).sample.clamp(-1, 1), output_type="pt")
    assert torch.equal(ours, decoded)
    torch.testing.assert_close(ours, direct, rtol=0, atol=1e-5)  # that rounding, through the random tiny decoder


def test_latent_normalization_setting_carries_over_and_encodes_with_the_vae_bn():
    t2i = tiny_pipeline(seed=1, latent_normalization="vae_bn")
    img2img = Ideogram4Img2ImgPipeline.from_pipe(t2i)
    assert img2img.config.latent_normalization == "vae_bn"
    pixels = img2img.image_processor.preprocess(picture()).contiguous()
    bn = t2i.vae.bn
    with torch.no_grad():
        mode = t2i.vae.encode(pixels).latent_dist.mode()
        from diffusers_ideogram4.layout import patchify

        expected = (patchify(mode) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
        torch.testing.assert_close(img2img.encode_image(pixels, torch.device("cpu")), expected, rtol=0, atol=0)


def test_a_pixel_at_the_threshold_repaints_its_token():
    mask = np.zeros((32, 32), dtype=np.float32)
    mask[3, 20] = 0.5  # diffusers' binarization: >= 0.5 repaints
    mask[20, 3] = np.nextafter(np.float32(0.5), np.float32(0))
    assert token_weights(mask).tolist() == [[0.0, 1.0], [0.0, 0.0]]


def test_a_blurred_token_with_a_repainted_pixel_keeps_weight_one():
    mask = np.zeros((32, 32), dtype=np.float32)
    mask[15, 15] = 1.0  # one pixel: the blur spreads it below 1, the token still repaints fully
    weights = token_weights(mask, mask_blur=4)
    assert weights[0, 0] == 1.0 and 0 < weights[1, 1] < 1


def test_overlay_mask_rounds_the_tint_half_up():
    image = PIL.Image.new("RGB", (2, 1), (0, 0, 0))
    mask = PIL.Image.new("L", (2, 1), 255)
    mask.putpixel((1, 0), 0)
    tinted = overlay_mask(image, mask, color=(255, 0, 0), opacity=0.5)  # alpha round(127.5) = 128
    assert list(tinted.getdata()) == [(128, 0, 0), (0, 0, 0)]


def test_blend_mixes_generated_and_kept_latents_by_weight():
    latents, kept = torch.full((1, 3, 1), 8.0), torch.zeros(1, 3, 1)
    weights = torch.tensor([0.0, 0.25, 1.0]).reshape(1, 3, 1)
    assert Ideogram4InpaintPipeline.blend(latents, kept, weights).flatten().tolist() == [0.0, 2.0, 8.0]


def test_mask_blur_blends_tokens_near_the_edge_and_keeps_the_far_ones(pipes):
    mask = np.zeros((S, S), dtype=np.float32)
    mask[:, 128:] = 1.0
    hard, soft = token_weights(mask), token_weights(mask, mask_blur=4)
    assert (hard[:, 8:] == 1).all() and (hard[:, :8] == 0).all()
    assert (soft[:, 8:] == 1).all() and (soft[:, :6] == 0).all()
    assert ((soft[:, 7] > 0) & (soft[:, 7] < 1)).all()

    _, _, inpaint = pipes
    image = picture(6)
    final = inpaint(
        CAPTION,
        image=image,
        mask_image=mask,
        mask_blur=4,
        num_inference_steps=2,
        latents=noise(),
        output_type="latent",
    ).images[0]
    x0 = encode_by_hand(inpaint, image)[0]
    weights = torch.from_numpy(soft).flatten()
    assert torch.equal(final[weights == 0], x0[weights == 0])
    assert not torch.equal(final[weights > 0], x0[weights > 0])


def test_padding_mask_crop_pastes_the_crop_back_and_keeps_every_other_pixel(pipes):
    _, _, inpaint = pipes
    image = picture(7, width=300, height=200)  # any size: the crop is repainted at height x width
    mask = np.zeros((200, 300), dtype=np.float32)
    mask[60:110, 100:180] = 1.0
    for output_type in ("pil", "np"):
        out = inpaint(
            CAPTION,
            image=image,
            mask_image=mask,
            padding_mask_crop=16,
            height=S,
            width=S,
            num_inference_steps=2,
            generator=seeded(0),
            output_type=output_type,
        ).images
        pixels = np.asarray(out[0]) if output_type == "pil" else np.rint(out[0] * 255).astype(np.uint8)
        assert pixels.shape == (200, 300, 3)
        keep = mask == 0
        assert np.array_equal(pixels[keep], np.asarray(image)[keep])
        assert not np.array_equal(pixels[~keep], np.asarray(image)[~keep])


def test_batches_one_image_for_all_prompts_or_one_per_prompt(pipes):
    _, img2img, _ = pipes
    call = dict(strength=0.6, num_inference_steps=3, output_type="latent")
    a, b = picture(8), picture(9)
    both = img2img([CAPTION, CAPTION_SHORT], image=[a, b], latents=noise(1, batch=2), **call).images
    shared = img2img([CAPTION, CAPTION_SHORT], image=a, latents=noise(1, batch=2), **call).images
    alone = [
        img2img(caption, image=image, latents=noise(1, batch=2)[i : i + 1], **call).images
        for i, (caption, image) in enumerate(((CAPTION, a), (CAPTION_SHORT, b)))
    ]
    torch.testing.assert_close(both, torch.cat(alone), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[0], alone[0][0], rtol=1e-5, atol=1e-5)


def test_pil_numpy_and_tensor_inputs_are_the_same_edit(pipes):
    _, _, inpaint = pipes
    image, mask = picture(15), headline_mask()
    array, mask_array = np.asarray(image, dtype=np.float32) / 255, np.asarray(mask, dtype=np.float32) / 255
    call = dict(strength=0.5, num_inference_steps=2, latents=noise(), output_type="latent")
    expected = inpaint(CAPTION, image=image, mask_image=mask, **call).images
    for image_input, mask_input in (
        (array, mask_array),
        (torch.from_numpy(array).permute(2, 0, 1), torch.from_numpy(mask_array)[None, None]),
        ([image], [mask_array > 0.5]),
    ):
        assert torch.equal(inpaint(CAPTION, image=image_input, mask_image=mask_input, **call).images, expected)


def test_resize_is_explicit_and_resizes_the_mask_with_the_image(pipes):
    _, _, inpaint = pipes
    image = picture(10, width=200, height=300)
    mask = np.zeros((300, 200), dtype=np.float32)
    mask[:150] = 1.0  # the top half
    out = inpaint(
        CAPTION,
        image=image,
        mask_image=mask,
        height=S,
        width=S,
        resize_mode="default",
        num_inference_steps=2,
        latents=noise(),
        output_type="latent",
    ).images[0]
    resized = inpaint.image_processor.preprocess(image, S, S, resize_mode="default")
    with torch.no_grad():
        x0 = inpaint.encode_image(resized, torch.device("cpu"))[0]
    kept = torch.arange(GRID * GRID) >= GRID * GRID // 2  # the bottom 8 token rows
    assert torch.equal(out[kept], x0[kept]) and not torch.equal(out[~kept], x0[~kept])


# --------------------------------------------------------------------------------------------------------------------
# Sharing components


def test_from_pipe_shares_every_component_and_keeps_dtypes():
    t2i = tiny_pipeline(seed=2).to(torch.bfloat16)
    for cls in (Ideogram4Img2ImgPipeline, Ideogram4InpaintPipeline):
        edit = cls.from_pipe(t2i)
        assert type(edit) is cls
        assert set(edit.components) == set(t2i.components)
        for name, component in t2i.components.items():
            assert getattr(edit, name) is component, name
        assert edit.transformer.dtype == torch.bfloat16 and t2i.vae.dtype == torch.bfloat16
    back = Ideogram4Pipeline.from_pipe(edit)
    assert type(back) is Ideogram4Pipeline and back.transformer is t2i.transformer


def test_lora_and_single_branch_pipelines_work_in_editing():
    from peft import LoraConfig

    t2i = tiny_pipeline(seed=4)
    t2i.transformer.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_v"], init_lora_weights=False), "a")
    img2img = Ideogram4Img2ImgPipeline.from_pipe(t2i)
    img2img.set_progress_bar_config(disable=True)
    call = dict(image=picture(), strength=0.5, num_inference_steps=2, output_type="latent")
    with_lora = img2img(CAPTION, latents=noise(), **call).images
    scaled_off = img2img(CAPTION, latents=noise(), attention_kwargs={"scale": 0.0}, **call).images
    img2img.disable_lora()
    without = img2img(CAPTION, latents=noise(), **call).images
    assert torch.equal(scaled_off, without) and not torch.equal(with_lora, without)

    distilled = Ideogram4InpaintPipeline.from_pipe(tiny_pipeline(seed=4, unconditional=False))
    out = distilled(CAPTION, mask_image=headline_mask(), latents=noise(), **call).images
    assert out.shape == (1, GRID * GRID, 128)


def test_from_pretrained_builds_the_edit_pipelines_from_a_saved_folder(pipes, tmp_path):
    t2i, img2img, _ = pipes
    t2i.save_pretrained(tmp_path / "pipe")
    loaded = Ideogram4Img2ImgPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is Ideogram4Img2ImgPipeline
    call = dict(image=picture(), strength=0.5, num_inference_steps=2, latents=noise(), output_type="latent")
    torch.testing.assert_close(loaded(CAPTION, **call).images, img2img(CAPTION, **call).images)


def test_model_cpu_offload_encodes_through_the_vae_hook():
    img2img = Ideogram4Img2ImgPipeline.from_pipe(tiny_pipeline(seed=2))
    img2img.set_progress_bar_config(disable=True)
    call = dict(image=picture(), strength=0.5, num_inference_steps=2, latents=noise(), output_type="latent")
    expected = img2img(CAPTION, **call).images
    img2img.enable_model_cpu_offload(device="cpu")
    assert hasattr(img2img.vae, "_hf_hook")
    torch.testing.assert_close(img2img(CAPTION, **call).images, expected)


# --------------------------------------------------------------------------------------------------------------------
# Geometry


def test_mask_from_caption_covers_the_box_the_preview_draws():
    mask = np.asarray(mask_from_caption(CAPTION, 0, height=256, width=320))
    expected = np.zeros((256, 320), dtype=np.uint8)
    expected[26:102, 32:288] = 255  # y 25.6 -> 26 .. 102.4 -> 102 (exclusive), x 32 .. 288
    assert np.array_equal(mask, expected)
    padded = np.asarray(mask_from_caption(CAPTION, [0], height=256, width=320, pad=5))
    expected[21:107, 27:293] = 255
    assert np.array_equal(padded, expected)
    assert token_weights(mask / 255.0)[1:7, 2:18].all() and token_weights(mask / 255.0).sum() == 6 * 16


@pytest.mark.parametrize("x_min, first_token", [(48, 0), (49, 1), (50, 1)])
def test_box_edges_round_to_pixels_then_to_tokens(x_min, first_token):
    """At 320 px: x_min 48 -> 15.36 -> pixel 15 (token 0); 49 -> 15.68 -> 16 and 50 -> 16.0 -> 16 (token 1)."""
    caption = Caption(background="b", elements=[ObjectElement(desc="d", bbox=BBox(0, x_min, 1000, 600))])
    weights = token_weights(np.asarray(mask_from_caption(caption, 0, height=256, width=320)) / 255.0)
    assert weights[0].nonzero()[0][0] == first_token
    area = np.asarray(repainted_area(mask_from_caption(caption, 0, height=256, width=320)))
    assert area[0].nonzero()[0][0] == 16 * first_token


def test_mask_from_caption_joins_elements_and_clips_the_padding():
    caption = Caption(
        background="b",
        elements=[
            TextElement(text="A", desc="d", bbox=BBox(0, 0, 500, 500)),
            ObjectElement(desc="d", bbox=BBox(500, 500, 1000, 1000)),
        ],
    )
    mask = np.asarray(mask_from_caption(caption.to_json(), [0, 1], height=256, width=256, pad=300))
    assert (mask == 255).all()
    one = np.asarray(mask_from_caption(caption, [0, 1], height=256, width=256))
    assert one[:128, :128].all() and one[128:, 128:].all() and not one[:128, 128:].any()


def test_expand_canvas_places_the_image_and_masks_the_margins():
    image = picture(11)
    canvas, mask = expand_canvas(image, left=16, right=48, bottom=32)
    assert canvas.size == (320, 288) and mask.size == (320, 288)
    assert np.array_equal(np.asarray(canvas)[:256, 16:272], np.asarray(image))
    assert (np.asarray(canvas)[256:] == 127).all()
    expected = np.full((288, 320), 255, dtype=np.uint8)
    expected[:256, 16:272] = 0
    assert np.array_equal(np.asarray(mask), expected)
    weights = token_weights(np.asarray(mask) / 255.0)
    assert (weights[:, 0] == 1).all() and (weights[:, 17:] == 1).all() and (weights[16:] == 1).all()
    assert weights[:16, 1:17].sum() == 0


def test_expand_canvas_margins_off_the_token_grid_repaint_the_shared_tokens():
    _, mask = expand_canvas(picture(12), left=8, right=8)  # 272 = 17 tokens wide
    weights = token_weights(np.asarray(mask) / 255.0)
    assert (weights[:, 0] == 1).all() and (weights[:, 16] == 1).all()  # 8 margin + 8 image pixels each
    assert weights[:, 1:16].sum() == 0


def test_expand_caption_moves_boxes_for_captions_json_and_dicts():
    caption = json.loads(CAPTION)
    moved = expand_caption(CAPTION, width=256, height=256, left=16, right=48, bottom=32)
    # y: 100 * 256 / 288 = 88.9 -> 89, 400 * 256 / 288 = 355.6 -> 356; x: (16000 + 25600) / 320 = 130, 770
    assert isinstance(moved, str) and json.loads(moved)["compositional_deconstruction"]["elements"][0]["bbox"] == [
        89,
        130,
        356,
        770,
    ]
    assert json.loads(moved)["high_level_description"] == caption["high_level_description"]
    assert moved == json.dumps(json.loads(moved), ensure_ascii=False, separators=(",", ":"))
    as_dict = expand_caption(caption, width=256, height=256, left=16, right=48, bottom=32)
    assert as_dict["compositional_deconstruction"]["elements"][0]["bbox"] == [89, 130, 356, 770]
    assert caption["compositional_deconstruction"]["elements"][0]["bbox"] == [100, 100, 400, 900]  # not modified
    built = Caption(background="b", elements=[TextElement(text="T", desc="d", bbox=BBox(100, 100, 400, 900))])
    moved_caption = expand_caption(built, width=256, height=256, left=16, right=48, bottom=32)
    assert isinstance(moved_caption, Caption) and moved_caption.elements[0].bbox == BBox(89, 130, 356, 770)
    # The moved box covers the same pixels of the canvas as the old box of the image (x: 26..229 -> 42..245).
    old = np.asarray(mask_from_caption(built, 0, height=256, width=256))
    new = np.asarray(mask_from_caption(moved_caption, 0, height=288, width=320))
    assert np.array_equal(new[:256, 16:272].any(axis=0), old.any(axis=0))


def test_expand_caption_rounds_half_up():
    caption = Caption(background="b", elements=[ObjectElement(desc="d", bbox=BBox(0, 1, 1000, 3))])
    moved = expand_caption(caption, width=1000, height=1000, right=1000)  # x halves: 0.5 -> 1, 1.5 -> 2
    assert moved.elements[0].bbox == BBox(0, 1, 1000, 2)


# --------------------------------------------------------------------------------------------------------------------
# Errors, before any model work


def _array_mask(value, dtype=np.float32):
    return np.full((S, S), value, dtype=dtype)


@pytest.mark.parametrize(
    "kind, kwargs, message",
    [
        (
            "inpaint",
            dict(mask_image=PIL.Image.new("L", (128, 256))),
            r"`mask_image` is 128x256 pixels but `image` is 256x256; give a mask of the image's size",
        ),
        (
            "inpaint",
            dict(mask_image=_array_mask(255, np.uint8)),
            r"`mask_image` holds values from 255 to 255, outside \[0, 1\]; .*divide a 0\.\.255 mask by 255",
        ),
        (
            "inpaint",
            dict(mask_image=torch.full((S, S), -0.5)),
            r"`mask_image` holds values from -0\.5 to -0\.5, outside \[0, 1\]",
        ),
        ("inpaint", dict(mask_image=_array_mask(np.nan)), r"`mask_image` holds values from nan to nan"),
        (
            "inpaint",
            dict(mask_image=np.zeros((S, S, 3), dtype=np.float32)),
            r"`mask_image` has shape \(256, 256, 3\), an \(H, W, channels\) picture",
        ),
        ("img2img", dict(strength=0.0), r"`strength=0\.0` is outside \(0, 1\]"),
        ("img2img", dict(strength=1.5), r"`strength=1\.5` is outside \(0, 1\]"),
        ("inpaint", dict(strength=-0.1), r"`strength=-0\.1` is outside \(0, 1\]"),
        ("img2img", dict(strength=float("nan")), r"`strength` must be a finite number, got nan"),
        ("img2img", dict(strength="0.5"), r"`strength` must be a finite number, got '0\.5'"),
        (
            "img2img",
            dict(strength=0.1, num_inference_steps=4),
            r"`strength=0\.1` with `num_inference_steps=4` runs round\(0\.1 x 4\) = 0 steps, .*at least 0\.25",
        ),
        (
            "img2img",
            dict(image=picture(width=250)),
            r"`image` is 250x256 pixels \(width x height\), a size Ideogram 4 cannot edit at: `width=250` is not "
            r"supported: .* Try `width=256`\. Crop or pad the image .*resize_mode='default'",
        ),
        (
            "img2img",
            dict(image=picture(width=4000)),
            r"`image` is 4000x256 .*Try `width=2048`",
        ),
        (
            "img2img",
            dict(height=512),
            r"`image` is 256x256 pixels \(width x height\) but `height=512`, `width=256`; .*resize_mode='default'",
        ),
        ("img2img", dict(resize_mode="stretch"), r"`resize_mode='stretch'` is not supported"),
        ("img2img", dict(resize_mode="default"), r"`resize_mode='default'` resizes the image to `height` x `width`"),
        (
            "img2img",
            dict(image=np.zeros((S, S, 3), dtype=np.float32), height=320, resize_mode="fill"),
            r"`resize_mode='fill'` needs PIL images",
        ),
        (
            "img2img",
            dict(image=np.full((S, S, 3), 255, dtype=np.uint8)),
            r"`image` holds values from 255 to 255, outside \[0, 1\]; images hold values in \[0, 1\]",
        ),
        ("img2img", dict(image=torch.zeros(4, S, S)), r"`image` has shape \(4, 256, 256\); an RGB image is"),
        ("img2img", dict(image=None), r"`image` is required"),
        ("img2img", dict(image="in.png"), r"`image` must be a PIL image, a numpy array"),
        (
            "img2img",
            dict(image=[picture(), picture(width=320)]),
            r"`image` holds images of different sizes \[\(256, 256\), \(320, 256\)\]",
        ),
        (
            "img2img",
            dict(prompt=[CAPTION] * 3, image=[picture(), picture()]),
            r"`image` holds 2 images for 3 prompt\(s\); give one for all prompts or one per prompt",
        ),
        ("inpaint", dict(mask_blur=-2), r"`mask_blur=-2\.0` must be >= 0"),
        (
            "inpaint",
            dict(image=np.zeros((S, S, 3), dtype=np.float32), padding_mask_crop=8),
            r"`padding_mask_crop` needs `image` as one PIL image and one mask",
        ),
        (
            "inpaint",
            dict(padding_mask_crop=8, resize_mode="default", height=S),
            r"`padding_mask_crop` and `resize_mode='default'` were both given",
        ),
        (
            "inpaint",
            dict(
                image=picture(width=300, height=200),
                mask_image=PIL.Image.new("L", (300, 200), 255),
                padding_mask_crop=8,
            ),
            r"`image` is 300x200 pixels .* Pass valid `height=` and `width=`: the size the crop around the mask",
        ),
        (
            "inpaint",
            dict(mask_image=PIL.Image.new("L", (S, S)), padding_mask_crop=8),
            r"`padding_mask_crop` needs a mask with a white \(repaint\) region",
        ),
        ("img2img", dict(num_inference_steps=0), r"`num_inference_steps` must be a positive int, got 0"),
        ("img2img", dict(latents=torch.zeros(1, 10, 128)), r"`latents` has shape \(1, 10, 128\)"),
    ],
)
def test_bad_input_raises_before_model_work(pipes, kind, kwargs, message):
    t2i, img2img, inpaint = pipes
    pipe = img2img if kind == "img2img" else inpaint
    call = {"prompt": CAPTION, "image": picture()}
    if kind == "inpaint":
        call["mask_image"] = headline_mask()
    call.update(kwargs)
    calls = []
    modules = (t2i.text_encoder, t2i.transformer, t2i.unconditional_transformer, t2i.vae.encoder, t2i.vae.decoder)
    hooks = [module.register_forward_pre_hook(lambda *a: calls.append(1)) for module in modules]
    try:
        with pytest.raises(ValueError, match=message):
            pipe(**call)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mask_blur=-2), r"^`mask_blur=-2\.0` must be >= 0 \(pixels of feathering; 0 = a hard edge\)\.$"),
        (
            dict(padding_mask_crop=-1),
            r"^`padding_mask_crop` must be an int >= 0 \(pixels around the mask\), got -1\.$",
        ),
        (
            dict(mask_image=None, padding_mask_crop=8),
            r"^`mask_image` is None: inpainting needs a mask",
        ),
        (
            dict(mask_image=PIL.Image.new("L", (S, S)), padding_mask_crop=8),
            r"^`padding_mask_crop` needs a mask with a white \(repaint\) region to crop around; it is black\.$",
        ),
    ],
)
def test_mask_options_are_refused_before_expanding_an_idea(monkeypatch, kwargs, message):
    """The mask options need no model: refused before `prompt_upsampling` expands the idea (they were refused only
    after it, and `padding_mask_crop` without a mask raised a TypeError)."""
    inpaint = Ideogram4InpaintPipeline.from_pipe(tiny_pipeline(prompt_enhancer_head=True))
    expansions = []
    monkeypatch.setattr(Ideogram4InpaintPipeline, "expand_ideas", lambda self, *a: expansions.append(a))
    call = dict(image=picture(), mask_image=headline_mask(), prompt_upsampling=True, generator=seeded(0)) | kwargs
    with pytest.raises(ValueError, match=message):
        inpaint("a lighthouse at dusk", **call)
    assert expansions == []


@pytest.mark.parametrize("pipeline", [Ideogram4Img2ImgPipeline, Ideogram4InpaintPipeline])
def test_a_strength_that_runs_no_step_is_refused_before_expanding_an_idea(monkeypatch, pipeline):
    edit = pipeline.from_pipe(tiny_pipeline(prompt_enhancer_head=True))
    expansions = []
    monkeypatch.setattr(pipeline, "expand_ideas", lambda self, ideas, *a, **kw: expansions.append(ideas) or [CAPTION])
    masks = {} if pipeline is Ideogram4Img2ImgPipeline else dict(mask_image=headline_mask())
    with pytest.raises(ValueError, match=r"^`strength=0.2` with `num_inference_steps=2` runs round\(0.2 x 2\) = 0"):
        edit("an idea", image=picture(), strength=0.2, num_inference_steps=2, prompt_upsampling=True, **masks)
    assert expansions == []


@pytest.mark.parametrize(
    "element, message",
    [
        (1, r"mask_from_caption: `element=1` does not exist: the caption has 1 element\(s\) \(indices 0\.\.0\)"),
        (-1, r"`element=-1` does not exist"),
        ([0, 5], r"`element=5` does not exist"),
        (True, r"`element` must be an element index or a non-empty list of them, got True"),
        ([], r"`element` must be an element index or a non-empty list of them, got \[\]"),
    ],
)
def test_mask_from_caption_refuses_elements_that_do_not_exist(element, message):
    with pytest.raises(ValueError, match=message):
        mask_from_caption(CAPTION, element, height=S, width=S)


def test_geometry_refuses_missing_boxes_and_bad_sizes():
    no_box = Caption(background="b", elements=[ObjectElement(desc="d")])
    with pytest.raises(ValueError, match=r"compositional_deconstruction\.elements\[0\] has no `bbox`"):
        mask_from_caption(no_box, 0, height=S, width=S)
    with pytest.raises(ValueError, match=r"mask_from_caption: `pad` must be an int >= 0 \(pixels\), got -1"):
        mask_from_caption(CAPTION, 0, height=S, width=S, pad=-1)
    with pytest.raises(ValueError, match=r"expand_canvas: `left` must be an int >= 0 \(pixels\), got -16"):
        expand_canvas(picture(), left=-16)
    bad = json.dumps(
        {
            "compositional_deconstruction": {
                "background": "b",
                "elements": [{"type": "obj", "bbox": [5, 0, 1, 9], "desc": "d"}],
            }
        }
    )
    with pytest.raises(
        ValueError, match=r"expand_caption: compositional_deconstruction\.elements\[0\]\.bbox=\[5, 0, 1, 9\]"
    ):
        expand_caption(bad, width=S, height=S, left=16)


# --------------------------------------------------------------------------------------------------------------------
# ideogram4 edit


@pytest.fixture
def files(tmp_path):
    (tmp_path / "caption.json").write_text(CAPTION)
    picture(13).save(tmp_path / "in.png")
    headline_mask().save(tmp_path / "mask.png")
    return tmp_path


@pytest.mark.parametrize("region", [[], ["--element", "0", "--pad", "4"], ["--mask", "mask.png", "--mask-blur", "2"]])
def test_edit_command_writes_the_edited_image(files, capsys, region):
    region = [str(files / word) if word.endswith(".png") else word for word in region]
    code = main(
        ["edit", str(files / "caption.json"), "--image", str(files / "in.png"), *region, "--strength", "0.8"]
        + ["-o", str(files / "out.png"), "--model", "tiny-random", "--steps", "2"]
    )
    assert code == 0
    assert PIL.Image.open(files / "out.png").size == (S, S)
    printed = capsys.readouterr().out
    assert "RANDOM weights" in printed and ("inpainted" if region else "image-to-image") in printed


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--element", "3"], "error: mask_from_caption: `element=3` does not exist"),
        (["--strength", "1.5"], "error: `strength=1.5` is outside (0, 1]"),
        (["--image", "small.png"], "error: `image` is 200x200 pixels (width x height), a size Ideogram 4 cannot"),
        (["--mask", "small.png"], "error: `mask_image` is 200x200 pixels but `image` is 256x256"),
        (["--image", "missing.png"], "missing.png' cannot be read as an image (["),
        (["--pad", "4"], "error: --pad 4 grows --element boxes; add --element"),
        (["--mask-blur", "3"], "error: --mask-blur and --padding-mask-crop shape an inpainting mask"),
        (["--height", "512"], "error: `image` is 256x256 pixels (width x height) but `height=512`"),
    ],
)
def test_edit_command_reports_bad_input_before_loading_a_model(files, capsys, monkeypatch, arguments, message):
    import diffusers_ideogram4.testing

    picture(14, width=200, height=200).save(files / "small.png")
    loads = []
    monkeypatch.setattr(diffusers_ideogram4.testing, "tiny_pipeline", lambda **kw: loads.append(kw))
    arguments = [str(files / word) if word.endswith(".png") else word for word in arguments]
    image = [] if "--image" in arguments else ["--image", str(files / "in.png")]
    code = main(["edit", str(files / "caption.json"), *image, *arguments, "--model", "tiny-random"])
    assert code == 2 and loads == []
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--mask-blur", "-3"], "error: `mask_blur=-3.0` must be >= 0 (pixels of feathering; 0 = a hard edge)."),
        (
            ["--padding-mask-crop", "-1"],
            "error: `padding_mask_crop` must be an int >= 0 (pixels around the mask), got -1.",
        ),
    ],
)
def test_edit_command_refuses_bad_mask_options_before_loading_a_model(files, capsys, monkeypatch, arguments, message):
    """--mask-blur and --padding-mask-crop with a mask were checked only by the pipeline, after the model loaded."""
    import diffusers_ideogram4.testing

    loads = []
    monkeypatch.setattr(diffusers_ideogram4.testing, "tiny_pipeline", lambda **kw: loads.append(kw))
    image_and_mask = ["--image", str(files / "in.png"), "--mask", str(files / "mask.png")]
    code = main(["edit", str(files / "caption.json"), *image_and_mask, *arguments, "--model", "tiny-random"])
    assert code == 2 and loads == []
    assert message in capsys.readouterr().err


def test_inpainting_without_a_mask_is_refused_not_run_as_image_to_image(pipes):
    _, _, inpaint = pipes
    with pytest.raises(ValueError) as refused:
        inpaint(CAPTION, image=picture(), mask_image=None, num_inference_steps=2)
    assert str(refused.value) == (
        "`mask_image` is None: inpainting needs a mask (white = repaint, black = keep). To change the whole image, "
        "use `Ideogram4Img2ImgPipeline.from_pipe(pipe)`, or pass an all-white mask."
    )


def test_image_counts_are_refused_before_expanding_ideas(monkeypatch):
    inpaint = Ideogram4InpaintPipeline.from_pipe(tiny_pipeline(prompt_enhancer_head=True))
    expansions = []
    monkeypatch.setattr(Ideogram4InpaintPipeline, "expand_ideas", lambda self, *a: expansions.append(a))
    with pytest.raises(ValueError) as refused:
        inpaint(
            ["a lighthouse", "a harbour", "a boat"],
            image=[picture(0), picture(1)],
            mask_image=headline_mask(),
            prompt_upsampling=True,
            generator=seeded(0),
        )
    assert str(refused.value) == (
        "`image` holds 2 images for 3 prompt(s); give one for all prompts or one per prompt."
    )
    assert expansions == []
