"""Jobs with an `idea`: expanded per image by the tiny random model and its random head, seeded as
`prompt_upsampling=True` seeds it; recipes, resume, reproduce, `generate --idea`, and the refusals before loading."""

import sys
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image

from conftest import CAPTION, seeded
from diffusers_ideogram4.batch import (
    MANIFEST_NAME,
    check_expansion_kwargs,
    generate_batch,
    make_batches,
    plan_images,
    read_jobs,
    read_manifest,
)
from diffusers_ideogram4.captions.grammar import EXPAND_EXTRA, CaptionLimits
from diffusers_ideogram4.prompt_expansion import HEAD_REPO, INSTRUCTION_VERSION, Ideogram4PromptExpansionMixin
from diffusers_ideogram4.recipe import TINY_RANDOM, HeadSpec, ModelSpec, read_recipe
from test_batch import SMALL, TINY, pngs, run_cli, write_jobs


# One character per string and one element: each caption of the random head takes about 50 tokens (about 1 s).
TINY_LIMITS = CaptionLimits(description_chars=1, style_chars=1, element_chars=1, text_chars=1, max_elements=1)
LIMIT_OPTIONS = ["--max-chars", "1", "--max-elements", "1"]
IDEA = "a jazz poster that says JAZZ NIGHT"
TINY_HEAD = ModelSpec(TINY_RANDOM, dtype="fp32", seed=0, head=HeadSpec(TINY_RANDOM))
CALL = dict(height=256, width=256, num_inference_steps=2, caption_check="off")


@pytest.fixture(scope="module")
def pipe():
    return TINY_HEAD.load_pipeline("cpu")


@pytest.fixture(scope="module")
def plain_pipe():
    return TINY.load_pipeline("cpu")


@pytest.fixture(scope="module")
def first_run(pipe, tmp_path_factory):
    """Two seeds of an idea and a caption line, in batches of 2; (folder, result)."""
    out = tmp_path_factory.mktemp("ideas") / "out"
    jobs = [
        {"idea": IDEA, "name": "jazz", "seeds": [1, 2], **SMALL},
        {"caption": CAPTION, "name": "p", "seed": 1, **SMALL},
    ]
    result = generate_batch(
        pipe, jobs, out, model=TINY_HEAD, batch_size=2, progress=False, expansion_kwargs={"limits": TINY_LIMITS}
    )
    return out, result


# --------------------------------------------------------------------------------------------------------------------
# The job file


def test_idea_lines_are_checked_before_anything_loads():
    job_list = read_jobs(
        [
            {"idea": IDEA, "caption": CAPTION},
            {"idea": ""},
            {"idea": " \n\t"},
            {"idea": ["a", "cat"]},
            {"idea": "a cat \ud800"},
            {"idea": IDEA, "height": 100},
            {"idea": IDEA, "seed": 3},
            {"idea": "夜のジャズ"},
        ]
    )
    assert [str(problem) for problem in job_list.problems] == [
        "line 1: idea: give `caption` (a structured caption) or `idea` (plain text to expand), not both",
        'line 2: idea: is empty (""); write what the image should show, in plain text',
        'line 3: idea: is empty (" \\n\\t"); write what the image should show, in plain text',
        'line 4: idea: must be a plain-text idea (a string), got ["a", "cat"]',
        "line 5: idea: holds \\ud800, half of a surrogate pair, which is not text; fix that escape",
        "line 6: height: `height=100` is not supported: Ideogram 4 needs a multiple of 16 between 256 and 2048 "
        "pixels per side. Try `height=256`.",
    ]
    seventh, eighth = job_list.jobs
    assert (seventh.line, seventh.idea, seventh.caption, seventh.seeds) == (7, IDEA, None, (3,))
    assert eighth.idea == "夜のジャズ" and job_list.idea_lines == [7, 8]
    # The default name hashes the idea and the settings, seeds excluded.
    assert seventh.name != read_jobs([{"idea": IDEA + "!", "seed": 3}]).jobs[0].name
    assert seventh.name != read_jobs([{"idea": IDEA, "seed": 3, "steps": 4}]).jobs[0].name
    assert seventh.name == read_jobs([{"seed": 9, "idea": IDEA}]).jobs[0].name


def test_idea_images_are_never_batched(pipe):
    job_list = read_jobs(
        [{"idea": IDEA, "seeds": [1, 2], **SMALL}, {"caption": CAPTION, "seeds": [3, 4], **SMALL}, {"idea": "x"}]
    )
    job_list.token_counts = {2: 113}
    tasks = plan_images(pipe, job_list, TINY_HEAD, "cpu")
    assert [[task.seed for task in batch] for batch in make_batches(tasks, 4)] == [[1], [2], [3, 4], [0]]
    assert [task.recipe["caption"] for task in tasks] == [None, None, CAPTION, CAPTION, None]


# --------------------------------------------------------------------------------------------------------------------
# Runs


def test_an_idea_image_is_the_image_of_its_expanded_caption(first_run, pipe, plain_pipe, tmp_path):
    out, result = first_run
    assert (result.generated, result.skipped, result.ok) == (3, 0, True)
    for seed in (1, 2):
        recipe = read_recipe(out / f"jazz-{seed}.png")
        caption = pipe.expand_prompt(IDEA, height=256, width=256, generator=seeded(seed), limits=TINY_LIMITS)
        assert recipe["caption"] == caption
        assert recipe["expansion"] == {
            "idea": IDEA,
            "head": {"id": TINY_RANDOM, "revision": None},
            "instruction": INSTRUCTION_VERSION,
            "temperature": 0.7,
            "limits": asdict(TINY_LIMITS),
        }
        assert recipe["model"] == TINY.to_dict()  # the head makes captions, not pixels: not in `model`
        made = np.asarray(Image.open(out / f"jazz-{seed}.png"))
        # The image of the caption with the same seed, and that of prompt_upsampling with the same generator.
        direct = plain_pipe(caption, generator=seeded(seed), **CALL).images[0]
        assert np.array_equal(made, np.asarray(direct))
        upsampled = pipe(
            IDEA,
            generator=seeded(seed),
            prompt_upsampling=True,
            prompt_upsampling_kwargs={"limits": TINY_LIMITS},
            **CALL,
        )
        assert upsampled.captions == [caption]
        assert np.array_equal(made, np.asarray(upsampled.images[0]))
    first, second = (read_recipe(out / f"jazz-{seed}.png")["caption"] for seed in (1, 2))
    assert first != second  # each seed expands its own caption

    # A caption line's image (and recipe) are those of a run without ideas, on a pipeline without the head.
    caption_only = [{"caption": CAPTION, "name": "p", "seed": 1, **SMALL}]
    generate_batch(plain_pipe, caption_only, tmp_path, model=TINY, progress=False)
    assert (tmp_path / "p-1.png").read_bytes() == (out / "p-1.png").read_bytes()

    records = [r for r in read_manifest(out / MANIFEST_NAME)]
    assert [(r["file"], r.get("caption")) for r in records] == [
        ("jazz-1.png", first),
        ("jazz-2.png", second),
        ("p-1.png", None),
    ]


def test_resume_skips_idea_images_and_remakes_them_when_a_field_changes(first_run, pipe, tmp_path):
    out = tmp_path / "out"
    folder, _ = first_run
    out.mkdir()
    for name, data in pngs(folder).items():
        (out / name).write_bytes(data)
    jobs = [
        {"idea": IDEA, "name": "jazz", "seeds": [1, 2], **SMALL},
        {"caption": CAPTION, "name": "p", "seed": 1, **SMALL},
    ]
    again = generate_batch(pipe, jobs, out, model=TINY_HEAD, progress=False, expansion_kwargs={"limits": TINY_LIMITS})
    assert (again.generated, again.skipped, again.ok) == (0, 3, True)
    assert pngs(out) == pngs(folder)
    records = read_manifest(out / MANIFEST_NAME)
    assert [(r["file"], r["generated"], r.get("caption")) for r in records] == [
        ("jazz-1.png", False, read_recipe(out / "jazz-1.png")["caption"]),
        ("jazz-2.png", False, read_recipe(out / "jazz-2.png")["caption"]),
        ("p-1.png", False, None),
    ]

    # Another temperature, or another idea under the same name: made again, the manifest says why.
    jobs[0]["seeds"] = [1]
    hotter = {"limits": TINY_LIMITS, "temperature": 1.0}
    result = generate_batch(pipe, jobs, out, model=TINY_HEAD, progress=False, expansion_kwargs=hotter)
    assert (result.generated, result.skipped) == (1, 1)
    assert read_manifest(out / MANIFEST_NAME)[-1]["replaced"] == "recipe differs in expansion"
    assert read_recipe(out / "jazz-1.png")["expansion"]["temperature"] == 1.0
    jobs[0]["idea"] = "a blues poster"
    result = generate_batch(pipe, jobs, out, model=TINY_HEAD, progress=False, expansion_kwargs=hotter)
    assert (result.generated, result.skipped) == (1, 1)
    assert read_manifest(out / MANIFEST_NAME)[-1]["replaced"] == "recipe differs in expansion"
    assert read_recipe(out / "jazz-1.png")["expansion"]["idea"] == "a blues poster"


def test_reproduce_makes_an_idea_image_from_its_caption_without_the_head(first_run, tmp_path, capsys, monkeypatch):
    import diffusers_ideogram4.testing as testing

    out, _ = first_run
    built = []
    real = testing.tiny_pipeline
    monkeypatch.setattr(testing, "tiny_pipeline", lambda **kw: built.append(kw) or real(**kw))

    def refuse(*args, **kwargs):
        raise AssertionError("reproduce expanded the idea again")

    monkeypatch.setattr(Ideogram4PromptExpansionMixin, "expand_prompt", refuse)
    code, printed, _ = run_cli(capsys, "reproduce", out / "jazz-2.png", "-o", tmp_path / "again.png")
    assert code == 0 and printed == f"Wrote {tmp_path / 'again.png'}: the same pixels as {out / 'jazz-2.png'}.\n"
    assert (tmp_path / "again.png").read_bytes() == (out / "jazz-2.png").read_bytes()
    assert built == [{"seed": 0, "unconditional": True, "prompt_enhancer_head": False}]


def test_cli_batch_with_an_idea_then_resume_and_generate_idea_agrees(tmp_path, capsys, pipe):
    # Not square: the instruction tells the head the image's width and height, which must not be swapped.
    wide = {"height": 256, "width": 512, "steps": 2}
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"idea": IDEA, "name": "jazz", "seed": 0, **wide}])
    command = ["batch", jobs, "--out", tmp_path / "out", "--model", TINY_RANDOM, *LIMIT_OPTIONS]
    code, printed, _ = run_cli(capsys, *command, "--temperature", "1")
    assert code == 0 and "1 of 1 images done (1 generated, 0 already there)" in printed
    recipe = read_recipe(tmp_path / "out" / "jazz-0.png")
    assert recipe["expansion"]["temperature"] == 1.0 and recipe["expansion"]["limits"] == asdict(TINY_LIMITS)
    caption = pipe.expand_prompt(IDEA, height=256, width=512, generator=seeded(0), temperature=1, limits=TINY_LIMITS)
    swapped = pipe.expand_prompt(IDEA, height=512, width=256, generator=seeded(0), temperature=1, limits=TINY_LIMITS)
    assert recipe["caption"] == caption != swapped
    assert Image.open(tmp_path / "out" / "jazz-0.png").size == (512, 256)
    made = (tmp_path / "out" / "jazz-0.png").read_bytes()
    code, printed, _ = run_cli(capsys, *command, "--temperature", "1")
    assert code == 0 and "1 of 1 images done (0 generated, 1 already there)" in printed
    code, printed, _ = run_cli(capsys, *command)  # the default temperature is another expansion
    assert code == 0 and "1 of 1 images done (1 generated, 0 already there)" in printed

    # `generate --idea` writes the same recipe (the tiny weights are seeded by --seed: 0 as in batch), so the same
    # bytes, and prints the caption.
    image = tmp_path / "generated.png"
    generate = ["generate", IDEA, "--idea", "--model", TINY_RANDOM, "--seed", "0", "-o", image, *LIMIT_OPTIONS]
    code, printed, _ = run_cli(
        capsys, *generate, "--height", "256", "--width", "512", "--steps", "2", "--temperature", 1
    )
    assert code == 0 and printed.splitlines()[-1] == f"Caption: {caption}"
    assert read_recipe(image)["caption"] == caption and image.read_bytes() == made


# --------------------------------------------------------------------------------------------------------------------
# Refusals before any model work


def test_ideas_without_llguidance_are_refused_before_loading(tmp_path, capsys, monkeypatch, no_model, pipe):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # as if the `expand` extra were not installed
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        [{"idea": IDEA, **SMALL}, {"caption": CAPTION, **SMALL}, {"idea": "a cat", **SMALL}],
    )
    code, out, err = run_cli(capsys, "batch", jobs, "--out", tmp_path / "out", "--model", TINY_RANDOM)
    assert code == 2 and out == ""
    assert err == (
        f"error: {jobs}: lines 1, 3 have an `idea` to expand into a caption. Prompt expansion constrains decoding "
        f"with llguidance, which is not installed: {EXPAND_EXTRA} (or give those lines a `caption` instead)\n"
    )
    assert no_model == [] and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"^jobs: line 1 has an `idea` to expand into a caption\. Prompt expansion"):
        generate_batch(pipe, [{"idea": IDEA, **SMALL}], tmp_path / "api", model=TINY_HEAD, progress=False)
    assert not (tmp_path / "api").exists()
    code, _, err = run_cli(capsys, "generate", IDEA, "--idea", "--model", TINY_RANDOM)
    assert code == 2 and err == (
        f"error: --idea: Prompt expansion constrains decoding with llguidance, which is not installed: {EXPAND_EXTRA}\n"
    )
    assert no_model == []


@pytest.mark.parametrize(
    "command, arguments, message",
    [
        ("batch", ["--head", "org/head"], "error: --head: no valid line of {jobs} has an `idea`, so nothing is "),
        ("batch", ["--temperature", "0", "--max-chars", "4"], "error: --temperature and --max-chars: no valid line"),
        ("idea-batch", ["--head", "org/head"], "error: --head does nothing with --model tiny-random (it builds its"),
        ("idea-batch", ["--temperature", "-1"], "error: `temperature` must be a finite number >= 0 (0 decodes gre"),
        ("idea-batch", ["--max-elements", "20"], "error: `CaptionLimits.max_elements=20`: at most 12"),
        ("generate", ["--head", "org/head"], "error: --head: without --idea, nothing is expanded; drop it.\n"),
        ("generate", ["--max-elements", "2"], "error: --max-elements: without --idea, nothing is expanded; drop it."),
        (
            "idea",
            ["--caption-check", "off"],
            "error: --caption-check off: an expanded idea always passes the caption ",
        ),
        ("idea", ["--height", "100"], "error: `height=100` is not supported"),
        ("idea", ["--head", "a/b"], "error: --head does nothing with --model tiny-random (it builds its own random"),
    ],
)
def test_cli_refuses_idea_options_that_would_do_nothing(tmp_path, capsys, no_model, command, arguments, message):
    lines = [{"idea": IDEA, **SMALL}] if command == "idea-batch" else [{"caption": CAPTION, **SMALL}, {"idea": ""}]
    jobs = write_jobs(tmp_path / "jobs.jsonl", lines)
    if command.endswith("batch"):
        base = ["batch", jobs, "--out", tmp_path / "out", "--skip-invalid"]
    else:
        base = ["generate", CAPTION if command == "generate" else IDEA, *(["--idea"] if command == "idea" else [])]
    code, _, err = run_cli(capsys, *base, "--model", TINY_RANDOM, *arguments)
    assert code == 2
    assert err.startswith(message.format(jobs=jobs))
    assert no_model == []


def test_an_idea_that_is_not_text_is_refused_before_loading(tmp_path, capsys, no_model, pipe):
    """A command-line argument with a byte the locale cannot decode arrives as a lone surrogate (as a job file's
    `\\udce9` escape would, which the job checks refuse): the tokenizer cannot take it."""
    code, _, err = run_cli(
        capsys, "generate", "a caf\udce9 sign", "--idea", "--model", TINY_RANDOM, "-o", tmp_path / "x.png"
    )
    assert code == 2 and err == (
        "error: `prompt[0]` holds a lone surrogate U+DCE9 at character 5, which UTF-8 cannot encode; write the "
        "character itself or remove it.\n"
    )
    assert no_model == [] and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"^`prompt\[1\]` holds a lone surrogate U\+D800 at character 0,"):
        pipe.expand_prompt(["a cat", "\ud800"], limits=TINY_LIMITS)


def test_the_api_refuses_what_ideas_need_and_do_not_take(tmp_path, pipe, plain_pipe):
    idea = [{"idea": IDEA, **SMALL}]
    with pytest.raises(ValueError, match=r"^Jobs with an `idea` are expanded by the pipeline's optional `prompt_"):
        generate_batch(plain_pipe, idea, tmp_path, model=TINY, progress=False)
    with pytest.raises(ValueError, match=r"^Jobs with an `idea` record the prompt-enhancer head .* names none\."):
        generate_batch(pipe, idea, tmp_path, model=TINY, progress=False)
    with pytest.raises(ValueError, match=r"^`expansion_kwargs` applies to jobs with an `idea`, and jobs has none"):
        generate_batch(pipe, [{"caption": CAPTION}], tmp_path, model=TINY_HEAD, expansion_kwargs={"temperature": 0})
    with pytest.raises(ValueError, match=r"^`expansion_kwargs` must be a dict with keys among \['temperature', "):
        generate_batch(pipe, idea, tmp_path, model=TINY_HEAD, expansion_kwargs={"temp": 0})
    with pytest.raises(ValueError, match=r"^`max_new_tokens` must be a positive int or None, got 0\.$"):
        check_expansion_kwargs(read_jobs(idea), {"max_new_tokens": 0})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"does nothing with --model tiny-random"):
        ModelSpec.from_options(TINY_RANDOM, head=HEAD_REPO)
    with pytest.raises(ValueError, match=r"^--head tiny-random goes with --model tiny-random only"):
        ModelSpec.from_options(str(tmp_path), head=TINY_RANDOM)
    assert ModelSpec.from_options(TINY_RANDOM, head=TINY_RANDOM) == TINY_HEAD


def test_an_expansion_that_fails_makes_that_image_fail_only(tmp_path, pipe):
    jobs = [{"idea": IDEA, "name": "jazz", "seed": 1, **SMALL}, {"caption": CAPTION, "name": "p", **SMALL}]
    result = generate_batch(
        pipe, jobs, tmp_path, model=TINY_HEAD, progress=False, expansion_kwargs={"max_new_tokens": 3}
    )
    assert (result.generated, result.ok) == (1, False)
    assert [(r["file"], r["status"]) for r in read_manifest(tmp_path / MANIFEST_NAME)] == [
        ("jazz-1.png", "failed"),
        ("p-0.png", "done"),
    ]
    assert result.failed[0]["error"].startswith(
        "ValueError: The caption for `prompt[0]` did not end within `max_new_tokens=3` tokens"
    )
    assert sorted(pngs(tmp_path)) == ["p-0.png"]


def test_caption_expand_without_llguidance_is_a_one_line_error(capsys, monkeypatch, no_model):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    code, out, err = run_cli(capsys, "caption", "expand", IDEA, "--model", TINY_RANDOM)
    assert code == 2 and out == ""
    assert err == (
        "error: caption expand: Prompt expansion constrains decoding with llguidance, which is not installed: "
        f"{EXPAND_EXTRA}\n"
    )
    assert no_model == []
