"""Issue 17's classes, each tested as a class: weights that load but are wrong (dtypes, scale values, NaN), component
classes that cannot work, corrupt files named, conversion outputs that must not destroy anything, LoRA values,
pipeline arguments checked before model work."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CAPTION
from diffusers_ideogram4 import CheckpointMismatchError, Ideogram4Pipeline, Ideogram4TextEncoder
from diffusers_ideogram4 import Ideogram4Transformer2DModel as Transformer
from diffusers_ideogram4.loading import diffusers_to_original
from diffusers_ideogram4.testing import tiny_pipeline, tiny_transformer
from test_fp8 import fp8_release, fp8_text_encoder_folder, write


H = W = 256


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    tiny_pipeline(seed=4).save_pretrained(root)
    return root


def copy_component(saved, tmp_path, name):
    import shutil

    return shutil.copytree(saved / name, tmp_path / name)


# --------------------------------------------------------------------------------------------------------------------
# Weights that load but are wrong: dtypes and values, per format


TRANSFORMER_LAYOUTS = {
    "diffusers": lambda: {k: v for k, v in tiny_transformer(seed=1).state_dict().items()},
    "original": lambda: diffusers_to_original(tiny_transformer(seed=1).state_dict()),
    "fp8": lambda: fp8_release(seed=1),
}


@pytest.mark.parametrize("layout", TRANSFORMER_LAYOUTS)
@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "input_proj.bias",
            torch.zeros(128, dtype=torch.int32),
            r"input_proj\.bias \(I32, not F64 or F32 or F16 or BF16\)",
        ),
        ("llm_cond_norm.weight", torch.ones(208, dtype=torch.bool), r"llm_cond_norm\.weight \(BOOL, not F64"),
    ],
    ids=["int-bias", "bool-norm"],
)
def test_integer_or_bool_weights_are_refused_in_every_transformer_layout(tmp_path, layout, key, value, message):
    state = TRANSFORMER_LAYOUTS[layout]()
    state[key] = value
    with pytest.raises(
        CheckpointMismatchError, match=r"stores tensors in dtypes their format does not define.*" + message
    ):
        Transformer.from_pretrained(write(tmp_path / layout, state))


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.0, -0.5])
def test_fp8_scales_must_be_finite_and_positive(tmp_path, bad):
    state = fp8_release(seed=3)
    state["layers.1.feed_forward.w2.weight_scale"][3] = bad
    with pytest.raises(
        CheckpointMismatchError, match=r"finite and positive.*layers\.1\.feed_forward\.w2\.weight_scale"
    ):
        Transformer.from_pretrained(write(tmp_path / "fp8", state))


def test_fp8_text_encoder_scale_in_the_wrong_dtype_is_refused(tmp_path):
    key = "language_model.layers.2.mlp.down_proj.weight_scale"
    folder, _ = fp8_text_encoder_folder(tmp_path, corrupt=lambda s: s.update({key: s[key].double()}))
    with pytest.raises(CheckpointMismatchError, match=rf"{re.escape(key)} \(F64, not F32\)"):
        Ideogram4TextEncoder.from_pretrained(folder)


def component_loader(component):
    from diffusers_ideogram4.pipeline_ideogram4 import StrictAutoencoderKLFlux2

    loaders = {"transformer": Transformer, "text_encoder": Ideogram4TextEncoder, "vae": StrictAutoencoderKLFlux2}
    return loaders[component].from_pretrained


@pytest.mark.parametrize("component, key", [("text_encoder", None), ("vae", "decoder.conv_in.bias")])
def test_integer_weights_in_the_text_encoder_and_vae_are_refused(saved, tmp_path, component, key):
    folder = copy_component(saved, tmp_path, component)
    [file] = folder.glob("*.safetensors")
    state = load_file(str(file))
    key = key or sorted(k for k in state if k.endswith("mlp.up_proj.weight"))[0]
    state[key] = state[key].to(torch.int32)
    save_file(state, str(file))
    with pytest.raises(CheckpointMismatchError, match=rf"{re.escape(key)} \(I32, not F64 or F32"):
        component_loader(component)(folder)


def test_nan_in_an_ordinary_weight_is_a_warning_naming_the_key(tmp_path):
    state = dict(tiny_transformer(seed=5).state_dict())
    state["layers.0.feed_forward.w1.weight"][0, 0] = math.nan
    with pytest.warns(UserWarning, match=r"NaN or infinite values in layers\.0\.feed_forward\.w1\.weight"):
        model = Transformer.from_pretrained(write(tmp_path / "nan", state))
    assert math.isnan(model.layers[0].feed_forward.w1.weight[0, 0].item())


# --------------------------------------------------------------------------------------------------------------------
# Corrupt or truncated files: named, with what is wrong


def truncate(file, keep):
    data = file.read_bytes()
    file.write_bytes(data[:keep] if keep > 0 else data[: len(data) + keep])


@pytest.mark.parametrize("component", ["transformer", "text_encoder", "vae"])
def test_a_truncated_weight_file_is_named_with_its_sizes(saved, tmp_path, component):
    folder = copy_component(saved, tmp_path, component)
    [file] = folder.glob("*.safetensors")
    truncate(file, -1000)
    with pytest.raises(
        CheckpointMismatchError, match=rf"{file.name} is truncated: \d+ bytes, its header describes \d+"
    ):
        component_loader(component)(folder)


def test_a_file_that_is_not_safetensors_is_named(tmp_path):
    folder = write(tmp_path / "t", tiny_transformer().state_dict())
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"<html>not found</html>")
    with pytest.raises(
        CheckpointMismatchError, match=r"diffusion_pytorch_model\.safetensors is not a safetensors file"
    ):
        Transformer.from_pretrained(folder)


# --------------------------------------------------------------------------------------------------------------------
# Component classes that cannot work here: refused when the pipeline is built, before anything is loaded


def test_model_index_naming_another_vae_class_is_refused_before_loading(saved, tmp_path, monkeypatch):
    import shutil

    root = shutil.copytree(saved, tmp_path / "pipe")
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKL"]}))
    loads = []
    monkeypatch.setattr(Ideogram4TextEncoder, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a)))
    with pytest.raises(ValueError, match=r"model_index\.json names `AutoencoderKL` \(diffusers\) for `vae`"):
        Ideogram4Pipeline.from_pretrained(root)
    assert loads == []
    # A matching component passed by the user replaces the entry.
    monkeypatch.undo()
    vae = Ideogram4Pipeline.from_pretrained(saved).vae
    assert Ideogram4Pipeline.from_pretrained(root, vae=vae).vae is vae


def test_components_of_other_classes_are_refused_when_built():
    from diffusers import AutoencoderKL

    from diffusers_ideogram4.testing import tiny_components

    components = tiny_components()
    with pytest.raises(ValueError, match=r"`vae` is a diffusers\..*AutoencoderKL, not a .*AutoencoderKLFlux2"):
        Ideogram4Pipeline(**{**components, "vae": AutoencoderKL()})
    with pytest.raises(ValueError, match=r"`unconditional_transformer` is a torch\.nn\.modules\.linear\.Linear"):
        Ideogram4Pipeline(**{**components, "unconditional_transformer": torch.nn.Linear(2, 2)})


# --------------------------------------------------------------------------------------------------------------------
# Pipeline arguments: refused before model work; a callback's return checked when it returns


@pytest.fixture
def counted(tiny_pipe):
    calls = []
    models = (tiny_pipe.text_encoder, tiny_pipe.transformer, tiny_pipe.unconditional_transformer)
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in models]
    yield tiny_pipe, calls
    for hook in hooks:
        hook.remove()


NOISE = torch.zeros(1, (H // 16) * (W // 16), 128)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(callback_on_step_end=lambda pipe, step: None),
            r"`callback_on_step_end` must be callable as `callback\(",
        ),
        (dict(callback_on_step_end=lambda: None), r"`callback_on_step_end` must be callable as"),
        (dict(latents=NOISE.half()), r"`latents` has dtype torch\.float16; the sampler runs in float32"),
        (dict(latents=torch.full_like(NOISE, math.nan)), r"`latents` holds NaN or infinite values"),
        (dict(latents=NOISE.to("meta")), r"`latents` is on meta; pass it on the CPU"),
        (dict(latents=NOISE.numpy()), r"`latents` must be a torch\.Tensor, got ndarray"),
        (dict(guidance_schedule={7.0, 3.0}), r"`guidance_schedule` must be a list of numbers.*a set has no order"),
        (dict(guidance_schedule=torch.tensor(7.0)), r"`guidance_schedule` must be a list of numbers"),
        (dict(guidance_schedule=[]), r"`guidance_schedule` must be a list of numbers, one per step, got \[\]"),
    ],
    ids=[
        "callback-two-args",
        "callback-no-args",
        "fp16-latents",
        "nan-latents",
        "meta-latents",
        "numpy-latents",
        "set-schedule",
        "0d-schedule",
        "empty-schedule",
    ],
)
def test_pipeline_arguments_are_refused_before_model_work(counted, kwargs, message):
    pipe, calls = counted
    with pytest.raises(ValueError, match=message):
        pipe(CAPTION, height=H, width=W, num_inference_steps=1, output_type="latent", **kwargs)
    assert calls == []


@pytest.mark.parametrize(
    "returned, message",
    [
        ([1, 2], r"returned a list; return None or a dict"),
        ({"latents": "x"}, r"returned `latents` = 'x'; it must be a tensor like the one"),
        ({"latents": torch.zeros(2, 2)}, r"returned `latents` = \(2, 2\) torch\.float32; it must be a tensor like"),
        ({"latents": NOISE.double()}, r"returned `latents` = .* torch\.float64; it must be a tensor like"),
        ({"noise": NOISE}, r"returned \['noise'\]; it can return only \['latents'\]"),
    ],
    ids=["list", "string", "shape", "dtype", "unknown-key"],
)
def test_a_callback_return_is_checked_naming_the_callback(tiny_pipe, returned, message):
    def my_callback(pipe, step, tau, tensors):
        return returned

    with pytest.raises(ValueError, match=r"`callback_on_step_end` \(.*my_callback\) " + message):
        tiny_pipe(
            CAPTION, height=H, width=W, num_inference_steps=2, output_type="latent", callback_on_step_end=my_callback
        )


# --------------------------------------------------------------------------------------------------------------------
# LoRA: values checked, names checked, paths named


def lora_file(tmp_path, change=None, metadata=None):
    from test_lora import random_original
    from test_lora import write as write_lora

    tensors = random_original(seed=3, prefix="diffusion_model.")
    if change:
        change(tensors)
    return write_lora(tmp_path / "lora.safetensors", tensors, metadata)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda t: t.update({"diffusion_model.input_proj.alpha": torch.tensor(math.nan)}),
            r"`diffusion_model\.input_proj`: alpha must be one finite number, got nan",
        ),
        (
            lambda t: t.update({"diffusion_model.input_proj.alpha": torch.tensor(math.inf)}),
            r"alpha must be one finite number, got inf",
        ),
        (
            lambda t: t.update(
                {
                    "diffusion_model.input_proj.lora_up.weight": t["diffusion_model.input_proj.lora_up.weight"].to(
                        torch.int8
                    )
                }
            ),
            r"`diffusion_model\.input_proj`: factors must be floating point, got torch\.float32 and torch\.int8",
        ),
    ],
    ids=["nan-alpha", "inf-alpha", "int-factor"],
)
def test_lora_values_are_refused_by_module(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipeline().load_lora_weights(str(lora_file(tmp_path, change)))


def test_nan_alpha_in_the_metadata_is_refused(tmp_path):
    from peft.utils import get_peft_model_state_dict

    from test_lora import peft_adapter

    model, config = peft_adapter(r=4, alpha=8)
    layers = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(model, adapter_name="a").items()}
    metadata = {"transformer.r": 4, "transformer.lora_alpha": math.inf}
    with pytest.raises(ValueError, match=r"the LoRA metadata gives `.*` the alpha inf; it must be a finite number"):
        tiny_pipeline().load_lora_weights(layers, metadata=metadata)


def test_adapter_names_weights_and_scales_are_checked(tmp_path):
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(lora_file(tmp_path)), adapter_name="style")
    with pytest.raises(ValueError, match=r"`adapter_weights\[0\]` must be a finite number, got nan"):
        pipe.set_adapters(["style"], [math.nan])
    with pytest.raises(ValueError, match=r"`adapter_names=\[\]`: empty.*disable_lora"):
        pipe.set_adapters([])
    with pytest.raises(ValueError, match=r"no adapter named \['nope'\]; loaded adapters: \['style'\]"):
        pipe.set_adapters(["nope"])
    with pytest.raises(ValueError, match=r"`lora_scale` must be a finite number, got nan"):
        pipe.fuse_lora(lora_scale=math.nan)
    with pytest.raises(ValueError, match=r"no adapter named \['unknown'\]"):
        pipe.fuse_lora(adapter_names=["unknown"])
    assert pipe.fused_loras == set()


def test_lora_paths_that_do_not_exist_or_are_damaged_are_named(tmp_path):
    pipe = tiny_pipeline()
    with pytest.raises(FileNotFoundError, match=r"no/such/lora\.safetensors is neither a file, a folder, nor"):
        pipe.load_lora_weights(str(tmp_path / "no" / "such" / "lora.safetensors"))
    path = lora_file(tmp_path)
    truncate(path, -100)
    with pytest.raises(CheckpointMismatchError, match=r"lora\.safetensors is truncated"):
        pipe.load_lora_weights(str(path))


# --------------------------------------------------------------------------------------------------------------------
# Conversion: never destroys what it should not touch; every copied file verified


@pytest.fixture
def source(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "source")


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("where", ["same", "parent", "symlink"])
def test_conversion_output_that_is_or_contains_the_source_is_refused(source, tmp_path, where):
    from diffusers_ideogram4.conversion import convert_original_to_diffusers

    before = snapshot(tmp_path)
    output = {"same": source, "parent": tmp_path, "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        output.symlink_to(source, target_is_directory=True)
        before = snapshot(source)
    with pytest.raises(ValueError, match=r"is or contains the source"):
        convert_original_to_diffusers(source, output, overwrite=True, replace_any_folder=True, progress=False)
    assert snapshot(source if where == "symlink" else tmp_path) == before


def test_a_failed_swap_puts_the_previous_output_back(source, tmp_path, monkeypatch):
    from diffusers_ideogram4 import conversion

    output = tmp_path / "out"
    conversion.convert_original_to_diffusers(source, output, progress=False)
    before = snapshot(output)
    real_replace = conversion.os.replace

    def fail_on_staging(src, dst):
        if ".partial-" in str(src):
            raise OSError("disk full (simulated)")
        real_replace(src, dst)

    monkeypatch.setattr(conversion, "_exchange", lambda a, b: False)
    monkeypatch.setattr(conversion.os, "replace", fail_on_staging)
    with pytest.raises(OSError, match="simulated"):
        conversion.convert_original_to_diffusers(source, output, overwrite=True, progress=False)
    monkeypatch.undo()
    assert snapshot(output) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_the_swap_is_one_step_where_the_system_can(source, tmp_path):
    from diffusers_ideogram4 import conversion

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    if not conversion._exchange(a, b):
        pytest.skip("this system has no renameat2(RENAME_EXCHANGE); the two-rename fallback is tested above")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_leftovers_of_an_interrupted_run_are_reported(source, tmp_path):
    from diffusers_ideogram4.conversion import convert_original_to_diffusers

    (tmp_path / ".out.old-1234abcd").mkdir()
    report = convert_original_to_diffusers(source, tmp_path / "out", progress=False)
    assert any(".out.old-1234abcd" in note and "interrupted" in note for note in report.notes)


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda root: truncate(next((root / "vae").glob("*.safetensors")), -64),
            r"vae/diffusion_pytorch_model\.safetensors is truncated",
        ),
        (
            lambda root: (root / "tokenizer" / "tokenizer_config.json").write_text("{broken"),
            r"tokenizer_config\.json is not valid JSON",
        ),
    ],
    ids=["truncated-vae", "broken-json"],
)
def test_a_damaged_copied_file_stops_the_conversion_before_writing(source, tmp_path, damage, message):
    from diffusers_ideogram4.conversion import convert_original_to_diffusers

    damage(source)
    with pytest.raises((ValueError, CheckpointMismatchError), match=message):
        convert_original_to_diffusers(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_files_that_are_not_carried_over_are_reported(source, tmp_path):
    from diffusers_ideogram4.conversion import convert_original_to_diffusers

    (source / "vae" / ".cache").write_text("x")
    (source / "transformer" / "notes.txt").write_text("x")
    report = convert_original_to_diffusers(source, tmp_path / "out", progress=False)
    assert "hidden files not copied: ['vae/.cache']" in report.notes
    assert "transformer/: not part of the checkpoint, not carried over: ['notes.txt']" in report.notes


def test_conversion_scripts_report_an_unwritable_destination_in_one_line(source, tmp_path, capsys):
    """An output under a file cannot be created (root ignores read-only modes, a file is a file for anyone): one
    `error:` line, exit 1, no traceback."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "convert", Path(__file__).resolve().parents[1] / "conversion" / "convert_ideogram4_to_diffusers.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "a-file").write_text("x")
    assert script.main(["--source", str(source), "--output", str(tmp_path / "a-file" / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_sdnq_on_a_diffusers_without_its_quantizer_is_refused_with_the_way_out(tmp_path, monkeypatch):
    """diffusers 0.38 has no SDNQ quantizer: say so, before anything is built (on newer versions: simulated)."""
    from diffusers_ideogram4 import sdnq_loading

    folder = write(tmp_path / "sdnq", tiny_transformer().state_dict())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "sdnq"}}))
    monkeypatch.setattr(sdnq_loading, "host_reads_sdnq", lambda: False)
    with pytest.raises(ImportError, match=r"quantized with SDNQ, which diffusers .* cannot load.*0\.39 or newer"):
        Transformer.from_pretrained(folder)


def test_a_quantization_config_that_is_not_an_object_is_refused_by_name(tmp_path):
    """It reached diffusers' quantizer lookup, which failed with `'list' object has no attribute 'quant_method'`."""
    folder = write(tmp_path / "t", tiny_transformer().state_dict())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": ["sdnq"]}))
    with pytest.raises(ValueError) as refused:
        Transformer.from_pretrained(folder)
    assert str(refused.value) == (
        f"{folder / 'config.json'}: `quantization_config` must be an object such as "
        '{"quant_method": "sdnq", ...}, got list [\'sdnq\']; fix or remove it.'
    )
