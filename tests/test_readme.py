"""README.md stays true: its JSON captions validate, its caption example runs, its test command is CI's."""

import json
import re
from pathlib import Path

from diffusers_ideogram4 import check_caption


ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_json_examples_are_valid_captions():
    examples = blocks("json")
    assert examples
    for example in examples:
        errors = [issue for issue in check_caption(json.loads(example)) if issue.severity == "error"]
        assert errors == [], errors


def test_example_caption_file_is_valid_and_matches_the_readme():
    text = (ROOT / "examples" / "poster.json").read_text(encoding="utf-8").rstrip("\n")
    assert check_caption(text) == []
    assert json.loads(text) == json.loads(blocks("json")[0])


def test_caption_builder_example_runs(tmp_path, monkeypatch):
    example = next(block for block in blocks("python") if "Caption(" in block)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert (tmp_path / "layout.png").exists()
    assert namespace["prompt"] == (ROOT / "examples" / "poster.json").read_text(encoding="utf-8").rstrip("\n")


def test_ci_runs_the_readme_set_up_and_test_commands():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    set_up, test = blocks("bash")[:2]
    assert "ideogram4 generate" in set_up and "pytest" in test
    for command in (set_up, test):
        steps = [
            step.replace("pip install", "python3 -m pip install --quiet").replace("python -m", "python3 -m")
            for step in command.strip().split(" && ")
        ]
        lines = [ci.index(step) for step in steps]  # each step is a whole line of the script
        assert lines == sorted(lines), command  # in the README's order


def test_python_examples_compile():
    for number, example in enumerate(blocks("python")):
        compile(example, f"README.md python block {number}", "exec")


def commands(prefix: str) -> list[list[str]]:
    """Every command line in the README's bash blocks that starts with `prefix`, continuations joined."""
    import shlex

    lines = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[: len(prefix.split())] == prefix.split():
                lines.append(words)
    return lines


def test_cli_commands_parse():
    from diffusers_ideogram4.cli import build_parser

    found = commands("ideogram4")
    assert len(found) >= 6
    for words in found:
        build_parser().parse_args(words[1:])  # an unknown flag or choice exits here


def test_conversion_commands_parse():
    import importlib.util

    found = [words for words in commands("python") if len(words) > 1 and words[1].startswith("conversion/")]
    assert len(found) >= 4
    for words in found:
        spec = importlib.util.spec_from_file_location("script", ROOT / words[1])
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        script.build_parser().parse_args(words[2:])


def test_single_transformer_offline_example_runs(tmp_path, monkeypatch):
    example = next(block for block in blocks("python") if "tiny-uncond.safetensors" in block)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["pipe"].unconditional_adapter == "unconditional"
    assert namespace["latents"].shape == (1, 256, 128)
    assert 0 < namespace["report"].total_rel_error < 1
