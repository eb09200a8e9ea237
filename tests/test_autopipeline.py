"""diffusers' AutoPipelines give this package's pipelines for Ideogram 4 while it is imported; other models are
untouched."""

import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image
from diffusers.pipelines import auto_pipeline

from conftest import CAPTION, needs_peer, seeded
from diffusers_ideogram4 import Ideogram4Img2ImgPipeline, Ideogram4InpaintPipeline, Ideogram4Pipeline
from diffusers_ideogram4.testing import tiny_pipeline


CALL = dict(height=256, width=256, num_inference_steps=2, output_type="latent")


def test_the_three_tables_map_ideogram4_to_this_package():
    assert auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING["ideogram4"] is Ideogram4Pipeline
    assert auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING["ideogram4"] is Ideogram4Img2ImgPipeline
    assert auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING["ideogram4"] is Ideogram4InpaintPipeline


def test_other_models_keep_their_pipelines():
    import diffusers

    tables = (auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING, auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING)
    assert [table["flux"] for table in tables] == [diffusers.FluxPipeline, diffusers.FluxImg2ImgPipeline]
    assert tables[0]["stable-diffusion-xl"] is diffusers.StableDiffusionXLPipeline
    ours = {Ideogram4Pipeline, Ideogram4Img2ImgPipeline, Ideogram4InpaintPipeline}
    for table in auto_pipeline.SUPPORTED_TASKS_MAPPINGS:
        assert {name for name, cls in table.items() if cls in ours} <= {"ideogram4"}


def test_from_pipe_moves_between_the_tasks_on_the_same_components():
    pipe = tiny_pipeline(seed=0, latent_normalization="vae_bn")
    image_to_image = AutoPipelineForImage2Image.from_pipe(pipe)
    inpaint = AutoPipelineForInpainting.from_pipe(image_to_image)
    back = AutoPipelineForText2Image.from_pipe(inpaint)
    assert [type(p) for p in (image_to_image, inpaint, back)] == [
        Ideogram4Img2ImgPipeline,
        Ideogram4InpaintPipeline,
        Ideogram4Pipeline,
    ]
    for other in (image_to_image, inpaint, back):
        assert all(other.components[name] is component for name, component in pipe.components.items())
        assert other.config.latent_normalization == "vae_bn"
    back.set_progress_bar_config(disable=True)
    expected = pipe(CAPTION, generator=seeded(1), **CALL).images
    assert torch.equal(back(CAPTION, generator=seeded(1), **CALL).images, expected)


def test_from_pretrained_builds_this_package_s_pipelines(tmp_path):
    pipe = tiny_pipeline(seed=0)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = AutoPipelineForText2Image.from_pretrained(tmp_path / "pipe")
    assert type(loaded) is Ideogram4Pipeline
    assert type(loaded.transformer).__module__ == "diffusers_ideogram4.transformer_ideogram4"
    assert type(AutoPipelineForImage2Image.from_pretrained(tmp_path / "pipe")) is Ideogram4Img2ImgPipeline
    loaded.set_progress_bar_config(disable=True)
    expected = pipe(CAPTION, generator=seeded(2), **CALL).images
    torch.testing.assert_close(loaded(CAPTION, generator=seeded(2), **CALL).images, expected)


@needs_peer
def test_from_pipe_of_diffusers_builtin_pipeline_is_refused_with_the_reason():
    """The built-in pipeline's components (transformers' Qwen3VLModel, diffusers' transformer) cannot run here."""
    import diffusers
    from transformers import Qwen3VLModel

    from diffusers_ideogram4.testing import tiny_components, tiny_text_encoder_config

    components = tiny_components()
    builtin = diffusers.Ideogram4Pipeline(
        scheduler=components["scheduler"],
        vae=components["vae"],
        text_encoder=Qwen3VLModel(tiny_text_encoder_config()),
        tokenizer=components["tokenizer"],
        transformer=diffusers.Ideogram4Transformer2DModel(**components["transformer"].config),
        unconditional_transformer=diffusers.Ideogram4Transformer2DModel(**components["transformer"].config),
    )
    with pytest.raises(ValueError, match=r"^An Ideogram 4 pipeline cannot run these components: `text_encoder` is a"):
        AutoPipelineForText2Image.from_pipe(builtin)


def test_importing_the_package_registers_when_diffusers_autopipeline_loads_later():
    """A fresh interpreter: the package import stays light (no torch), and AutoPipeline imported afterwards finds ours."""
    script = textwrap.dedent(
        """
        import sys
        import diffusers_ideogram4
        assert "torch" not in sys.modules and "diffusers.pipelines.auto_pipeline" not in sys.modules
        from diffusers import AutoPipelineForText2Image
        from diffusers.pipelines.auto_pipeline import AUTO_INPAINT_PIPELINES_MAPPING, AUTO_TEXT2IMAGE_PIPELINES_MAPPING
        print(AUTO_TEXT2IMAGE_PIPELINES_MAPPING["ideogram4"].__module__, AUTO_INPAINT_PIPELINES_MAPPING["ideogram4"].__name__)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["diffusers_ideogram4.pipeline_ideogram4", "Ideogram4InpaintPipeline"]
