"""Conversion between the original release layout and the hub's diffusers layout: bit-exact tensors, both pipelines
load the result, refusal by key name before anything is written, no half folders, dry runs, round trips, pushes."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import CAPTION, needs_peer, seeded
from diffusers_ideogram4 import CheckpointMismatchError, Ideogram4Pipeline, Ideogram4Transformer2DModel, conversion
from diffusers_ideogram4.conversion import (
    ConversionVerificationError,
    convert_diffusers_to_original,
    convert_original_to_diffusers,
    parse_size,
)
from diffusers_ideogram4.fp8 import FP8_DTYPE, dequantize_fp8_state_dict, linear_weight_keys, quantize_fp8_state_dict
from diffusers_ideogram4.loading import diffusers_to_original
from diffusers_ideogram4.text_encoder import FP8_CONFIG_FLAG
from test_transformer import image_velocity, packed_inputs


REPO = Path(__file__).resolve().parents[1]
TRANSFORMERS = ("transformer", "unconditional_transformer")
H, W = 256, 256
LICENSE_TEXT = "Ideogram 4 non-commercial license (test stand-in)\n"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "conversion" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a component folder's safetensors files, read directly (not through our loader)."""
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def assert_same_state(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    bad = [key for key in expected if not same_bits(got[key].contiguous(), expected[key].contiguous())]
    assert not bad, bad


def fp8_text_encoder_state(text_encoder_state: dict) -> dict:
    """The fp8 release's text encoder: every 2-D Linear weight of the language model float8 with its row scale."""
    keys = [
        k
        for k, v in text_encoder_state.items()
        if k.startswith("language_model.layers.") and k.endswith("proj.weight")
    ]
    return quantize_fp8_state_dict(text_encoder_state, keys)


def write_original_release(root: Path, pipe, *, sharded: bool = False, fp8: bool = False) -> dict[str, dict]:
    """A folder laid out like the original release: fused attention in bf16 (or the fp8 format), one file or two
    shards with an index, a full Qwen3-VL text encoder, model_index.json naming the hub classes, a LICENSE file.
    Returns each transformer's expected diffusers-layout state dict."""
    from transformers import Qwen3VLModel

    pipe.save_pretrained(root)
    (root / "LICENSE.md").write_text(LICENSE_TEXT)
    (root / "README.md").write_text("# the original card\n")

    full = Qwen3VLModel(pipe.text_encoder.config)
    full.language_model.load_state_dict(pipe.text_encoder.language_model.state_dict())
    full.to(torch.bfloat16).save_pretrained(root / "text_encoder")
    if fp8:
        state = fp8_text_encoder_state(load_file(str(root / "text_encoder" / "model.safetensors")))
        save_file(state, str(root / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((root / "text_encoder" / "config.json").read_text())
        (root / "text_encoder" / "config.json").write_text(json.dumps({**config, FP8_CONFIG_FLAG: True}))

    expected = {}
    for name in TRANSFORMERS:
        model = getattr(pipe, name)
        state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
        if fp8:
            state = quantize_fp8_state_dict(state, linear_weight_keys(model))
        expected[name] = state
        fused = {k: v.contiguous() for k, v in diffusers_to_original(state).items()}
        folder = root / name
        for file in folder.glob("*.safetensors"):
            file.unlink()
        if sharded:
            keys = sorted(fused)
            halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
            for file, part in halves.items():
                save_file({k: fused[k] for k in part}, str(folder / file))
            weight_map = {k: file for file, part in halves.items() for k in part}
            (folder / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map})
            )
        else:
            save_file(fused, str(folder / "model.safetensors"))
    return expected


@pytest.fixture(scope="module")
def releases(tmp_path_factory, tiny_pipe):
    """Three original-layout sources built once: bf16 single-file, bf16 sharded, fp8 (transformers + text encoder)."""
    built = {}
    for kind, options in {"bf16": {}, "sharded": {"sharded": True}, "fp8": {"fp8": True}}.items():
        root = tmp_path_factory.mktemp(kind) / "source"
        built[kind] = (root, write_original_release(root, tiny_pipe, **options))
    return built


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def one_step_latents(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(CAPTION, height=H, width=W, num_inference_steps=1, output_type="latent", generator=seeded(3)).images


# --------------------------------------------------------------------------------------------------------------------
# original -> diffusers


@needs_peer
@pytest.mark.parametrize("kind, max_shard_size", [("bf16", "10GB"), ("sharded", "100KB")])
def test_converted_folder_is_bit_exact_and_loads_in_both_pipelines(releases, tmp_path, kind, max_shard_size):
    import diffusers

    source, expected = releases[kind]
    output = tmp_path / "out"
    report = convert_original_to_diffusers(source, output, max_shard_size=max_shard_size, progress=False)
    assert report.verified and not report.dry_run

    index = json.loads((output / "model_index.json").read_text())
    assert index["_class_name"] == "Ideogram4Pipeline"
    assert index["transformer"] == index["unconditional_transformer"] == ["diffusers", "Ideogram4Transformer2DModel"]
    assert index["text_encoder"] == ["transformers", "Qwen3VLModel"]
    assert not list(output.glob("*.py")) and not (output / "README.md").exists()
    assert (output / "LICENSE.md").read_text() == LICENSE_TEXT
    for name in TRANSFORMERS:
        files = sorted(p.name for p in (output / name).glob("*.safetensors"))
        if max_shard_size == "10GB":
            assert files == ["diffusion_pytorch_model.safetensors"]
        else:
            assert len(files) > 1 and files[0] == f"diffusion_pytorch_model-00001-of-{len(files):05d}.safetensors"
            weight_map = json.loads((output / name / "diffusion_pytorch_model.safetensors.index.json").read_text())
            assert sorted(set(weight_map["weight_map"].values())) == files
        assert_same_state(tensors_of(output / name), expected[name])
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for file in (source / name).iterdir():
            assert (output / name / file.name).read_bytes() == file.read_bytes()
    assert report.total_bytes == sum(p.stat().st_size for p in output.rglob("*") if p.is_file())

    ours = Ideogram4Pipeline.from_pretrained(output, torch_dtype=torch.bfloat16)
    peer = diffusers.Ideogram4Pipeline.from_pretrained(output, torch_dtype=torch.bfloat16)
    assert type(peer.transformer).__module__.startswith("diffusers.")
    for name in TRANSFORMERS:
        assert_same_state(getattr(ours, name).state_dict(), expected[name])
        assert_same_state(getattr(peer, name).state_dict(), expected[name])
    # One denoising step: the converted folder behaves exactly like the source read in its original layout.
    reference = Ideogram4Pipeline.from_pretrained(source, torch_dtype=torch.bfloat16)
    torch.testing.assert_close(one_step_latents(ours), one_step_latents(reference), rtol=0, atol=0)
    # The same forward pass in float32 through diffusers' built-in transformer and ours, both loaded from the output.
    ours_fp32 = Ideogram4Transformer2DModel.from_pretrained(output / "transformer")
    inputs = packed_inputs()
    torch.testing.assert_close(
        image_velocity(ours_fp32, inputs), image_velocity(peer.transformer.float(), inputs), rtol=1e-5, atol=1e-5
    )


def test_fp8_source_kept_as_fp8_with_split_scales(releases, tmp_path):
    from diffusers_ideogram4.fp8 import FP8Linear

    source, expected = releases["fp8"]
    output = tmp_path / "out"
    convert_original_to_diffusers(source, output, dtype="keep", progress=False)
    for name in TRANSFORMERS:
        got = tensors_of(output / name)
        assert got["layers.0.attention.to_k.weight"].dtype == FP8_DTYPE
        assert got["layers.0.attention.to_k.weight_scale"].dtype == torch.float32
        assert_same_state(got, expected[name])  # fused q/k/v scales split by rows, like the weights
    assert (output / "text_encoder" / "model.safetensors").read_bytes() == (
        source / "text_encoder" / "model.safetensors"
    ).read_bytes()

    ours = Ideogram4Pipeline.from_pretrained(output, torch_dtype=torch.bfloat16)
    assert isinstance(ours.transformer.layers[0].attention.to_q, FP8Linear)
    reference = Ideogram4Pipeline.from_pretrained(source, torch_dtype=torch.bfloat16)
    torch.testing.assert_close(one_step_latents(ours), one_step_latents(reference), rtol=0, atol=0)


@needs_peer
def test_fp8_source_dequantized_to_bf16_loads_in_both_pipelines(releases, tmp_path):
    import diffusers
    from transformers import Qwen3VLModel

    source, expected = releases["fp8"]
    output = tmp_path / "out"
    report = convert_original_to_diffusers(source, output, dtype="bf16", progress=False)
    for name in TRANSFORMERS:
        assert_same_state(tensors_of(output / name), dequantize_fp8_state_dict(expected[name], torch.bfloat16))

    # The fp8 text encoder is dequantized too, and its config no longer claims fp8.
    config = json.loads((output / "text_encoder" / "config.json").read_text())
    assert FP8_CONFIG_FLAG not in config
    source_state = load_file(str(source / "text_encoder" / "model.safetensors"))
    assert_same_state(tensors_of(output / "text_encoder"), dequantize_fp8_state_dict(source_state, torch.bfloat16))
    encoder, info = Qwen3VLModel.from_pretrained(output / "text_encoder", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert any("dequantized" in note for note in report.notes)

    peer = diffusers.Ideogram4Pipeline.from_pretrained(output, torch_dtype=torch.bfloat16)
    ours = Ideogram4Pipeline.from_pretrained(output, torch_dtype=torch.bfloat16)
    for name in TRANSFORMERS:
        assert_same_state(getattr(peer, name).state_dict(), getattr(ours, name).state_dict())
    one_step_latents(ours)


def test_fp32_cast_and_component_subset(releases, tmp_path):
    source, expected = releases["bf16"]
    # The release may name its own class in model_index.json: the transformers are still converted, by folder name.
    source = Path(shutil.copytree(source, tmp_path / "renamed"))
    index = json.loads((source / "model_index.json").read_text())
    (source / "model_index.json").write_text(json.dumps({**index, "transformer": ["ideogram4", "Ideogram4DiT"]}))
    config = json.loads((source / "transformer" / "config.json").read_text())
    (source / "transformer" / "config.json").write_text(json.dumps({**config, "release_note": "x"}))
    output = tmp_path / "out"
    report = convert_original_to_diffusers(source, output, dtype="fp32", components="transformer, vae", progress=False)
    assert report.components == ["transformer", "vae"]  # model_index.json order
    assert sorted(p.name for p in output.iterdir()) == ["LICENSE.md", "model_index.json", "transformer", "vae"]
    index = json.loads((output / "model_index.json").read_text())
    assert sorted(k for k in index if not k.startswith("_")) == ["transformer", "vae"]
    assert index["transformer"] == ["diffusers", "Ideogram4Transformer2DModel"]
    assert "release_note" not in json.loads((output / "transformer" / "config.json").read_text())
    assert report.notes == [
        "transformer/config.json: fields ['release_note'] are not Ideogram4Transformer2DModel arguments; dropped"
    ]
    assert_same_state(tensors_of(output / "transformer"), {k: v.float() for k, v in expected["transformer"].items()})

    with pytest.raises(ValueError, match=r"\['prompt_enhancer_head'\] are not in"):
        convert_original_to_diffusers(source, tmp_path / "x", components=["transformer", "prompt_enhancer_head"])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(push_to_hub_id="not a repo id"), ValueError, r"`push_to_hub_id='not a repo id'` is not a hub repo id"),
        (dict(dtype="fp16"), ValueError, r"`dtype='fp16'` is not supported"),
        (dict(max_shard_size="5 parsecs"), ValueError, r"`max_shard_size='5 parsecs'` is not a size"),
        (dict(model_card="no/such/card.md"), FileNotFoundError, r"`model_card='no/such/card\.md'` is not a file"),
    ],
)
def test_bad_arguments_stop_before_the_source_is_read(tmp_path, monkeypatch, kwargs, error, message):
    """A hub source would be downloaded (54 GB) before these could fail later."""
    monkeypatch.setattr(conversion, "resolve_source", lambda *a, **k: pytest.fail("the source was read"))
    with pytest.raises(error, match=message):
        convert_original_to_diffusers("ideogram-ai/ideogram-4", tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_bad_weights_name_stops_the_reverse_conversion_before_the_source_is_read(tmp_path, monkeypatch):
    """It was checked after the download."""
    monkeypatch.setattr(conversion, "resolve_source", lambda *a, **k: pytest.fail("the source was read"))
    with pytest.raises(ValueError, match=r"`weights_name='model\.bin'` must be a plain `\*\.safetensors` file name"):
        convert_diffusers_to_original("ideogram-ai/ideogram-4", tmp_path / "out", weights_name="model.bin")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------------
# Refusals: by key name, before anything is written


def corrupt_copy(source: Path, tmp_path: Path, change) -> Path:
    """A copy of `source` whose unconditional transformer (the second one planned) has `change` applied."""
    root = tmp_path / "bad-source"
    shutil.copytree(source, root)
    file = root / "unconditional_transformer" / "model.safetensors"
    state = load_file(str(file))
    change(state)
    save_file(state, str(file))
    return root


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda s: s.update({"layers.1.attention.rogue.weight": torch.zeros(2)}),
            r"unexpected keys: layers\.1\.attention\.rogue\.weight",
        ),
        (lambda s: s.pop("layers.0.feed_forward.w3.weight"), r"missing keys: layers\.0\.feed_forward\.w3\.weight"),
        (
            lambda s: s.update({"layers.1.attention.o.weight": torch.zeros(128, 64)}),
            r"mis-shaped keys: layers\.1\.attention\.to_out\.0\.weight \(checkpoint \[128, 64\], model \[128, 128\]\)",
        ),
        (
            lambda s: s.update({"layers.0.attention.to_q.weight": torch.zeros(128, 128)}),
            r"`layers\.0\.attention\.to_q\.weight` is given twice",
        ),
        (
            lambda s: s.update({"layers.0.attention.qkv.weight": torch.zeros(100, 128)}),
            r"`layers\.0\.attention\.qkv\.weight` has shape \[100, 128\]",
        ),
    ],
    ids=["stray", "missing", "mis-shaped", "both-layouts", "qkv-not-thirds"],
)
def test_bad_keys_stop_the_conversion_by_name_with_nothing_written(releases, tmp_path, change, message):
    root = corrupt_copy(releases["bf16"][0], tmp_path, change)
    parent = tmp_path / "outputs"
    parent.mkdir()
    with pytest.raises(CheckpointMismatchError, match=message) as error:
        convert_original_to_diffusers(root, parent / "out", progress=False)
    assert "unconditional_transformer" in str(error.value)
    assert list(parent.iterdir()) == []  # not even the (valid) first transformer


def test_fp8_weight_without_scale_and_nf4_sources_are_refused(releases, tmp_path):
    source = releases["fp8"][0]
    root = corrupt_copy(source, tmp_path, lambda s: s.pop("layers.1.feed_forward.w1.weight_scale"))
    with pytest.raises(
        CheckpointMismatchError,
        match=r"float8 weights without their `\.weight_scale`: "
        r"layers\.1\.feed_forward\.w1\.weight",
    ):
        convert_original_to_diffusers(root, tmp_path / "out", progress=False)
    shutil.rmtree(root)
    root = corrupt_copy(
        releases["bf16"][0], tmp_path, lambda s: s.update({"input_proj.weight_scale": torch.ones(256)})
    )
    with pytest.raises(CheckpointMismatchError, match=r"`\.weight_scale` tensors without a float8 weight: input_proj"):
        convert_original_to_diffusers(root, tmp_path / "out", progress=False)
    shutil.rmtree(root)
    root = corrupt_copy(source, tmp_path, lambda s: s.update({"input_proj.weight.absmax": torch.ones(4)}))
    with pytest.raises(ValueError, match=r"bitsandbytes \(nf4\) checkpoint \(e\.g\. input_proj\.weight\.absmax\)"):
        convert_original_to_diffusers(root, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------------
# No half folders; dry runs; overwriting


def test_interrupted_run_leaves_no_folder_that_looks_valid(releases, tmp_path, monkeypatch):
    calls = []
    real_save = conversion.save_file

    def save_then_die(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C half-way through the second transformer
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(conversion, "save_file", save_then_die)
    parent = tmp_path / "outputs"
    with pytest.raises(KeyboardInterrupt):
        convert_original_to_diffusers(releases["bf16"][0], parent / "out", progress=False)
    assert len(calls) == 2 and ".partial-" in calls[0]  # it was writing beside the output, not into it
    assert list(parent.iterdir()) == []

    # With --overwrite, an existing output (of an earlier conversion) survives an interrupted run untouched.
    existing = parent / "out"
    existing.mkdir()
    (existing / "model_index.json").write_text(json.dumps({conversion.CONVERSION_MARKER: {}}))
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        convert_original_to_diffusers(releases["bf16"][0], existing, overwrite=True, progress=False)
    assert [p.name for p in existing.iterdir()] == ["model_index.json"] and leftovers(parent) == []


def test_dry_run_writes_nothing_and_lists_the_files(releases, tmp_path, capsys):
    output = tmp_path / "not-yet" / "out"
    report = convert_original_to_diffusers(releases["sharded"][0], output, max_shard_size="100KB", dry_run=True)
    assert report.dry_run and not report.verified
    assert not output.parent.exists()
    paths = [path for path, _ in report.files]
    assert "transformer/diffusion_pytorch_model.safetensors.index.json" in paths and "model_index.json" in paths
    real = convert_original_to_diffusers(releases["sharded"][0], output, max_shard_size="100KB", progress=False)
    assert [path for path, _ in real.files] == paths
    assert abs(real.total_bytes - report.total_bytes) < 0.05 * real.total_bytes  # headers are not counted in a plan

    script = load_script("convert_ideogram4_to_diffusers")
    assert script.main(["--source", str(releases["bf16"][0]), "--output", str(tmp_path / "o2"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "would write" in printed and "transformer/diffusion_pytorch_model.safetensors" in printed
    assert not (tmp_path / "o2").exists()


def test_existing_output_is_refused_unless_overwrite(releases, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_original_to_diffusers(releases["bf16"][0], output, progress=False)
    script = load_script("convert_ideogram4_to_diffusers")
    assert script.main(["--source", str(releases["bf16"][0]), "--output", str(output), "--no-progress"]) == 1
    assert "error:" in capsys.readouterr().err and (output / "keep.txt").exists()

    # A folder this converter did not write is replaced only with the separate, named flag.
    with pytest.raises(FileExistsError, match=r"not a folder this converter wrote.*--replace-any-folder"):
        convert_original_to_diffusers(releases["bf16"][0], output, overwrite=True, progress=False)
    assert (output / "keep.txt").exists()
    convert_original_to_diffusers(releases["bf16"][0], output, replace_any_folder=True, progress=False)
    assert not (output / "keep.txt").exists() and (output / "model_index.json").exists()
    assert leftovers(tmp_path) == []
    # A previous output is replaced with --overwrite alone.
    convert_original_to_diffusers(releases["bf16"][0], output, overwrite=True, progress=False)
    assert leftovers(tmp_path) == []


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("10MB") == 10**7
    assert parse_size("1.5 gb") == 1_500_000_000
    assert parse_size("10MiB") == 10 * 2**20
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="write it like '5GB'"):
        parse_size("five gigs")


# --------------------------------------------------------------------------------------------------------------------
# diffusers -> original


@pytest.mark.parametrize("kind", ["sharded", "fp8"])
def test_round_trip_back_to_the_original_layout_is_bit_exact(releases, tmp_path, kind):
    source, _ = releases[kind]
    diffusers_folder = tmp_path / "diffusers"
    convert_original_to_diffusers(source, diffusers_folder, max_shard_size="100KB", progress=False)
    back = tmp_path / "original"
    report = convert_diffusers_to_original(diffusers_folder, back, progress=False)
    assert report.verified
    for name in TRANSFORMERS:
        assert sorted(p.name for p in (back / name).iterdir()) == ["config.json", "model.safetensors"]
        assert_same_state(tensors_of(back / name), tensors_of(source / name))
        with safe_open(str(back / name / "model.safetensors"), framework="pt") as handle:
            assert "layers.0.attention.qkv.weight" in handle.keys()
    # And the original folder converts forward again to the same diffusers tensors.
    again = tmp_path / "again"
    convert_original_to_diffusers(back, again, progress=False)
    for name in TRANSFORMERS:
        assert_same_state(tensors_of(again / name), tensors_of(diffusers_folder / name))

    script = load_script("convert_diffusers_to_original")
    assert script.main(["--source", str(diffusers_folder), "--output", str(tmp_path / "dry"), "--dry-run"]) == 0
    assert not (tmp_path / "dry").exists()


def test_reverse_conversion_checks_keys_first(releases, tmp_path):
    diffusers_folder = tmp_path / "diffusers"
    convert_original_to_diffusers(releases["bf16"][0], diffusers_folder, progress=False)
    file = diffusers_folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(file))
    state.pop("layers.1.attention.to_k.weight")
    save_file(state, str(file))
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: layers\.1\.attention\.to_k\.weight"):
        convert_diffusers_to_original(diffusers_folder, tmp_path / "back", progress=False)
    assert not (tmp_path / "back").exists()


# --------------------------------------------------------------------------------------------------------------------
# Publishing


class FakeHfApi:
    """Stands in for `huggingface_hub.HfApi` where conversion.py binds it; records what would be uploaded."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False):
        FakeHfApi.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, folder_path, repo_id, commit_message):
        files = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
        card = (Path(folder_path) / "README.md").read_text()
        FakeHfApi.calls.append(("upload_folder", repo_id, commit_message, files, card))


@pytest.fixture
def fake_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(conversion, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    return FakeHfApi.calls


def test_push_uploads_the_verified_folder(releases, tmp_path, fake_hub):
    output = tmp_path / "out"
    report = convert_original_to_diffusers(
        releases["bf16"][0],
        output,
        dtype="bf16",
        model_card=REPO / "model_cards" / "ideogram4-bf16.md",
        push_to_hub_id="someone/ideogram-4-bf16",
        private=True,
        commit_message="Add weights",
        progress=False,
    )
    assert report.pushed_to == "someone/ideogram-4-bf16"
    assert fake_hub[0] == ("create_repo", "someone/ideogram-4-bf16", True, True)
    _, repo_id, message, files, card = fake_hub[1]
    assert (repo_id, message) == ("someone/ideogram-4-bf16", "Add weights")
    assert files == sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file())
    assert {"README.md", "model_index.json", "LICENSE.md", "transformer/diffusion_pytorch_model.safetensors"} <= set(
        files
    )
    assert 'Ideogram4Pipeline.from_pretrained("someone/ideogram-4-bf16"' in card
    assert "base_model: ideogram-ai/ideogram-4-fp8" in card and "{{" not in card


@pytest.mark.parametrize(
    "kwargs, names",
    [
        (dict(private=True), ("private", "push_to_hub_id")),
        (dict(commit_message="Add weights"), ("commit_message", "push_to_hub_id")),
        (dict(card_variables={"peak_memory": "31 GB"}), ("card_variables", "model_card")),
        (dict(base_model="someone/base"), ("base_model", "model_card")),
    ],
)
def test_options_that_would_do_nothing_are_refused(releases, tmp_path, kwargs, names):
    name, needed = names
    output = tmp_path / "out"
    message = f"^`{name}` does nothing without `{needed}`; give `{needed}` too, or drop `{name}`\\.$"
    with pytest.raises(ValueError, match=message):
        convert_original_to_diffusers(releases["bf16"][0], output, dry_run=True, progress=False, **kwargs)
    assert not output.exists()


def test_nothing_is_pushed_when_verification_fails(releases, tmp_path, fake_hub, monkeypatch):
    real_save = conversion.save_file

    def save_corrupted(tensors, path, metadata=None):
        if "unconditional_transformer" in path:
            tensors = dict(tensors)
            tensors["final_layer.linear.bias"] = tensors["final_layer.linear.bias"] + 1
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(conversion, "save_file", save_corrupted)
    with pytest.raises(ConversionVerificationError, match=r"unconditional_transformer: `final_layer\.linear\.bias`"):
        convert_original_to_diffusers(
            releases["bf16"][0], tmp_path / "out", push_to_hub_id="someone/x", progress=False
        )
    assert fake_hub == [] and list(tmp_path.iterdir()) == []

    with pytest.raises(ValueError, match="needs `verify=True`"):
        convert_original_to_diffusers(releases["bf16"][0], tmp_path / "out", push_to_hub_id="someone/x", verify=False)
    assert fake_hub == []


def test_verification_reloads_with_our_transformer_class(releases, tmp_path, monkeypatch):
    loads = []
    real = Ideogram4Transformer2DModel.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        loads.append(Path(path).name)
        return real(cls, path, **kwargs)

    monkeypatch.setattr(Ideogram4Transformer2DModel, "from_pretrained", classmethod(spy))
    convert_original_to_diffusers(releases["bf16"][0], tmp_path / "out", progress=False)
    assert loads == list(TRANSFORMERS)


def test_verification_reads_back_a_dequantized_text_encoder(releases, tmp_path, monkeypatch):
    real_save = conversion.save_file

    def save_corrupted(tensors, path, metadata=None):
        if "text_encoder" in path:
            tensors = {k: v if "layers.0.mlp.up_proj" not in k else v * 2 for k, v in tensors.items()}
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(conversion, "save_file", save_corrupted)
    with pytest.raises(
        ConversionVerificationError,
        match=r"text_encoder/model\.safetensors: `language_model\.layers\.0"
        r"\.mlp\.up_proj\.weight` differs",
    ):
        convert_original_to_diffusers(releases["fp8"][0], tmp_path / "out", dtype="bf16", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_script_renders_a_named_card_and_pushes(releases, tmp_path, fake_hub, capsys):
    script = load_script("convert_ideogram4_to_diffusers")
    output = tmp_path / "out"
    argv = [
        "--source",
        str(releases["fp8"][0]),
        "--output",
        str(output),
        "--model-card",
        "fp8",
        "--card-var",
        "seconds_per_step=1.2 s",
        "--push-to-hub",
        "someone/ideogram-4-fp8-diffusers",
        "--private",
        "--no-progress",
    ]
    assert script.main(argv) == 0
    assert "pushed to https://huggingface.co/someone/ideogram-4-fp8-diffusers" in capsys.readouterr().out
    assert fake_hub[0] == ("create_repo", "someone/ideogram-4-fp8-diffusers", True, True)
    card = (output / "README.md").read_text()
    assert "| time per denoising step, 1024 x 1024 | 1.2 s |" in card
    assert "Transformer weights: bfloat16, float32, float8_e4m3fn." in card


def test_a_dry_run_says_it_pushes_nothing(releases, tmp_path, monkeypatch):
    import diffusers_ideogram4.conversion as conversion

    monkeypatch.setattr(conversion, "push_to_hub", lambda *a, **k: pytest.fail("a dry run pushed"))
    report = convert_original_to_diffusers(
        releases["bf16"][0], tmp_path / "out", dry_run=True, push_to_hub_id="someone/x", progress=False
    )
    assert report.pushed_to is None
    assert report.summary().endswith("note: dry run: nothing written, so nothing pushed to someone/x")
