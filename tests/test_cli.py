"""`ideogram4 generate` end to end on the tiny random model."""

import json

import pytest
from PIL import Image

from conftest import CAPTION
from diffusers_ideogram4.cli import main


def test_generate_tiny_random_writes_a_png(tmp_path, capsys):
    caption = tmp_path / "caption.json"
    caption.write_text(CAPTION)
    output = tmp_path / "out.png"
    code = main(
        [
            "generate",
            str(caption),
            "--model",
            "tiny-random",
            "-o",
            str(output),
            "--height",
            "256",
            "--width",
            "320",
            "--steps",
            "2",
            "--seed",
            "3",
        ]
    )
    assert code == 0
    assert Image.open(output).size == (320, 256)
    printed = capsys.readouterr().out
    assert "RANDOM weights" in printed and "noise" in printed


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--height", "250"], "error: `height=250` is not supported"),
        (["--steps", "0"], "error: --steps 0: give a positive number of steps"),
        (["--caption", "missing.json"], "error: caption 'missing.json' is neither a file nor JSON text"),
        (
            ["--caption", '{"compositional_deconstruction":{"elements":[]}}'],
            "pass --caption-check warn to generate anyway or --caption-check off to skip it.",
        ),
    ],
)
def test_generate_reports_bad_input_before_loading_a_model(tmp_path, capsys, monkeypatch, arguments, message):
    import diffusers_ideogram4.testing

    loads = []
    monkeypatch.setattr(diffusers_ideogram4.testing, "tiny_pipeline", lambda **kw: loads.append(kw))
    caption = CAPTION
    if arguments[0] == "--caption":
        caption, arguments = arguments[1], []
    code = main(["generate", caption, "--model", "tiny-random", "-o", str(tmp_path / "x.png"), *arguments])
    assert code == 2
    assert message in capsys.readouterr().err
    assert loads == [] and not (tmp_path / "x.png").exists()


def test_caption_given_inline_equals_caption_file(tmp_path):
    (tmp_path / "c.json").write_text(CAPTION)
    outputs = []
    for source in (str(tmp_path / "c.json"), CAPTION):
        out = tmp_path / f"{len(outputs)}.png"
        main(
            [
                "generate",
                source,
                "--model",
                "tiny-random",
                "-o",
                str(out),
                "--height",
                "256",
                "--width",
                "256",
                "--steps",
                "1",
            ]
        )
        outputs.append(Image.open(out).tobytes())
    assert outputs[0] == outputs[1]
    assert json.loads(CAPTION)


# `ideogram4 caption expand`: short strings and few elements keep the tiny random model's captions short.
EXPAND = ["--model", "tiny-random", "--height", "256", "--width", "320", "--max-chars", "6", "--max-elements", "3"]


def test_expand_validate_generate_round_trip(tmp_path, capsys):
    caption = tmp_path / "caption.json"
    assert (
        main(["caption", "expand", "a jazz poster that says JAZZ NIGHT", *EXPAND, "--seed", "0", "-o", str(caption)])
        == 0
    )
    assert "RANDOM weights" in capsys.readouterr().err
    text = caption.read_text(encoding="utf-8")
    assert text.endswith("\n") and text.count("\n") == 1

    assert main(["caption", "validate", str(caption)]) == 0
    assert capsys.readouterr().out == f"{caption}: ok\n"

    image = tmp_path / "out.png"
    generate = ["generate", str(caption), "--model", "tiny-random", "-o", str(image), "--steps", "2"]
    assert main([*generate, "--height", "256", "--width", "320"]) == 0
    assert Image.open(image).size == (320, 256)
    capsys.readouterr()

    # Without -o the caption goes to stdout alone; the same seed gives the same caption.
    assert main(["caption", "expand", "a jazz poster that says JAZZ NIGHT", *EXPAND, "--seed", "0"]) == 0
    assert capsys.readouterr().out == text


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--height", "250"], "error: `height=250` is not supported"),
        (["--temperature", "-1"], "error: `temperature` must be a finite number >= 0"),
        (["--max-new-tokens", "0"], "error: `max_new_tokens` must be a positive int or None, got 0"),
        (["--max-elements", "20"], "error: `CaptionLimits.max_elements=20`: at most 12"),
        (["--max-chars", "0"], "error: `CaptionLimits.description_chars` must be a positive int, got 0"),
        (["--head", "some/head"], "error: --head does nothing with --model tiny-random"),
    ],
)
def test_expand_reports_bad_input_before_loading_a_model(capsys, monkeypatch, arguments, message):
    import diffusers_ideogram4.testing

    loads = []
    monkeypatch.setattr(diffusers_ideogram4.testing, "tiny_pipeline", lambda **kw: loads.append(kw))
    assert main(["caption", "expand", "a cat", "--model", "tiny-random", *arguments]) == 2
    assert message in capsys.readouterr().err
    assert loads == []


def test_generate_with_an_idea_says_how_to_expand_it(capsys):
    assert main(["generate", "a cat on a mat", "--model", "tiny-random"]) == 2
    assert '`ideogram4 caption expand "idea" -o caption.json`' in capsys.readouterr().err


def test_expand_runs_the_tiny_model_in_the_dtype_asked_for(capsys, monkeypatch):
    import torch

    from diffusers_ideogram4.prompt_expansion import Ideogram4PromptExpansionMixin

    original, dtypes = Ideogram4PromptExpansionMixin.expand_prompt, []

    def recording(self, *args, **kwargs):
        dtypes.append((self.text_encoder.dtype, self.prompt_enhancer_head.lm_head.weight.dtype))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Ideogram4PromptExpansionMixin, "expand_prompt", recording)
    assert main(["caption", "expand", "a cat", *EXPAND, "--seed", "0"]) == 0
    assert main(["caption", "expand", "a cat", *EXPAND, "--seed", "0", "--dtype", "bf16"]) == 0
    assert dtypes == [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]
    capsys.readouterr()
