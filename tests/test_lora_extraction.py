"""The unconditional LoRA made from the two transformers: full rank reproduces the unconditional branch, rank r has
the SVD tail's error, per-layer ranks meet an error target, differences outside the Linears are reported."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_ideogram4.constants import TRANSFORMER_SIZES
from diffusers_ideogram4.fp8 import dequantize_fp8_state_dict, linear_weight_keys, quantize_fp8_state_dict
from diffusers_ideogram4.loading import diffusers_to_original
from diffusers_ideogram4.lora_extraction import choose_rank, extract_unconditional_lora, read_extraction_report
from diffusers_ideogram4.testing import tiny_transformer
from test_lora import TOLERANCE
from test_single_transformer import passes, single, two_transformers


REPO = Path(__file__).resolve().parents[1]
NAMES = ("transformer", "unconditional_transformer")
TEXT_ONLY = ["llm_cond_norm.weight", "llm_cond_proj.bias", "llm_cond_proj.weight"]


def write_source(root: Path, conditional, unconditional, layout="diffusers", fp8=False) -> Path:
    """A repo folder with both transformers, in the diffusers or original layout, float32 or the fp8 release."""
    for name, model in zip(NAMES, (conditional, unconditional)):
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if fp8:
            state = quantize_fp8_state_dict({k: v.bfloat16() for k, v in state.items()}, linear_weight_keys(model))
        if layout == "original":
            state = diffusers_to_original(state)
        folder = root / name
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
        (folder / "config.json").write_text(json.dumps(TRANSFORMER_SIZES["tiny"]))
    return root


def low_rank_twin(conditional, rank=3, seed=5):
    """The conditional transformer plus a random rank-`rank` change on every Linear weight."""
    twin = tiny_transformer(seed=0)
    twin.load_state_dict(conditional.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in linear_weight_keys(twin):
            weight = twin.get_submodule(key.removesuffix(".weight")).weight
            out, inp = weight.shape
            weight += 0.02 * torch.randn(out, rank, generator=generator) @ torch.randn(rank, inp, generator=generator)
    return twin


def difference(module, conditional, unconditional) -> torch.Tensor:
    """unconditional - conditional of one original-layout Linear, fused q/k/v rows stacked."""
    if module.endswith("attention.qkv"):
        names = [module.replace("qkv", part) for part in ("to_q", "to_k", "to_v")]
    else:
        names = [module.replace("attention.o", "attention.to_out.0")]
    weights = [
        torch.cat([model.get_submodule(name).weight.detach() for name in names])
        for model in (conditional, unconditional)
    ]
    return weights[1] - weights[0]


def extract(source, output, **kwargs):
    return extract_unconditional_lora(source, output, progress=False, **kwargs)


# --------------------------------------------------------------------------------------------------------------------


def test_full_rank_reproduces_the_unconditional_transformer(tmp_path):
    """Two independent random transformers: every Linear difference is full rank, every norm, bias and embedding
    differs. At full rank in float32 the LoRA plus the stored differences computes the unconditional branch."""
    conditional, unconditional = tiny_transformer(seed=0), tiny_transformer(seed=1)
    source = write_source(tmp_path / "repo", conditional, unconditional)

    report = extract(source, tmp_path / "uncond.safetensors", rank=10_000, dtype="fp32")

    # Every Linear of the original layout (fused q/k/v) but llm_cond_proj: 6 per block and 6 global ones.
    assert len(report.layers) == 6 * TRANSFORMER_SIZES["tiny"]["num_layers"] + 6
    assert all(layer.rank == min(layer.shape) for layer in report.layers)
    assert max(layer.rel_error for layer in report.layers) < 1e-5 and report.total_rel_error < 1e-5
    assert sorted(report.left_out) == TEXT_ONLY
    non_linear = [k for k in conditional.state_dict() if k not in linear_weight_keys(conditional)]
    assert len(report.weight_diffs) == len(non_linear) - 2  # all but llm_cond_norm.weight and llm_cond_proj.bias
    assert read_extraction_report(tmp_path / "uncond.safetensors") == json.loads(json.dumps(report.metadata()))

    pipe = single()
    pipe.load_unconditional_lora(str(tmp_path / "uncond.safetensors"))
    reference = two_transformers(unconditional)
    mine, theirs = passes(pipe)[1], passes(reference)[1]
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    assert (mine - theirs).norm() / theirs.norm() < 1e-5


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_rank_r_error_is_the_svd_tail(tmp_path, dtype):
    conditional, unconditional = tiny_transformer(seed=0), tiny_transformer(seed=1)
    source = write_source(tmp_path / "repo", conditional, unconditional)
    output = tmp_path / "uncond.safetensors"

    report = extract(source, output, rank=5, dtype=dtype)

    stored = load_file(str(output))
    layers = {layer.module: layer for layer in report.layers}
    for module in ("layers.0.attention.qkv", "layers.1.feed_forward.w2", "final_layer.adaln_modulation"):
        D = difference(module, conditional, unconditional)
        U, S, Vh = torch.linalg.svd(D.double(), full_matrices=False)
        tail = (S[5:] ** 2).sum().sqrt() / D.double().norm()
        down = stored[f"diffusion_model.{module}.lora_down.weight"]
        up = stored[f"diffusion_model.{module}.lora_up.weight"]
        assert down.shape == (5, D.shape[1]) and up.shape == (D.shape[0], 5)
        assert stored[f"diffusion_model.{module}.alpha"].item() == 5.0
        actual = ((D.double() - up.double() @ down.double()).norm() / D.double().norm()).item()
        assert layers[module].rel_error == pytest.approx(actual, rel=1e-4)  # what is stored, rounding included
        if dtype == "fp32":
            assert layers[module].rel_error == pytest.approx(tail.item(), rel=1e-4)
            torch.testing.assert_close(up.double() @ down.double(), (U[:, :5] * S[:5]) @ Vh[:5], rtol=0, atol=1e-5)
        else:  # bf16 factors add their rounding on top of the truncation, never remove any of it
            assert tail.item() <= layers[module].rel_error < tail.item() * 1.01
    total = sum(layer.abs_error**2 for layer in report.layers) / sum(layer.diff_norm**2 for layer in report.layers)
    assert report.total_rel_error == pytest.approx(total**0.5)


def test_rank_per_layer_by_error_target(tmp_path):
    conditional, unconditional = tiny_transformer(seed=0), tiny_transformer(seed=1)
    source = write_source(tmp_path / "repo", conditional, unconditional)

    report = extract(source, tmp_path / "a.safetensors", max_rel_error=0.3, dtype="fp32")

    for layer in report.layers:
        S = torch.linalg.svdvals(difference(layer.module, conditional, unconditional).double())
        tails = [((S[r:] ** 2).sum().sqrt() / S.norm()).item() for r in range(len(S) + 1)]
        assert tails[layer.rank] <= 0.3 < tails[layer.rank - 1]  # the smallest rank meeting the target
        assert layer.rel_error == pytest.approx(tails[layer.rank], rel=1e-4)
    assert len({layer.rank for layer in report.layers}) > 1
    capped = extract(source, tmp_path / "b.safetensors", max_rel_error=0.3, rank=4, dtype="fp32")
    assert all(layer.rank == min(4, full.rank) for layer, full in zip(capped.layers, report.layers))


def test_a_stray_non_linear_difference_is_reported_stored_or_refused(tmp_path):
    conditional = tiny_transformer(seed=0)
    unconditional = low_rank_twin(conditional, rank=3)
    with torch.no_grad():
        unconditional.layers[1].ffn_norm1.weight[7] += 0.01  # the stray difference
        unconditional.llm_cond_proj.weight += 1.0  # text-only: left out, said so
    source = write_source(tmp_path / "repo", conditional, unconditional)

    with pytest.raises(ValueError) as error:
        extract(source, tmp_path / "refused.safetensors", rank=9, non_linear="refuse")
    assert "not Linear weights: layers.1.ffn_norm1.weight." in str(error.value)
    assert not (tmp_path / "refused.safetensors").exists()

    report = extract(source, tmp_path / "uncond.safetensors", rank=9, dtype="fp32")

    assert list(report.weight_diffs) == ["diffusion_model.layers.1.ffn_norm1.diff"]
    assert sorted(report.left_out) == TEXT_ONLY  # whether they differ or not
    assert "stored 1 non-Linear differences" in report.summary()
    assert "left out: llm_cond_proj.weight: acts on text features" in report.summary()
    stored = load_file(str(tmp_path / "uncond.safetensors"))
    expected = torch.zeros(CHANNELS := TRANSFORMER_SIZES["tiny"]["attention_head_dim"] * 2)
    expected[7] = unconditional.layers[1].ffn_norm1.weight[7] - conditional.layers[1].ffn_norm1.weight[7]
    assert torch.equal(stored["diffusion_model.layers.1.ffn_norm1.diff"], expected) and CHANNELS == 128
    # The report gives the difference relative to the unconditional weight: ||d|| / ||w_u||.
    relative_size = float(expected.norm()) / float(unconditional.layers[1].ffn_norm1.weight.norm())
    assert report.weight_diffs["diffusion_model.layers.1.ffn_norm1.diff"] == pytest.approx(relative_size, rel=1e-6)
    assert f"diffusion_model.layers.1.ffn_norm1.diff ({relative_size:.2e})" in report.summary()
    assert not any(key.startswith("diffusion_model.llm_cond_proj") for key in stored)
    # The differences have rank 3 (9 for the fused q/k/v): rank 9 reproduces them to float error, and with the norm
    # difference the unconditional branch.
    assert max(layer.rel_error for layer in report.layers) < 1e-5
    pipe = single()
    pipe.load_unconditional_lora(str(tmp_path / "uncond.safetensors"))
    for mine, theirs in zip(passes(pipe), passes(two_transformers(unconditional))):
        torch.testing.assert_close(mine, theirs, **TOLERANCE)


def test_either_layout_and_the_fp8_release_read_the_same_weights(tmp_path):
    conditional = tiny_transformer(seed=0)
    unconditional = low_rank_twin(conditional, rank=2)
    diffusers = extract(write_source(tmp_path / "d", conditional, unconditional), tmp_path / "d.safetensors", rank=2)
    original = extract(
        write_source(tmp_path / "o", conditional, unconditional, layout="original"), tmp_path / "o.safetensors", rank=2
    )
    assert {**diffusers.metadata(), "source": None} == {**original.metadata(), "source": None}
    first, second = load_file(str(tmp_path / "d.safetensors")), load_file(str(tmp_path / "o.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    # fp8: the same as the extraction from its weights dequantized (float32) in a plain folder.
    write_source(tmp_path / "f", conditional, unconditional, fp8=True)
    dequantized = []
    for name in NAMES:
        state = load_file(str(tmp_path / "f" / name / "diffusion_pytorch_model.safetensors"))
        model = tiny_transformer()
        model.load_state_dict(dequantize_fp8_state_dict(state, torch.float32))
        dequantized.append(model)
    extract(tmp_path / "f", tmp_path / "f.safetensors", rank=2)
    extract(write_source(tmp_path / "q", *dequantized), tmp_path / "q.safetensors", rank=2)
    first, second = load_file(str(tmp_path / "f.safetensors")), load_file(str(tmp_path / "q.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def load_script():
    spec = importlib.util.spec_from_file_location("extract", REPO / "conversion" / "extract_unconditional_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_and_refusals(tmp_path, capsys):
    conditional = tiny_transformer(seed=0)
    source = write_source(tmp_path / "repo", conditional, low_rank_twin(conditional))
    output = tmp_path / "uncond.safetensors"
    script = load_script()

    code = script.main(["--source", str(source), "--rank", "3", "--output", str(output), "--no-progress"])

    assert code == 0
    printed = capsys.readouterr().out
    assert "| layers.0.attention.qkv | 384x128 | 3 |" in printed and "total relative Frobenius error" in printed
    assert script.main(["--source", str(source), "--rank", "3", "--output", str(output), "--no-progress"]) == 1
    assert "exists; pass `overwrite=True` (`--overwrite`)" in capsys.readouterr().err

    for kwargs, message in [
        ({}, r"Pass `rank` \(every layer\), `max_rel_error`"),
        ({"rank": 0}, r"`rank`"),
        ({"max_rel_error": 1.5}, r"`max_rel_error=1.5` must be in \(0, 1\)"),
        ({"max_rel_error": 1.0}, r"`max_rel_error=1.0` must be in \(0, 1\)"),
        ({"rank": 2, "dtype": "fp16"}, r"`dtype='fp16'` is not supported"),
        ({"rank": 2, "non_linear": "drop"}, r"`non_linear='drop'` is not supported"),
    ]:
        with pytest.raises(ValueError, match=message):
            extract(source, tmp_path / "x.safetensors", **kwargs)
    with pytest.raises(ValueError, match=r"must be a `.safetensors` file"):
        extract(source, tmp_path / "x.bin", rank=2)
    (tmp_path / "half").mkdir()
    (source / "transformer").rename(tmp_path / "half" / "transformer")
    with pytest.raises(ValueError, match=r"has no \['unconditional_transformer'\] folder"):
        extract(tmp_path / "half", tmp_path / "x.safetensors", rank=2)
    same = write_source(tmp_path / "same", conditional, conditional)
    with pytest.raises(ValueError, match=r"have identical Linear weights: there is no unconditional LoRA"):
        extract(same, tmp_path / "x.safetensors", rank=2)
    assert not (tmp_path / "x.safetensors").exists()


def test_choose_rank_keeps_the_smallest_rank_whose_error_is_at_most_the_bound():
    values = torch.tensor([4.0, 3.0])  # ||D|| = 5; keeping one value leaves an error of exactly 3 = 0.6 x 5
    assert choose_rank(values, None, 0.6) == 1
    assert choose_rank(values, None, 0.5) == 2
    assert choose_rank(values, 1, 0.5) == 1
