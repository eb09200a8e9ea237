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
