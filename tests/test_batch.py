"""`ideogram4 batch`, `generate_batch` and `ideogram4 reproduce` on the tiny random model: job-file checks, resume,
--force, a killed run, batching, LoRAs in the recipe, bit-for-bit reproduction and two processes under accelerate."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers_ideogram4
from conftest import CAPTION, CAPTION_SHORT, seeded
from diffusers_ideogram4.batch import (
    MANIFEST_NAME,
    JobFileError,
    RunLock,
    generate_batch,
    make_batches,
    plan_images,
    read_jobs,
    read_manifest,
)
from diffusers_ideogram4.captions import CaptionWarning, check_caption, to_json
from diffusers_ideogram4.cli import main
from diffusers_ideogram4.files import UserFileError
from diffusers_ideogram4.recipe import (
    RECIPE_KEY,
    TINY_RANDOM,
    ModelSpec,
    RecipeError,
    read_recipe,
    recipe_identity,
    write_png,
)


SMALL = {"height": 256, "width": 256, "steps": 2}
TINY = ModelSpec(TINY_RANDOM, dtype="fp32", seed=0)
SRC = Path(diffusers_ideogram4.__file__).resolve().parents[1]


def caption_object() -> dict:
    return json.loads(CAPTION)


def write_jobs(path: Path, lines: list) -> Path:
    """Each entry a dict (written as JSON) or a str (written as is)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def pngs(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.png"))}


def run_cli(capsys, *arguments) -> tuple[int, str, str]:
    code = main([str(argument) for argument in arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def pipe():
    return TINY.load_pipeline("cpu")


# --------------------------------------------------------------------------------------------------------------------
# The job file


def test_every_bad_line_is_reported_with_its_number_and_field(tmp_path):
    cap = caption_object()
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        [
            {"caption": cap, "sed": 3},
            {"caption": cap, "seed": 1.5},
            {"caption": cap, "seed": "7"},
            {"caption": {"compositional_deconstruction": {"elements": []}}},
            {"idea": 5},
            '{"caption": ',
            "[1, 2]",
            '{"caption": ' + json.dumps(CAPTION) + ', "seed": 1, "seed": 2}',
            {"caption": cap, "name": "a/b"},
            {"caption": cap, "seeds": [1, 1]},
            {"caption": cap, "num_images": 0},
            {"caption": cap, "seeds": [1], "seed": 2},
            {"caption": cap, "name": "p", "seeds": [1, 2]},
            {"caption": cap, "name": "p", "seed": 2},
            {"caption": cap, "height": 250, "preset": "fast", "steps": 0, "guidance_scale": True},
            '{"caption": ' + json.dumps(CAPTION) + ', "seed": NaN}',
            {"caption": {"compositional_deconstruction": {"background": "\ud800", "elements": []}}},
            {"caption": 5},
            {"seed": 3},
            {"caption": cap, "seed": 2**64},
            "",  # blank lines are skipped, and counted
            {"caption": cap, "seed": True},
        ],
    )
    job_list = read_jobs(jobs)
    assert [job.line for job in job_list.jobs] == [13]
    assert [str(problem) for problem in job_list.problems] == [
        "line 1: sed: unknown field; did you mean `seed`? a job has caption, idea, seed, seeds, num_images, height, "
        "width, preset, steps, guidance_scale, name",
        "line 2: seed: must be an int from 0 to 18446744073709551615 (the initial noise's seed), got 1.5",
        'line 3: seed: must be an int from 0 to 18446744073709551615 (the initial noise\'s seed), got "7"',
        "line 4: caption.compositional_deconstruction.background: missing required key 'background' (The "
        "background of the image, as a phrase or sentence)",
        "line 5: idea: must be a plain-text idea (a string), got 5",
        "line 6: not valid JSON (Expecting value at column 13)",
        'line 7: a job is a JSON object such as {"caption": {...}, "seed": 7}, got [1, 2]',
        "line 8: seed: given twice in one object; keep one",
        'line 9: name: must be 1 to 100 letters, digits, `_`, `-` or `.`, not starting with `.` or `-`, got "a/b" '
        "(it names the files `{name}-{seed}.png`)",
        "line 10: seeds: lists 1 twice; each seed makes one image",
        "line 11: num_images: must be an int from 1 to 10000 (images made with seed, seed + 1, ...), got 0",
        "line 12: seed: give `seeds` (a list) or `seed`, not both",
        "line 14: name: makes p-2.png, which line 13 makes too; give one of them another `name` or seed",
        "line 15: height: `height=250` is not supported: Ideogram 4 needs a multiple of 16 between 256 and 2048 "
        "pixels per side. Try `height=256`.",
        "line 15: preset: \"fast\" is not a preset; use one of ['default_20', 'distilled', 'quality_48', 'turbo_12']",
        "line 15: steps: must be an int from 1 to 10000 (denoising steps), got 0",
        "line 15: guidance_scale: must be a finite number, got true",
        "line 16: not valid JSON (NaN is not JSON (numbers must be finite))",
        "line 17: caption: holds \\ud800, half of a surrogate pair, which is not text; fix that escape",
        "line 18: caption: must be a caption object or its JSON text, got 5",
        "line 19: caption: missing; every job needs a `caption` (a caption object or its JSON text) or an `idea` "
        "(plain text to expand into one)",
        "line 20: seed: must be an int from 0 to 18446744073709551615 (the initial noise's seed), got "
        "18446744073709551616",
        "line 22: seed: must be an int from 0 to 18446744073709551615 (the initial noise's seed), got true",
    ]
    message = str(job_list.error("Fix them."))
    assert message.startswith(
        f"{jobs}: 20 invalid lines (lines 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ...):\n  line 1: sed: unknown field"
    )
    assert message.endswith("\nFix them.")


def test_a_valid_job_expands_into_its_images(tmp_path):
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        [
            {"caption": CAPTION, "seed": 5, "num_images": 3, "height": 512, "width": 256, "preset": "turbo_12"},
            {"caption": caption_object(), "seeds": [9, 2], "name": "poster", "guidance_scale": 4, "steps": 3},
            {"caption": CAPTION_SHORT},
        ],
    )
    job_list = read_jobs(jobs)
    assert job_list.problems == []
    first, second, third = job_list.jobs
    assert (first.seeds, first.height, first.width, first.preset, first.steps) == (
        (5, 6, 7),
        512,
        256,
        "turbo_12",
        None,
    )
    assert first.caption == CAPTION and second.caption == CAPTION  # an object is serialized minified, keys in order
    assert (second.seeds, second.name, second.guidance_scale, second.steps) == ((9, 2), "poster", 4.0, 3)
    assert second.file_name(9) == "poster-9.png"
    assert third.seeds == (0,) and (third.height, third.width) == (1024, 1024)
    # The default name is a hash of what the image shows, seeds excluded: stable when lines move.
    assert len(first.name) == 12 and first.name != third.name
    moved = read_jobs([{"caption": CAPTION_SHORT, "seed": 4}, {"caption": CAPTION_SHORT}])
    assert moved.jobs[0].name == moved.jobs[1].name == third.name
    assert [note.field for note in job_list.notes] == ["caption.high_level_description"]  # a warning, not an error


def test_cli_reports_bad_lines_before_loading_anything(tmp_path, capsys, no_model):
    cap = caption_object()
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        [{"caption": cap, **SMALL}, {"caption": cap, "sed": 1}, {"caption": cap, "seed": 2.5}, {"caption": "{}"}],
    )
    code, out, err = run_cli(capsys, "batch", jobs, "--out", tmp_path / "out", "--model", TINY_RANDOM)
    assert code == 2 and out == ""
    assert err == (
        f"error: {jobs}: 3 invalid lines (lines 2, 3, 4):\n"
        "  line 2: sed: unknown field; did you mean `seed`? a job has caption, idea, seed, seeds, num_images, height, "
        "width, preset, steps, guidance_scale, name\n"
        "  line 3: seed: must be an int from 0 to 18446744073709551615 (the initial noise's seed), got 2.5\n"
        "  line 4: caption.compositional_deconstruction: missing required key 'compositional_deconstruction' (What "
        "is in the image: a background and the list of elements placed on it)\n"
        "Fix these lines, or pass --skip-invalid to record them in the manifest and generate the others.\n"
    )
    assert no_model == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            ["--out", "FILE"],
            "error: --out '{tmp}/FILE' is a file; give a folder for the images (created if missing).\n",
        ),
        (["--out", "o", "--batch-size", "0"], "error: --batch-size 0: give a positive number of images per call.\n"),
        (["--out", "o", "--lora", "missing.safetensors:0.5"], "error: --lora 'missing.safetensors': no such file;"),
        (["--out", "o", "--lora", "x.safetensors:nan"], "error: --lora 'x.safetensors:nan': the scale 'nan' is not a"),
        (["--out", "o", "--revision", "main"], "error: --revision 'main': the tiny-random model is built locally"),
    ],
)
def test_cli_refuses_bad_options_before_loading_anything(tmp_path, capsys, monkeypatch, no_model, arguments, message):
    (tmp_path / "FILE").write_text("not a folder")
    (tmp_path / "x.safetensors").write_bytes(b"")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"caption": CAPTION, **SMALL}])
    monkeypatch.chdir(tmp_path)
    arguments = [str(tmp_path / a) if a in ("FILE", "o") else a for a in arguments]
    code, _, err = run_cli(capsys, "batch", jobs, "--model", TINY_RANDOM, *arguments)
    assert code == 2
    assert err.startswith(message.format(tmp=tmp_path))
    assert no_model == []


def test_the_readme_job_file_and_manifest_agree(tmp_path):
    readme = (SRC.parent / "README.md").read_text(encoding="utf-8")
    job_file, manifest = re.findall(r"```jsonl\n(.*?)```", readme, flags=re.S)
    job_list = read_jobs(write_jobs(tmp_path / "jobs.jsonl", job_file.splitlines()))
    assert [(job.line, job.name, job.seeds, job.idea) for job in job_list.jobs] == [
        (1, "seaside", (1, 2, 3), None),
        (2, "hello", (10, 11), None),
        (3, "jazz", (7,), "a jazz poster that says JAZZ NIGHT"),
    ]
    assert [(problem.line, problem.field) for problem in job_list.problems] == [(4, "sed")]
    records = [json.loads(line) for line in manifest.splitlines()]
    assert [(r["status"], r["line"], r.get("file")) for r in records] == [
        ("invalid", 4, None),
        *[("done", 1, f"seaside-{seed}.png") for seed in (1, 2, 3)],
        *[("done", 2, f"hello-{seed}.png") for seed in (10, 11)],
        ("done", 3, "jazz-7.png"),
    ]
    assert records[0]["error"] == job_list.problems[0].text
    assert "line 4: " + records[0]["error"] in readme  # the example error
    # An idea's record holds the caption it was expanded into: valid, in canonical form.
    assert [r for r in records if "caption" in r] == [records[-1]]
    caption = records[-1]["caption"]
    assert check_caption(caption) == [] and to_json(json.loads(caption)) == caption


# --------------------------------------------------------------------------------------------------------------------
# Runs


def test_single_process_run_then_resume_skips_then_force_regenerates(tmp_path, capsys):
    cap = caption_object()
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        [{"caption": cap, "seeds": [1, 2], "name": "poster", **SMALL}, {"caption": CAPTION_SHORT, "seed": 4, **SMALL}],
    )
    out = tmp_path / "out"
    command = ["batch", jobs, "--out", out, "--model", TINY_RANDOM]
    code, printed, _ = run_cli(capsys, *command)
    assert code == 0
    first = pngs(out)
    short_name = read_jobs(jobs).jobs[1].name
    assert sorted(first) == sorted(["poster-1.png", "poster-2.png", f"{short_name}-4.png"])
    assert printed.splitlines()[0] == "Using a tiny model with RANDOM weights: the images are noise, not pictures."
    assert printed.splitlines()[1].startswith("rank 0: 3 generated, 0 failed in ")
    assert printed.splitlines()[2] == (
        f"3 of 3 images done (3 generated, 0 already there), 0 failed, 0 invalid lines; manifest: {out / MANIFEST_NAME}"
    )
    recipe = read_recipe(out / "poster-2.png")
    assert (recipe["caption"], recipe["seed"], recipe["height"], recipe["num_inference_steps"]) == (CAPTION, 2, 256, 2)
    assert recipe["guidance_schedule"] == [3.0, 3.0] and (recipe["mu"], recipe["std"]) == (0.0, 1.5)
    assert recipe["model"] == {"id": TINY_RANDOM, "revision": None, "dtype": "fp32", "seed": 0, "loras": []}
    assert recipe["made_with"]["cpu_threads"] == torch.get_num_threads()
    mtimes = {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")}

    code, printed, _ = run_cli(capsys, *command)
    assert code == 0
    assert "3 of 3 images done (0 generated, 3 already there)" in printed
    assert pngs(out) == first
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")} == mtimes  # not even rewritten

    code, printed, _ = run_cli(capsys, *command, "--force")
    assert code == 0 and "3 of 3 images done (3 generated, 0 already there)" in printed
    assert pngs(out) == first  # the same bytes again

    runs = {}
    for record in read_manifest(out / MANIFEST_NAME):
        runs.setdefault(record.pop("run"), []).append(record)
    assert len(runs) == 3
    first_run, second_run, third_run = runs.values()
    assert [(r["status"], r["file"], r["generated"], r["line"]) for r in first_run] == [
        ("done", "poster-1.png", True, 1),
        ("done", "poster-2.png", True, 1),
        ("done", f"{short_name}-4.png", True, 2),
    ]
    assert [(r["status"], r["generated"]) for r in second_run] == [("done", False)] * 3
    assert [r["replaced"] for r in third_run] == ["--force"] * 3


def test_skip_invalid_records_the_lines_and_makes_the_others(tmp_path, capsys):
    cap = caption_object()
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        [{"caption": cap, "seed": 1, **SMALL}, {"caption": cap, "seed": "one", **SMALL}, {"idea": ""}],
    )
    out = tmp_path / "out"
    code, printed, _ = run_cli(capsys, "batch", jobs, "--out", out, "--model", TINY_RANDOM, "--skip-invalid")
    assert code == 1  # not every job is done
    assert printed.splitlines()[-1] == (
        f"1 of 1 images done (1 generated, 0 already there), 0 failed, 2 invalid lines (lines 2, 3); "
        f"manifest: {out / MANIFEST_NAME}"
    )
    records = [{k: v for k, v in r.items() if k not in ("run", "seconds")} for r in read_manifest(out / MANIFEST_NAME)]
    name = read_jobs(jobs).jobs[0].name
    assert records == [
        {
            "status": "invalid",
            "line": 2,
            "error": 'seed: must be an int from 0 to 18446744073709551615 (the initial noise\'s seed), got "one"',
        },
        {"status": "invalid", "line": 3, "error": read_jobs(jobs).problems[1].text},
        {"status": "done", "line": 1, "name": name, "seed": 1, "file": f"{name}-1.png", "generated": True, "rank": 0},
    ]


def test_a_job_whose_recipe_changed_is_made_again(tmp_path, pipe):
    out = tmp_path / "out"
    generate_batch(
        pipe, [{"caption": CAPTION, "name": "p", "seeds": [1, 2], **SMALL}], out, model=TINY, progress=False
    )
    before = pngs(out)
    result = generate_batch(
        pipe,
        [{"caption": CAPTION, "name": "p", "seeds": [1, 2], **SMALL, "steps": 3}],
        out,
        model=TINY,
        progress=False,
    )
    assert (result.generated, result.skipped, result.ok) == (2, 0, True)
    assert pngs(out).keys() == before.keys() and all(pngs(out)[name] != before[name] for name in before)
    last = read_manifest(out / MANIFEST_NAME)[-1]
    assert last["replaced"] == "recipe differs in guidance_schedule, num_inference_steps"
    assert read_recipe(out / "p-2.png")["num_inference_steps"] == 3


def test_an_incomplete_image_is_made_again_and_a_torn_manifest_line_is_cut(tmp_path, pipe, capsys):
    out = tmp_path / "out"
    jobs = [{"caption": CAPTION, "name": "p", "seeds": [1, 2], **SMALL}]
    generate_batch(pipe, jobs, out, model=TINY, progress=False)
    before = pngs(out)
    (out / "p-1.png").write_bytes(before["p-1.png"][:-100])  # truncated, e.g. by a copy
    with pytest.raises(RecipeError, match=r"p-1.png: not a complete, readable PNG"):
        read_recipe(out / "p-1.png")
    (out / ".p-2.png.0123abcd.tmp").write_bytes(b"partial")  # what a killed write leaves
    torn = '{"run": "x", "status": "do'  # a record cut by a power loss
    with open(out / MANIFEST_NAME, "a") as handle:
        handle.write(torn)
    capsys.readouterr()
    result = generate_batch(pipe, jobs, out, model=TINY, progress=False)
    printed = capsys.readouterr().out
    assert f"{out / MANIFEST_NAME}: removed an incomplete last record ({len(torn)} bytes) of a killed run." in printed
    assert f"Removed {out / '.p-2.png.0123abcd.tmp'}, a partial image of a killed run." in printed
    assert (result.generated, result.skipped) == (1, 1)
    assert pngs(out) == before and sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []
    records = read_manifest(out / MANIFEST_NAME)  # every line parses again
    assert records[-1]["replaced"].startswith("unreadable: ")


def test_batched_images_are_the_images_made_alone(tmp_path, pipe):
    jobs = [
        {"caption": CAPTION, "seeds": [1, 2, 3], **SMALL},
        {"caption": CAPTION_SHORT, "seeds": [4, 5], **SMALL},
        {"caption": CAPTION.replace("HELLO", "HOLLA"), "seed": 6, **SMALL},  # another caption, another token count
    ]
    with pytest.warns(CaptionWarning, match=r"jobs: caption warnings:\n  line 2: caption.high_level_description: "):
        alone = generate_batch(pipe, jobs, tmp_path / "alone", model=TINY, progress=False)
    with pytest.warns(CaptionWarning):
        batched = generate_batch(pipe, jobs, tmp_path / "batched", model=TINY, batch_size=3, progress=False)
    assert (alone.generated, batched.generated) == (6, 6)
    assert pngs(tmp_path / "alone") == pngs(tmp_path / "batched")
    # The batches: equal token counts only (a mixed batch needs an attention mask, which rounds differently).
    job_list = read_jobs(jobs)
    job_list.token_counts = {1: 113, 2: 34, 3: 121}
    tasks = plan_images(pipe, job_list, TINY, "cpu")
    assert [[task.seed for task in batch] for batch in make_batches(tasks, 2)] == [[1, 2], [3], [4, 5], [6]]


def test_an_image_is_the_same_alone_or_in_a_batch(pipe):
    """The property batching rests on: one model time for the whole batch, and the VAE decoding one image at a time
    (vae slicing); each image then has the same bits whatever else is in its pipeline call."""
    call = dict(height=256, width=256, num_inference_steps=2, output_type="np", caption_check="off")
    alone = [pipe(CAPTION, generator=seeded(seed), **call).images[0] for seed in (1, 2)]
    pipe.vae.enable_slicing()
    try:
        together = pipe([CAPTION, CAPTION], generator=[seeded(1), seeded(2)], **call).images
        per_prompt = pipe(CAPTION, num_images_per_prompt=2, generator=[seeded(1), seeded(2)], **call).images
    finally:
        pipe.vae.disable_slicing()
    for index in range(2):
        assert np.array_equal(together[index], alone[index])
        assert np.array_equal(per_prompt[index], alone[index])


def test_the_api_names_the_model_in_every_recipe(tmp_path, pipe):
    with pytest.raises(ValueError, match=r"^`model` is needed: this pipeline was not loaded with from_pretrained"):
        generate_batch(pipe, [{"caption": CAPTION, **SMALL}], tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"^`model.dtype='bf16'` but the pipeline's transformer runs in fp32\.$"):
        generate_batch(pipe, [{"caption": CAPTION, **SMALL}], tmp_path, model=ModelSpec(TINY_RANDOM), progress=False)
    with pytest.raises(JobFileError, match=r"pass skip_invalid=True to record them"):
        generate_batch(pipe, [{"caption": CAPTION, "seed": -1}], tmp_path, model=TINY, progress=False)
    with pytest.raises(ValueError, match=r"^`batch_size` must be a positive int, got 0\.$"):
        generate_batch(pipe, [], tmp_path, model=TINY, batch_size=0)
    assert list(tmp_path.iterdir()) == []


def test_settings_a_recipe_cannot_name_are_refused(tmp_path):
    from diffusers import FirstBlockCacheConfig, UniPCMultistepScheduler

    pipe = TINY.load_pipeline("cpu")
    pipe.scheduler = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError) as refused:
        generate_batch(pipe, [{"caption": CAPTION, **SMALL}], tmp_path, model=TINY, progress=False)
    assert str(refused.value).startswith(
        "The pipeline runs with the scheduler UniPCMultistepScheduler (not the reference sampler) and a cache on "
        "`transformer` (FirstBlockCacheConfig), which a recipe cannot name, so its images could not be reproduced."
    )
    assert list(tmp_path.iterdir()) == []


def test_one_run_per_output_folder(tmp_path, pipe):
    with RunLock(tmp_path):
        with pytest.raises(ValueError, match=rf"^{tmp_path}: another `ideogram4 batch` run \(pid {os.getpid()}\)"):
            generate_batch(pipe, [{"caption": CAPTION, **SMALL}], tmp_path, model=TINY, progress=False)
    assert pngs(tmp_path) == {}


def test_the_command_refuses_a_folder_another_run_holds_before_loading(tmp_path, capsys, no_model):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"caption": CAPTION, **SMALL}])
    out = tmp_path / "out"
    out.mkdir()
    with RunLock(out):
        code, _, err = run_cli(capsys, "batch", jobs, "--out", out, "--model", TINY_RANDOM)
    assert code == 2
    assert err.startswith(f"error: {out}: another `ideogram4 batch` run (pid {os.getpid()}) is writing there;")
    assert no_model == [] and pngs(out) == {}


def test_a_run_killed_after_its_first_image_resumes_to_the_same_files(tmp_path, pipe):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"caption": CAPTION, "name": "p", "seeds": list(range(8)), **SMALL}])
    reference = generate_batch(pipe, jobs, tmp_path / "reference", model=TINY, progress=False)
    assert reference.generated == 8
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "diffusers_ideogram4.cli", "batch", str(jobs), "--out", str(out)]
    process = subprocess.Popen(
        [*command, "--model", TINY_RANDOM], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while not (out.is_dir() and any(out.glob("*.png"))):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    process.stderr.close()
    left = sorted(out.glob("*.png"))
    assert 1 <= len(left) < 8  # killed mid-run
    for path in left:  # whatever has a final name is complete
        with Image.open(path) as image:
            image.load()
        assert read_recipe(path)["caption"] == CAPTION

    resumed = generate_batch(pipe, jobs, out, model=TINY, progress=False)
    assert resumed.skipped == len(left) and resumed.generated == 8 - len(left) and resumed.ok
    assert pngs(out) == pngs(tmp_path / "reference")
    assert [p.name for p in out.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")] == []


# --------------------------------------------------------------------------------------------------------------------
# Recipes and reproduce


def test_reproduce_regenerates_an_image_bit_for_bit(tmp_path, capsys, pipe):
    out = tmp_path / "out"
    generate_batch(pipe, [{"caption": CAPTION, "name": "p", "seed": 3, **SMALL}], out, model=TINY, progress=False)
    code, printed, _ = run_cli(capsys, "reproduce", out / "p-3.png", "-o", tmp_path / "again.png")
    assert code == 0
    assert printed == f"Wrote {tmp_path / 'again.png'}: the same pixels as {out / 'p-3.png'}.\n"
    assert (tmp_path / "again.png").read_bytes() == (out / "p-3.png").read_bytes()


def test_reproduce_says_when_the_pixels_differ(tmp_path, capsys, monkeypatch, pipe):
    import diffusers_ideogram4.recipe as recipe_module

    generate_batch(pipe, [{"caption": CAPTION, "name": "p", "seed": 3, **SMALL}], tmp_path, model=TINY, progress=False)
    original = read_recipe(tmp_path / "p-3.png")
    elsewhere = {**original["made_with"], "device": "cuda", "torch": "9.9"}
    monkeypatch.setattr(
        recipe_module,
        "reproduce_image",
        lambda recipe, device, offload: (Image.new("RGB", (256, 256)), {**recipe, "made_with": elsewhere}),
    )
    code, printed, _ = run_cli(capsys, "reproduce", tmp_path / "p-3.png")
    assert code == 1
    assert printed == (
        f"Wrote {tmp_path / 'p-3.reproduced.png'}: the pixels differ from {tmp_path / 'p-3.png'} (made with device "
        f"cpu -> cuda, torch {original['made_with']['torch']} -> 9.9).\n"
    )


def test_reproduce_refuses_what_it_cannot_run(tmp_path, capsys, no_model):
    Image.new("RGB", (16, 16)).save(tmp_path / "plain.png")
    code, _, err = run_cli(capsys, "reproduce", tmp_path / "plain.png")
    assert code == 2
    assert err == (
        f"error: {tmp_path / 'plain.png'}: the image has no `{RECIPE_KEY}` text chunk; only images written by "
        "`ideogram4 generate` or `ideogram4 batch` carry their recipe.\n"
    )
    recipe = {"format": 1, "caption": CAPTION, "seed": 0}
    write_png(Image.new("RGB", (16, 16)), tmp_path / "partial.png", recipe)
    code, _, err = run_cli(capsys, "reproduce", tmp_path / "partial.png")
    assert err == (
        f"error: {tmp_path / 'partial.png'}: the recipe lacks height, width, preset, num_inference_steps, "
        "guidance_schedule, mu, std, model, made_with.\n"
    )
    code, _, err = run_cli(capsys, "reproduce", tmp_path / "partial.png", "-o", tmp_path / "partial.png")
    assert code == 2 and "lacks" in err
    assert no_model == []


def make_tiny_lora(folder: Path) -> Path:
    """A LoRA for the tiny conditional transformer with random non-zero factors, in diffusers' model format."""
    from peft import LoraConfig

    from diffusers_ideogram4.testing import tiny_transformer

    torch.manual_seed(3)
    model = tiny_transformer(seed=0)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False), "a")
    model.save_lora_adapter(folder, adapter_name="a")
    return folder / "pytorch_lora_weights.safetensors"


def test_generate_with_a_lora_records_it_and_reproduce_checks_the_file(tmp_path, capsys):
    lora = make_tiny_lora(tmp_path)
    base = ["generate", CAPTION, "--model", TINY_RANDOM, "--height", "256", "--width", "256", "--steps", "2"]
    assert run_cli(capsys, *base, "-o", tmp_path / "plain.png")[0] == 0
    assert run_cli(capsys, *base, "-o", tmp_path / "styled.png", "--lora", f"{lora}:0.5")[0] == 0
    plain, styled = read_recipe(tmp_path / "plain.png"), read_recipe(tmp_path / "styled.png")
    import hashlib

    assert styled["model"]["loras"] == [
        {"path": str(lora), "scale": 0.5, "sha256": hashlib.sha256(lora.read_bytes()).hexdigest()}
    ]
    assert recipe_identity(plain) == {**recipe_identity(styled), "model": {**styled["model"], "loras": []}}
    pixels = [np.asarray(Image.open(tmp_path / name)) for name in ("plain.png", "styled.png")]
    assert not np.array_equal(*pixels)

    code, printed, _ = run_cli(capsys, "reproduce", tmp_path / "styled.png")
    assert code == 0 and printed.endswith("the same pixels as " + str(tmp_path / "styled.png") + ".\n")
    assert (tmp_path / "styled.reproduced.png").read_bytes() == (tmp_path / "styled.png").read_bytes()

    lora.write_bytes(lora.read_bytes() + b" ")
    code, _, err = run_cli(capsys, "reproduce", tmp_path / "styled.png")
    assert code == 2
    assert (
        err
        == f"error: LoRA {str(lora)!r} has changed: its sha256 is no longer {styled['model']['loras'][0]['sha256']}. Restore that file.\n"
    )


def test_a_local_model_folder_is_loaded_named_and_reproduced(tmp_path, capsys, monkeypatch):
    from diffusers_ideogram4.testing import tiny_pipeline

    tiny_pipeline(seed=0).save_pretrained(tmp_path / "model")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"caption": CAPTION, "name": "p", "seed": 1, **SMALL}])
    monkeypatch.chdir(tmp_path)
    code, _, _ = run_cli(capsys, "batch", jobs, "--out", "out", "--model", "model", "--dtype", "fp32")
    assert code == 0
    recipe = read_recipe(tmp_path / "out" / "p-1.png")
    assert recipe["model"] == {
        "id": str(tmp_path / "model"),
        "revision": None,
        "dtype": "fp32",
        "seed": None,
        "loras": [],
    }
    monkeypatch.chdir(tmp_path / "out")  # the recipe holds the folder's absolute path
    code, printed, _ = run_cli(capsys, "reproduce", "p-1.png", "-o", tmp_path / "again.png")
    assert code == 0 and "the same pixels" in printed
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "out" / "p-1.png").read_bytes()


def test_a_hub_revision_is_recorded_as_its_commit(tmp_path, monkeypatch):
    import huggingface_hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--org--repo" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    asked = []

    def download(repo_id, filename, revision=None):
        asked.append((repo_id, filename, revision))
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    model = ModelSpec.from_options("org/repo", revision="v1.0")
    assert (model.id, model.revision, model.dtype, model.seed) == ("org/repo", commit, "bf16", None)
    assert asked == [("org/repo", "model_index.json", "v1.0")]
    with pytest.raises(ValueError, match=r"is a local folder; a revision applies to hub repos only"):
        ModelSpec.from_options(str(tmp_path), revision="main")


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    image = Image.new("RGB", (16, 16))

    def broken_save(self, handle, **kwargs):
        handle.write(b"\x89PNG half an image")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(UserFileError, match="No space left on device"):  # files.save_image: one writer for all
        write_png(image, tmp_path / "x.png", {"format": 1})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------------
# Two processes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_processes_under_accelerate_make_the_single_process_images(tmp_path, capsys):
    """`accelerate launch --cpu` starts one process unless MPI is set up (accelerate's simple launcher); its
    torchrun launcher (`--multi_gpu`) starts the two, and ACCELERATE_USE_CPU=1 keeps them on the CPU, one gloo group."""
    cap = caption_object()
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        [
            {"caption": cap, "name": "a", "seed": 1, **SMALL},
            {"caption": cap, "name": "b", "seeds": [2, 3], **SMALL},
            {"caption": cap, "name": "c", "seed": 2.5, **SMALL},  # invalid
            {"idea": "a jazz poster", "name": "i", "seeds": [8, 9], **SMALL},  # its two images on two ranks
            {"caption": CAPTION_SHORT, "name": "d", "seed": 4, **SMALL},
            {"caption": cap, "name": "e", "seed": 5, **SMALL},
        ],
    )
    single = ["batch", jobs, "--model", TINY_RANDOM, "--skip-invalid", "--max-chars", "1", "--max-elements", "1"]
    assert run_cli(capsys, *single, "--out", tmp_path / "single")[0] == 1

    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(tmp_path / "hf"),  # no accelerate config file of the machine
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    launch = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port()), "-m", "diffusers_ideogram4.cli"]
    command = [*launch, *map(str, single), "--out", str(tmp_path / "two"), "--batch-size", "2"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 1, first.stderr[-3000:]  # one line is invalid
    assert pngs(tmp_path / "two") == pngs(tmp_path / "single")
    assert len(pngs(tmp_path / "two")) == 7
    records = read_manifest(tmp_path / "two" / MANIFEST_NAME)
    assert [(r["status"], r["line"]) for r in records if r["status"] == "invalid"] == [("invalid", 3)]
    done = [r for r in records if r["status"] == "done"]
    assert sorted(r["file"] for r in done) == [
        "a-1.png",
        "b-2.png",
        "b-3.png",
        "d-4.png",
        "e-5.png",
        "i-8.png",
        "i-9.png",
    ]
    assert {r["rank"] for r in done} == {0, 1}
    # Each idea image is expanded with its own seed, whichever process makes it: the single process's captions.
    assert sorted((r["file"], r["rank"]) for r in done if r["line"] == 4) == [("i-8.png", 0), ("i-9.png", 1)]
    assert {r["file"]: r["caption"] for r in done if r["line"] == 4} == {
        name: read_recipe(tmp_path / "single" / name)["caption"] for name in ("i-8.png", "i-9.png")
    }
    assert "rank 0: " in first.stdout and "rank 1: " in first.stdout

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 1, second.stderr[-3000:]
    assert "7 of 7 images done (0 generated, 7 already there), 0 failed, 1 invalid line (line 3)" in second.stdout
    assert pngs(tmp_path / "two") == pngs(tmp_path / "single")
    again = read_manifest(tmp_path / "two" / MANIFEST_NAME)[len(records) :]
    assert sorted((r["status"], r.get("generated")) for r in again) == [("done", False)] * 7 + [("invalid", None)]


def test_single_transformer_mode_from_the_command_line_is_recorded_and_reproduced(tmp_path, capsys, monkeypatch):
    """`--unconditional-lora`: the pipeline is built without its unconditional transformer, the LoRA computes the
    unconditional pass, the recipe names the file, and `reproduce` makes the same image again."""
    import hashlib

    from diffusers_ideogram4.pipeline_ideogram4 import Ideogram4Pipeline

    uncond = make_tiny_lora(tmp_path / "uncond")
    built = []
    real_call = Ideogram4Pipeline.__call__

    def spy(self, *args, **kwargs):
        built.append((self.unconditional_transformer, self.unconditional_adapter))
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(Ideogram4Pipeline, "__call__", spy)
    base = ["generate", CAPTION, "--model", TINY_RANDOM, "--height", "256", "--width", "256", "--steps", "2"]
    assert run_cli(capsys, *base, "-o", tmp_path / "single.png", "--unconditional-lora", f"{uncond}")[0] == 0
    assert built == [(None, "unconditional")]
    recipe = read_recipe(tmp_path / "single.png")
    digest = hashlib.sha256(uncond.read_bytes()).hexdigest()
    assert recipe["model"]["unconditional_lora"] == {"path": str(uncond), "scale": 1.0, "sha256": digest}
    code, printed, _ = run_cli(capsys, "reproduce", tmp_path / "single.png")
    assert code == 0 and printed.endswith("the same pixels as " + str(tmp_path / "single.png") + ".\n")
    code, _, err = run_cli(capsys, *base, "-o", tmp_path / "x.png", "--unconditional-lora", str(tmp_path / "no.st"))
    assert code == 2 and "--unconditional-lora" in err and "no such file" in err


def test_a_batch_in_single_transformer_mode_names_the_unconditional_lora(tmp_path):
    lora = make_tiny_lora(tmp_path / "uncond")
    model = ModelSpec.from_options(TINY_RANDOM, dtype="fp32", unconditional_lora=str(lora))
    pipe = model.load_pipeline("cpu")
    assert pipe.unconditional_transformer is None
    result = generate_batch(
        pipe, [{"caption": CAPTION, **SMALL, "seed": 3}], tmp_path / "out", model=model, progress=False
    )
    assert result.ok and result.generated == 1
    recipe = read_recipe(next((tmp_path / "out").glob("*.png")))
    assert recipe["model"]["unconditional_lora"]["path"] == str(lora)
    assert recipe["model"]["loras"] == []


def test_reproduce_checks_the_output_folder_before_loading_the_model(tmp_path, capsys, monkeypatch):
    base = ["generate", CAPTION, "--model", TINY_RANDOM, "--height", "256", "--width", "256", "--steps", "2"]
    assert run_cli(capsys, *base, "-o", tmp_path / "made.png")[0] == 0
    import diffusers_ideogram4.testing as testing

    built = []
    monkeypatch.setattr(testing, "tiny_pipeline", lambda **kw: built.append("pipeline"))
    code, _, err = run_cli(capsys, "reproduce", tmp_path / "made.png", "-o", tmp_path / "missing" / "again.png")
    assert code == 2
    assert err == (
        f"error: cannot write {tmp_path / 'missing' / 'again.png'}: the folder {tmp_path / 'missing'} does not "
        "exist; create it first\n"
    )
    assert built == []
