"""Model card templates: Hub-readable front matter, the fixed sections, a working usage example with a valid caption,
no invented numbers, strict filling."""

import ast
import importlib.util
import re
from pathlib import Path

import pytest
import yaml  # a dependency of huggingface_hub

from diffusers_ideogram4.conversion import LICENSE_NAME, NOT_MEASURED, model_card_variables, render_model_card


CARDS = Path(__file__).resolve().parents[1] / "model_cards"
TEMPLATES = sorted(CARDS.glob("ideogram4-*.md"))
SECTIONS = ["Summary", "Usage", "Hardware and memory", "Quantization notes", "Limitations", "License"]
LORA_VARIABLES = dict(
    lora_title="Poster style",
    lora_description="A test adapter.",
    lora_weight_name="pytorch_lora_weights.safetensors",
    lora_rank=16,
    lora_target="transformer",
    base_pipeline="someone/ideogram-4-bf16",
    lora_modules="attention projections",
)


def variables(**overrides) -> dict:
    return model_card_variables(
        source="ideogram-ai/ideogram-4-fp8",
        dtype="bfloat16",
        component_sizes={"transformer": 17_700_000_000, "vae": 170_000_000},
        repo_id="someone/ideogram-4-test",
        **LORA_VARIABLES,
        **overrides,
    )


def front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, "no YAML front matter"
    return yaml.safe_load(match.group(1))


def sections(card: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", card, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_all_four_templates_exist():
    assert [p.stem for p in TEMPLATES] == ["ideogram4-bf16", "ideogram4-fp8", "ideogram4-lora", "ideogram4-nf4"]


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
def test_rendered_card_has_hub_front_matter_and_fixed_sections(template):
    card = render_model_card(template.read_text(), variables())
    assert "{{" not in card and "}}" not in card
    meta = front_matter(card)
    assert meta["license"] == "other" and meta["license_name"] == LICENSE_NAME
    assert meta["license_link"].startswith("https://huggingface.co/")
    assert meta["base_model"] == "ideogram-ai/ideogram-4-fp8"
    assert meta["pipeline_tag"] == "text-to-image" and meta["library_name"] == "diffusers"
    assert "ideogram4" in meta["tags"] and template.stem.split("-")[1] in meta["tags"]

    found = sections(card)
    assert list(found) == SECTIONS
    assert "non-commercial" in found["License"]
    assert NOT_MEASURED in found["Hardware and memory"]  # no invented measurements
    assert "from diffusers_ideogram4 import Ideogram4Pipeline" in found["Usage"]
    assert '"someone/ideogram-4-test"' in found["Usage"]


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
def test_usage_example_compiles_and_its_caption_is_valid(template):
    card = render_model_card(template.read_text(), variables())
    code = re.search(r"```python\n(.*?)```", sections(card)["Usage"], re.DOTALL).group(1)
    tree = ast.parse(code)
    caption = next(
        ast.literal_eval(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "caption"
    )
    # SPEC 7: the required parts, in order.
    assert list(caption) == ["high_level_description", "style_description", "compositional_deconstruction"]
    assert list(caption["compositional_deconstruction"]) == ["background", "elements"]
    assert list(caption["style_description"]) == ["aesthetics", "lighting", "medium", "art_style", "color_palette"]
    if importlib.util.find_spec("diffusers_ideogram4.captions.checker") is not None:
        import json

        from diffusers_ideogram4.captions.checker import check_caption

        text = json.dumps(caption, ensure_ascii=False, separators=(",", ":"))
        assert [issue for issue in check_caption(text) if issue.severity == "error"] == []


def test_measured_numbers_fill_the_placeholders():
    template = (CARDS / "ideogram4-fp8.md").read_text()
    card = render_model_card(template, variables(peak_memory="29.5 GiB (H100)", seconds_per_step="0.9 s"))
    hardware = sections(card)["Hardware and memory"]
    assert "29.5 GiB (H100)" in hardware and "0.9 s" in hardware and NOT_MEASURED not in hardware
    assert "| `transformer` | 17.7 GB |" in hardware and "| total | 17.9 GB |" in hardware


def test_missing_values_and_broken_yaml_are_refused():
    with pytest.raises(KeyError, match=r"\['lora_rank', 'mystery'\]"):
        render_model_card("---\nlicense: other\n---\n{{ mystery }} {{lora_rank}}", {})
    with pytest.raises(Exception, match="flow"):
        render_model_card("---\nlicense: [{{ x }}\n---\n# card\n", {"x": "other"})
    with pytest.raises(ValueError, match="front matter"):
        render_model_card("# no front matter {{ x }}", {"x": 1})
    with pytest.raises(ValueError, match="not a hub repo id"):
        variables(base_model="not a repo id")


def test_render_script_fills_a_card_from_a_folder(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "render_model_card", CARDS.parent / "conversion" / "render_model_card.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    folder = tmp_path / "export"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 2_000_000)
    argv = [
        "nf4",
        "--folder",
        str(folder),
        "--repo-id",
        "someone/ideogram-4-nf4",
        "--source",
        "ideogram-ai/ideogram-4-fp8",
        "--dtype",
        "bfloat16",
        "--set",
        "peak_memory=12 GiB",
    ]
    assert script.main(argv) == 0
    card = (folder / "README.md").read_text()
    assert front_matter(card)["base_model_relation"] == "quantized"
    assert "| `transformer` | 2.0 MB |" in card and "12 GiB" in card
    assert script.main(["lora", "--folder", str(folder), "--repo-id", "a/b", "--source", "x", "--dtype", "bf16"]) == 1
    assert "lora_" in capsys.readouterr().err  # the LoRA card needs its own values
