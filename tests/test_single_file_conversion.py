"""Single files (GGUF, ComfyUI's formats) converted into the hub's diffusers layout: dequantized weights written and
verified bit for bit, the result computing exactly what the single file computes, a complete pipeline folder with
`--base`, refusal before anything is written."""

import importlib.util
import json
from pathlib import Path

import gguf
import pytest
import torch

from conftest import CAPTION, seeded
from diffusers_ideogram4 import CheckpointMismatchError, Ideogram4Pipeline, Ideogram4Transformer2DModel
from diffusers_ideogram4.single_file_conversion import convert_single_files_to_diffusers
from single_file_formats import comfy_file, gguf_file, write_safetensors
from test_single_file import MIXED, bf16
from test_transformer import image_velocity, packed_inputs


REPO = Path(__file__).resolve().parents[1]


def test_gguf_and_nvfp4_files_convert_to_a_bit_exact_pipeline_folder(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "base")
    cond, _, _ = comfy_file(tmp_path / "cond_nvfp4_mixed.safetensors", formats=MIXED)
    uncond, _, _ = gguf_file(tmp_path / "uncond-Q4_0.gguf", gguf.GGMLQuantizationType.Q4_0, seed=1)
    report = convert_single_files_to_diffusers(
        tmp_path / "out",
        transformer=cond,
        unconditional_transformer=uncond,
        base=tmp_path / "base",
        config="tiny",
        max_shard_size="100KB",
        progress=False,
    )
    assert report.verified and not list(tmp_path.glob(".out.partial-*"))
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "Ideogram4Transformer2DModel"]
    assert (tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    inputs = bf16(packed_inputs())
    for name, file in (("transformer", cond), ("unconditional_transformer", uncond)):
        converted = Ideogram4Transformer2DModel.from_pretrained(tmp_path / "out" / name, dtype=torch.bfloat16)
        assert converted.layers[0].attention.to_q.weight.dtype == torch.bfloat16
        single = Ideogram4Transformer2DModel.from_single_file(file, config="tiny", dtype=torch.bfloat16)
        assert torch.equal(image_velocity(converted, inputs), image_velocity(single, inputs))
    pipe = Ideogram4Pipeline.from_pretrained(tmp_path / "out")
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(CAPTION, height=256, width=256, num_inference_steps=2, output_type="latent", generator=seeded(0))
    assert torch.isfinite(latents.images).all()


def test_one_file_without_base_writes_its_component_folder_in_fp32(tmp_path):
    path, dequantized, _ = comfy_file(tmp_path / "fp8.safetensors", formats={"layers.0.attention.qkv": "float8_e5m2"})
    report = convert_single_files_to_diffusers(
        tmp_path / "out", transformer=path, config="tiny", dtype="fp32", progress=False
    )
    assert sorted(p for p, _ in report.files) == [
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
    ]
    converted = Ideogram4Transformer2DModel.from_pretrained(tmp_path / "out" / "transformer")
    single = Ideogram4Transformer2DModel.from_single_file(path, config="tiny")
    assert torch.equal(image_velocity(converted, packed_inputs()), image_velocity(single, packed_inputs()))


def test_a_broken_file_stops_the_conversion_before_anything_is_written(tmp_path):
    path, _, _ = comfy_file(tmp_path / "fp8.safetensors", formats={"layers.0.attention.qkv": "float8_e4m3fn"})
    from safetensors.torch import load_file

    state = load_file(str(path))
    state.pop("layers.0.attention.qkv.weight_scale")
    broken = write_safetensors(tmp_path / "broken.safetensors", state)
    with pytest.raises(CheckpointMismatchError, match=r"`float8_e4m3fn` layer `layers\.0\.attention\.qkv` lacks"):
        convert_single_files_to_diffusers(tmp_path / "out", transformer=broken, config="tiny", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors", "fp8.safetensors"]
    with pytest.raises(ValueError, match=r"`dtype='keep'` is not supported; use one of \['bf16', 'fp32'\]"):
        convert_single_files_to_diffusers(tmp_path / "out", transformer=path, dtype="keep")


def test_script(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "script", REPO / "conversion" / "convert_single_file_to_diffusers.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path, _, _ = gguf_file(tmp_path / "q8.gguf", gguf.GGMLQuantizationType.Q8_0)
    assert (
        script.main(["--transformer", str(path), "--output", str(tmp_path / "out"), "--config", "tiny", "--dry-run"])
        == 0
    )
    assert "would write 2 files" in capsys.readouterr().out and not (tmp_path / "out").exists()
    assert script.main(["--output", str(tmp_path / "out")]) == 1
    assert "Pass `transformer=` and/or `unconditional_transformer=`" in capsys.readouterr().err


def test_an_existing_output_is_refused_before_a_file_given_by_url_is_loaded(tmp_path, monkeypatch):
    """Only local files used to trigger the output check before loading: a hub URL was downloaded and loaded first."""
    loads = []
    monkeypatch.setattr(Ideogram4Transformer2DModel, "from_single_file", lambda *a, **k: loads.append(a))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.txt").write_text("mine")
    url = "https://huggingface.co/someone/ideogram4-gguf/blob/main/ideogram4-Q8_0.gguf"
    with pytest.raises(FileExistsError, match="pass `overwrite=True`"):
        convert_single_files_to_diffusers(tmp_path / "out", transformer=url, config="tiny", progress=False)
    assert loads == [] and (tmp_path / "out" / "kept.txt").read_text() == "mine"


def test_a_revision_without_a_hub_base_is_refused(tmp_path):
    """`revision` picks a commit of the hub `base`: without a base, or with a local folder, it would do nothing."""
    path, _, _ = gguf_file(tmp_path / "q8.gguf", gguf.GGMLQuantizationType.Q8_0)
    with pytest.raises(ValueError, match=r"^`revision='abc'` is the hub revision of `base`; give `base`, or drop"):
        convert_single_files_to_diffusers(tmp_path / "out", transformer=path, config="tiny", revision="abc")
    (tmp_path / "base").mkdir()
    with pytest.raises(
        ValueError, match=r"^`revision='abc'` picks a commit of a hub repo, but `source=.*base'` is a "
    ):
        convert_single_files_to_diffusers(
            tmp_path / "out", transformer=path, base=tmp_path / "base", config="tiny", revision="abc"
        )
    assert not (tmp_path / "out").exists()
