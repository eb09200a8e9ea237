"""Latent normalisation (SPEC 10): decode with the reference release's two 128-vectors, not whatever the VAE's `bn`
holds; `latent_normalization="vae_bn"` for parity with diffusers' built-in pipeline; the converter's `--vae-bn`."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import seeded
from diffusers_ideogram4 import Ideogram4Pipeline
from diffusers_ideogram4.layout import (
    REFERENCE_LATENT_NORM_PATH,
    channel_major,
    describe_vae_statistics,
    reference_latent_norm,
    variance_for_scale,
)
from diffusers_ideogram4.testing import tiny_pipeline


SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference_latent_norm.json"
H, W = 256, 256
LOGGER = "diffusers_ideogram4.pipeline_ideogram4"


def other_statistics(vae, seed=4):
    """Statistics that are not the reference's, stored channel-major like the FLUX.2 VAE's own (the real FLUX.2
    numbers are not available offline: any other vectors exercise the same path)."""
    generator = torch.Generator().manual_seed(seed)
    vae.bn.running_mean.copy_(torch.randn(128, generator=generator) * 0.05)
    vae.bn.running_var.copy_(torch.rand(128, generator=generator) * 2 + 2)


def write_reference_into_bn(vae, order="token"):
    scale, shift = reference_latent_norm()
    if order == "channel-major":
        scale, shift = channel_major(scale), channel_major(shift)
    vae.bn.running_mean.copy_(shift)
    vae.bn.running_var.copy_(variance_for_scale(scale, vae.bn.eps))


def reference_decode(pipe, tokens):
    """The reference release's decode, written out: z * latent_scale + latent_shift in token order, unpatchify
    (B, gh, gw, 2, 2, 32) -> (B, 32, H/8, W/8), decode, clamp, map to [0, 1]."""
    data = json.loads(REFERENCE_LATENT_NORM_PATH.read_text())
    z = tokens * torch.tensor(data["latent_scale"]) + torch.tensor(data["latent_shift"])
    latents = z.view(1, H // 16, W // 16, 2, 2, 32).permute(0, 5, 1, 3, 2, 4).reshape(1, 32, H // 8, W // 8)
    with torch.no_grad():
        return (pipe.vae.decode(latents).sample.clamp(-1, 1) + 1) / 2


def tokens(seed=3):
    return torch.randn(1, (H // 16) * (W // 16), 128, generator=seeded(seed))


def test_packaged_vectors_are_the_shared_numbers_byte_for_byte():
    if not SHARED.exists():
        pytest.skip(f"{SHARED} is not beside this checkout")
    assert REFERENCE_LATENT_NORM_PATH.read_bytes() == SHARED.read_bytes()
    scale, shift = reference_latent_norm()
    data = json.loads(SHARED.read_text())
    assert scale.tolist() == torch.tensor(data["latent_scale"]).tolist() and len(data["latent_scale"]) == 128
    assert shift.tolist() == torch.tensor(data["latent_shift"]).tolist() and len(data["latent_shift"]) == 128


@pytest.mark.parametrize("output_type", ["pt", "np"])
def test_reference_decoding_ignores_other_bn_statistics(output_type, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        pipe = tiny_pipeline(seed=2)  # its VAE's bn holds random statistics
    assert "holds statistics that are not the reference vectors" in caplog.text
    other_statistics(pipe.vae)
    with torch.no_grad():
        images = pipe.decode_latents(tokens(), (H // 16, W // 16), output_type=output_type)
    expected = reference_decode(pipe, tokens())
    if output_type == "np":
        expected = expected.permute(0, 2, 3, 1).numpy()
        assert np.abs(images - expected).max() <= 1e-6
    else:
        assert (images - expected).abs().max().item() <= 1e-6

    vae_bn = tiny_pipeline(seed=2, latent_normalization="vae_bn")
    other_statistics(vae_bn.vae)
    with torch.no_grad():
        differs = vae_bn.decode_latents(tokens(), (H // 16, W // 16), output_type="pt")
    assert (differs - reference_decode(pipe, tokens())).abs().max().item() > 1e-3


def test_reference_in_bn_decodes_identically_in_both_settings_and_is_silent(caplog):
    pipes = {}
    for setting in ("reference", "vae_bn"):
        pipe = tiny_pipeline(seed=2, latent_normalization=setting)
        write_reference_into_bn(pipe.vae)
        pipes[setting] = pipe
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        Ideogram4Pipeline(**pipes["reference"].components)
    assert caplog.records == []
    with torch.no_grad():
        images = {s: p.decode_latents(tokens(), (H // 16, W // 16), output_type="pil")[0] for s, p in pipes.items()}
        arrays = {s: p.decode_latents(tokens(), (H // 16, W // 16), output_type="np") for s, p in pipes.items()}
    assert np.array_equal(np.asarray(images["reference"]), np.asarray(images["vae_bn"]))
    assert np.array_equal(arrays["reference"], arrays["vae_bn"])


def test_channel_major_reference_is_named_as_such(caplog):
    pipe = tiny_pipeline(seed=2)
    write_reference_into_bn(pipe.vae, order="channel-major")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        Ideogram4Pipeline(**pipe.components)
    assert "holds the reference vectors in the VAE's channel-major order" in caplog.text


def test_channel_major_scale_beside_another_shift_is_not_named_the_reference():
    pipe = tiny_pipeline(seed=2)
    write_reference_into_bn(pipe.vae, order="channel-major")
    assert describe_vae_statistics(pipe.vae) == "the reference vectors in the VAE's channel-major order"
    pipe.vae.bn.running_mean.add_(0.5)  # the scale still matches, the shift no longer
    assert describe_vae_statistics(pipe.vae) == (
        "statistics that are not the reference vectors in any order (such as the FLUX.2 VAE's own)"
    )


def test_setting_is_checked_saved_and_loadable(tmp_path):
    with pytest.raises(ValueError, match=r"`latent_normalization='flux2'` is not supported; use 'reference'"):
        tiny_pipeline(latent_normalization="flux2")
    tiny_pipeline(seed=1, latent_normalization="vae_bn").save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["latent_normalization"] == "vae_bn"
    assert Ideogram4Pipeline.from_pretrained(tmp_path / "pipe").config.latent_normalization == "vae_bn"
    loaded = Ideogram4Pipeline.from_pretrained(tmp_path / "pipe", latent_normalization="reference")
    assert loaded.config.latent_normalization == "reference"


def test_other_layouts_use_the_vae_bn():
    """A 4-channel VAE (16 token channels) has no reference vectors: its `bn` is used whatever the setting."""
    from diffusers import AutoencoderKLFlux2

    from diffusers_ideogram4.constants import VAE_SIZES
    from diffusers_ideogram4.layout import latent_statistics

    vae = AutoencoderKLFlux2(**{**VAE_SIZES["tiny"], "latent_channels": 4})
    scale, shift, source = latent_statistics(vae, "reference")
    assert source == "vae_bn" and scale.shape == shift.shape == (16,)


def test_converter_writes_the_reference_into_bn_so_bn_decoding_matches_the_reference(tmp_path):
    """`--vae-bn reference`: a pipeline decoding with `bn` (ours with "vae_bn", diffusers' built-in one) then decodes
    like the reference."""
    from diffusers_ideogram4.conversion import convert_original_to_diffusers

    source = tmp_path / "source"
    tiny_pipeline(seed=2).save_pretrained(source)
    output = tmp_path / "out"
    report = convert_original_to_diffusers(source, output, vae_bn="reference", progress=False)
    assert report.verified and any("reference latent normalisation" in note for note in report.notes)

    loaded = Ideogram4Pipeline.from_pretrained(output, latent_normalization="vae_bn")
    scale, shift = reference_latent_norm()
    assert torch.equal(loaded.vae.bn.running_mean, shift)
    assert torch.equal(torch.sqrt(loaded.vae.bn.running_var + loaded.vae.bn.eps), scale)
    with torch.no_grad():
        images = loaded.decode_latents(tokens(), (H // 16, W // 16), output_type="pt")
    assert (images - reference_decode(loaded, tokens())).abs().max().item() <= 1e-6
    # Every other VAE tensor is the source's.
    source_vae = Ideogram4Pipeline.from_pretrained(source).vae.state_dict()
    assert all(torch.equal(v, source_vae[k]) for k, v in loaded.vae.state_dict().items() if not k.startswith("bn."))
