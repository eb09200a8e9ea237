"""Many images from a job file, on one process or many: `ideogram4 batch` and `generate_batch`.

A job file is JSON Lines, one job per line (blank lines are allowed and skipped; line numbers count them):

    {"caption": {...}, "seeds": [1, 2, 3], "height": 1024, "width": 768, "preset": "default_20", "name": "poster"}

- `caption`: a structured caption object, or its JSON text (taken verbatim); or `idea`, a plain-text idea that each
  image expands into its own caption (`pipe.expand_prompt` with the image's seed and size) right before it is made,
  as `pipe(idea, prompt_upsampling=True)` does: the image equals the one made from that caption with the same seed.
- `seed` (default 0) with `num_images` (default 1) makes seeds seed, seed + 1, ...; or `seeds`, a list.
- `height`, `width` (default 1024), `preset`, `steps`, `guidance_scale`: as in the pipeline call.
- `name`: the images are `{name}-{seed}.png`; by default a hash of the caption (or idea) and the settings, so that an
  edited or reordered job file still finds the images it made before.

Every line is checked (captions with the caption checker, against the token limit once a tokenizer is at hand; ideas
as `expand_prompt` checks them, and llguidance present) before any model is loaded or any image generated; a bad line
is reported with its number and field.

The run (`generate_batch`): job order -> image list -> images already done and verified are skipped (the file opens
and its recipe equals the job's; for an idea, whose caption is known only once expanded, every recipe field but the
caption: idea, seed, size, schedule, model, head and expansion settings; `force` regenerates them) -> the rest are
grouped into batches of equal size, schedule and caption token count (such a batch needs no attention mask, and the
pipeline gives each image the same bits alone or in a batch; an idea's image is a batch of its own, its token count
being unknown until it is expanded) -> the batches are split between the processes of `accelerate launch` with
`PartialState.split_between_processes`. Each process writes its own images (atomically, recipe inside); after every
round of batches the results are gathered and process 0 appends them to `manifest.jsonl` (one JSON line per image:
status done / failed / invalid, the error, the line number; the caption of an idea's image). The output folder must
be one folder that every process sees (a shared file system when there are several machines), and one run uses it at
a time.
"""

import contextlib
import difflib
import hashlib
import json
import os
import re
import secrets
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, parse_flag_from_env
from tqdm.auto import tqdm

from .captions import CaptionWarning, check_caption
from .constants import DEFAULT_IMAGE_SIDE, MAX_TEXT_TOKENS
from .recipe import (
    DTYPES,
    SEED_RANGE,
    HeadSpec,
    ModelSpec,
    RecipeError,
    build_recipe,
    expand_idea,
    expansion_record,
    pipeline_arguments,
    read_recipe,
    recipe_differences,
    remove_stale_temporaries,
    resolve_sampling,
    run_recipes,
    write_png,
)
from .sampler import PRESETS
from .validation import check_image_size, finite_float, require_positive_int


JOB_FIELDS = (
    "caption",
    "idea",
    "seed",
    "seeds",
    "num_images",
    "height",
    "width",
    "preset",
    "steps",
    "guidance_scale",
    "name",
)
MANIFEST_NAME = "manifest.jsonl"
LOCK_NAME = ".ideogram4-batch.lock"
MAX_RECORD_BYTES = 1 << 20
DEFAULT_SEED = 0
MAX_SEED = SEED_RANGE[1]  # a job's seeds are not negative
MAX_IMAGES_PER_JOB = 10_000
MAX_STEPS = 10_000
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")
DEFAULT_NAME_DIGITS = 12
MAX_SHOWN_CHARS = 60
CLI_SKIP_HINT = "Fix these lines, or pass --skip-invalid to record them in the manifest and generate the others."
API_SKIP_HINT = "Fix these jobs, or pass skip_invalid=True to record them in the manifest and generate the others."


# --------------------------------------------------------------------------------------------------------------------
# Jobs


@dataclass(frozen=True)
class Job:
    """One valid line of a job file: a caption (or an idea, when `caption` is None), its seeds and the settings they
    share."""

    line: int
    caption: str | None
    seeds: tuple[int, ...]
    name: str
    height: int = DEFAULT_IMAGE_SIDE
    width: int = DEFAULT_IMAGE_SIDE
    preset: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    idea: str | None = None

    def file_name(self, seed: int) -> str:
        return f"{self.name}-{seed}.png"


@dataclass(frozen=True)
class JobProblem:
    """Why a line is invalid: its number, the field (a JSON path below `caption`; empty for the whole line), what."""

    line: int
    field: str
    message: str

    @property
    def text(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def __str__(self) -> str:
        return f"line {self.line}: {self.text}"


class JobFileError(ValueError):
    """Invalid lines in a job file: `.problems` lists them all."""

    def __init__(self, problems: list[JobProblem], source: str, hint: str = ""):
        self.problems, self.source, self.hint = list(problems), source, hint
        lines = sorted({problem.line for problem in self.problems})
        header = f"{source}: {len(lines)} invalid line{'s' if len(lines) != 1 else ''} ({_line_list(lines)}):"
        super().__init__(
            "\n".join([header, *(f"  {problem}" for problem in self.problems), *([hint] if hint else [])])
        )

    def __reduce__(self):  # pickled as its arguments (a process pool sends a worker's exception back pickled)
        return type(self), (self.problems, self.source, self.hint)


@dataclass
class JobList:
    """The checked jobs of a file: the valid ones, the problems of the others, and the caption warnings.

    `token_counts` (line -> tokens of the caption with the chat template; jobs with a caption) is filled by
    `check_token_limits`.
    """

    source: str
    jobs: list[Job]
    problems: list[JobProblem] = field(default_factory=list)
    notes: list[JobProblem] = field(default_factory=list)
    token_counts: dict[int, int] | None = None

    def reject(self, problems: list[JobProblem]) -> None:
        """Move the jobs of these problems' lines to the invalid ones."""
        lines = {problem.line for problem in problems}
        self.jobs = [job for job in self.jobs if job.line not in lines]
        self.problems = sorted(self.problems + problems, key=lambda problem: problem.line)

    def error(self, hint: str) -> JobFileError:
        return JobFileError(self.problems, self.source, hint)

    @property
    def idea_lines(self) -> list[int]:
        """The lines of the valid jobs with an `idea`."""
        return [job.line for job in self.jobs if job.idea is not None]


def _line_list(lines: list[int]) -> str:
    shown = ", ".join(map(str, lines[:10]))
    return f"line {shown}" if len(lines) == 1 else f"lines {shown}" + (", ..." if len(lines) > 10 else "")


def _show(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 3] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


def _parse_object(text: str) -> tuple[object, list[str]]:
    """json.loads that also returns every key repeated within one object (json keeps only the last one)."""
    repeated = []

    def pairs(items):
        seen = set()
        for key, _ in items:
            if key in seen:
                repeated.append(key)
            seen.add(key)
        return dict(items)

    return json.loads(text, object_pairs_hook=pairs, parse_constant=_refuse_constant), repeated


def _default_name(prompt: dict, settings: dict) -> str:
    """A stable name from what the image shows (`{"caption": ...}` or `{"idea": ...}`, size, sampler settings), seeds
    excluded."""
    text = json.dumps({**prompt, **settings}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:DEFAULT_NAME_DIGITS]


class _LineChecker:
    """The checks of one job object; collects every problem of the line rather than stopping at the first."""

    def __init__(self, line: int, job: dict) -> None:
        self.line, self.job = line, job
        self.problems: list[JobProblem] = []
        self.notes: list[JobProblem] = []

    def problem(self, name: str, message: str) -> None:
        self.problems.append(JobProblem(self.line, name, message))

    def integer(self, name: str, default, low: int, high: int, meaning: str):
        if name not in self.job:
            return default
        value = self.job[name]
        if not _is_int(value) or not low <= value <= high:
            self.problem(name, f"must be an int from {low} to {high} ({meaning}), got {_show(value)}")
            return default
        return value

    def prompt(self) -> dict:
        """`{"caption": text}` or `{"idea": text}` when the line's prompt is valid, else {}."""
        given = [name for name in ("caption", "idea") if name in self.job]
        if len(given) == 2:
            self.problem("idea", "give `caption` (a structured caption) or `idea` (plain text to expand), not both")
        elif not given:
            self.problem(
                "caption",
                "missing; every job needs a `caption` (a caption object or its JSON text) or an `idea` (plain text "
                "to expand into one)",
            )
        else:
            text = self.caption() if given == ["caption"] else self.idea()
            return {} if text is None else {given[0]: text}
        return {}

    def is_text(self, name: str, text: str) -> bool:
        """False (and a problem) when `text` holds half of a surrogate pair, which JSON can escape but is no text."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            bad = text[error.start : error.end].encode("unicode_escape").decode("ascii")
            self.problem(name, f"holds {bad}, half of a surrogate pair, which is not text; fix that escape")
            return False
        return True

    def idea(self) -> str | None:
        """A plain-text idea, checked as `expand_prompt` checks it (a string; the size is checked with the job's), and
        not blank: in a job file an empty idea is a field left unfilled."""
        value = self.job["idea"]
        if not isinstance(value, str):
            self.problem("idea", f"must be a plain-text idea (a string), got {_show(value)}")
            return None
        if not value.strip():
            self.problem("idea", f"is empty ({_show(value)}); write what the image should show, in plain text")
            return None
        return value if self.is_text("idea", value) else None

    def caption(self) -> str | None:
        value = self.job["caption"]
        if isinstance(value, dict):
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        elif isinstance(value, str):
            text = value
        else:
            self.problem("caption", f"must be a caption object or its JSON text, got {_show(value)}")
            return None
        if not self.is_text("caption", text):
            return None
        for issue in check_caption(text):
            where = "caption" if issue.path == "$" else f"caption.{issue.path}"
            message = f"{issue.message} ({issue.hint})" if issue.hint else issue.message
            (self.problems if issue.is_error else self.notes).append(JobProblem(self.line, where, message))
        return text

    def seeds(self) -> tuple[int, ...]:
        if "seeds" not in self.job:
            first = self.integer("seed", DEFAULT_SEED, 0, MAX_SEED, "the initial noise's seed")
            count = self.integer("num_images", 1, 1, MAX_IMAGES_PER_JOB, "images made with seed, seed + 1, ...")
            if first + count - 1 > MAX_SEED:
                self.problem("num_images", f"{count} images from seed {first} pass the largest seed, {MAX_SEED}")
                return ()
            return tuple(range(first, first + count))
        seeds = self.job["seeds"]
        other = next((name for name in ("seed", "num_images") if name in self.job), None)
        if other is not None:
            self.problem(other, f"give `seeds` (a list) or `{other}`, not both")
        elif not isinstance(seeds, list) or not seeds or len(seeds) > MAX_IMAGES_PER_JOB:
            self.problem("seeds", f"must be a list of 1 to {MAX_IMAGES_PER_JOB} ints, got {_show(seeds)}")
        elif bad := [seed for seed in seeds if not _is_int(seed) or not 0 <= seed <= MAX_SEED]:
            self.problem("seeds", f"must hold ints from 0 to {MAX_SEED}, got {_show(bad[0])}")
        elif repeated := sorted(seed for seed, count in Counter(seeds).items() if count > 1):
            self.problem("seeds", f"lists {_show(repeated[0])} twice; each seed makes one image")
        else:
            return tuple(seeds)
        return ()

    def size(self, name: str) -> int:
        value = self.job.get(name, DEFAULT_IMAGE_SIDE)
        sides = {"height": DEFAULT_IMAGE_SIDE, "width": DEFAULT_IMAGE_SIDE, name: value}
        try:
            check_image_size(sides["height"], sides["width"])  # its message names the side
        except ValueError as error:
            self.problem(name, str(error))
            return DEFAULT_IMAGE_SIDE
        return value

    def sampler(self) -> tuple:
        preset = self.job.get("preset")
        if "preset" in self.job and not (isinstance(preset, str) and preset in PRESETS):
            self.problem("preset", f"{_show(preset)} is not a preset; use one of {sorted(PRESETS)}")
            preset = None
        steps = self.integer("steps", None, 1, MAX_STEPS, "denoising steps")
        guidance = None
        if "guidance_scale" in self.job:
            try:
                guidance = finite_float("guidance_scale", self.job["guidance_scale"])
            except (ValueError, OverflowError):  # OverflowError: an int beyond the float range
                self.problem("guidance_scale", f"must be a finite number, got {_show(self.job['guidance_scale'])}")
        return preset, steps, guidance

    def name(self, prompt: dict, settings: dict) -> str:
        if "name" not in self.job:
            return _default_name(prompt, settings)
        name = self.job["name"]
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            self.problem(
                "name",
                f"must be 1 to 100 letters, digits, `_`, `-` or `.`, not starting with `.` or `-`, got {_show(name)} "
                "(it names the files `{name}-{seed}.png`)",
            )
        return name


def check_job(line: int, job) -> tuple[Job | None, list[JobProblem], list[JobProblem]]:
    """One job object -> (the Job or None, its problems, its caption warnings)."""
    if not isinstance(job, dict):
        message = 'a job is a JSON object such as {"caption": {...}, "seed": 7}'
        return None, [JobProblem(line, "", f"{message}, got {_show(job)}")], []
    checker = _LineChecker(line, job)
    for key in job:
        if key not in JOB_FIELDS:
            close = difflib.get_close_matches(str(key), JOB_FIELDS, n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            checker.problem(str(key), f"unknown field; {hint}a job has {', '.join(JOB_FIELDS)}")
    prompt = checker.prompt()
    seeds = checker.seeds()
    height, width = checker.size("height"), checker.size("width")
    preset, steps, guidance = checker.sampler()
    settings = {"height": height, "width": width, "preset": preset, "steps": steps, "guidance_scale": guidance}
    name = checker.name(prompt, settings)
    if checker.problems:
        return None, checker.problems, checker.notes
    job = Job(line, prompt.get("caption"), seeds, name, height, width, preset, steps, guidance, prompt.get("idea"))
    return job, [], checker.notes


def _job_objects(source) -> tuple[str, list[tuple[int, object, list[JobProblem]]]]:
    """(name of the source, [(line number, parsed object or None, problems)]) from a path or a list of dicts."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"job file {path!r}: no such file; give a JSON Lines file, one job object per line.")
        data = Path(path).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            raise ValueError(
                f"{path}: line {line} is not UTF-8 ({error.reason}); save the job file as UTF-8."
            ) from None
        if text.startswith("\ufeff"):
            raise ValueError(f"{path}: starts with a byte-order mark (BOM); save it as UTF-8 without BOM.")
        entries = []
        # split on "\n" only: str.splitlines would also split inside JSON strings at U+2028 and friends.
        for number, line in enumerate(text.split("\n"), start=1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            try:
                parsed, repeated = _parse_object(line)
            except (ValueError, RecursionError) as error:  # also NaN / Infinity, or nesting too deep to parse
                reason = f"{error.msg} at column {error.colno}" if isinstance(error, json.JSONDecodeError) else error
                entries.append((number, None, [JobProblem(number, "", f"not valid JSON ({reason})")]))
                continue
            problems = [JobProblem(number, key, "given twice in one object; keep one") for key in repeated]
            entries.append((number, parsed, problems))
        return path, entries
    if isinstance(source, (list, tuple)):
        return "jobs", [(number, job, []) for number, job in enumerate(source, start=1)]
    raise ValueError(
        f"`jobs` must be a job file path, a list of job dicts, or a JobList, got {type(source).__name__}."
    )


def read_jobs(source) -> JobList:
    """Check every job of a JSON Lines file (or of a list of dicts, numbered from 1) and return them all.

    Raises ValueError only when the source itself cannot be read (missing, not UTF-8); bad lines are collected in
    `.problems`, with their line numbers.
    """
    name, entries = _job_objects(source)
    job_list = JobList(name, [])
    makers: dict[str, int] = {}  # file -> the line that makes it: two jobs may not make the same file
    for number, parsed, problems in entries:
        if parsed is not None or not problems:  # a line that is not JSON has nothing more to check
            job, found, notes = check_job(number, parsed)
            problems, job_list.notes = problems + found, job_list.notes + notes
        if not problems:
            files = [job.file_name(seed) for seed in job.seeds]
            clash = next((file for file in files if file in makers), None)
            if clash is None:
                job_list.jobs.append(job)
                makers.update(dict.fromkeys(files, number))
                continue
            message = f"makes {clash}, which line {makers[clash]} makes too; give one of them another `name` or seed"
            problems = [JobProblem(number, "name", message)]
        job_list.problems += problems
    return job_list


def check_token_limits(job_list: JobList, tokenizer) -> None:
    """Count every caption's tokens (chat template included) and reject the lines over the model's limit. (An idea's
    caption is known only once expanded; the expansion refuses one over the limit.)"""
    from .text_encoder import tokenize_prompt

    counts = {
        job.line: len(tokenize_prompt(tokenizer, job.caption)) for job in job_list.jobs if job.caption is not None
    }
    job_list.token_counts = counts
    over = f"over the limit of {MAX_TEXT_TOKENS} (chat template included); shorten it, it is never truncated"
    job_list.reject(
        [
            JobProblem(line, "caption", f"has {count} tokens, {over}")
            for line, count in counts.items()
            if count > MAX_TEXT_TOKENS
        ]
    )


def check_expansion_kwargs(job_list: JobList, expansion_kwargs: dict | None) -> dict:
    """`generate_batch`'s `expansion_kwargs` (keys among `temperature`, `max_new_tokens`, `limits`, as the
    pipeline's `prompt_upsampling_kwargs`) checked, with the defaults filled in; refused when no job has an idea.
    Jobs with an `idea` also need llguidance (the `expand` extra): refused when it is missing, naming the lines."""
    from .captions.grammar import require_llguidance
    from .prompt_expansion import DEFAULT_TEMPERATURE, EXPANSION_OPTIONS, check_expansion_arguments

    if expansion_kwargs is None:
        expansion_kwargs = {}
    elif not job_list.idea_lines:
        raise ValueError(
            f"`expansion_kwargs` applies to jobs with an `idea`, and {job_list.source} has none; drop it."
        )
    if not isinstance(expansion_kwargs, dict) or set(expansion_kwargs) - set(EXPANSION_OPTIONS):
        raise ValueError(
            f"`expansion_kwargs` must be a dict with keys among {list(EXPANSION_OPTIONS)} (the options of "
            f"`expand_prompt`), got {expansion_kwargs!r}."
        )
    options = {"temperature": DEFAULT_TEMPERATURE, "max_new_tokens": None, "limits": None, **expansion_kwargs}
    check_expansion_arguments("", DEFAULT_IMAGE_SIDE, DEFAULT_IMAGE_SIDE, None, **options)
    lines = job_list.idea_lines
    try:
        if lines:
            require_llguidance()
    except ImportError as error:
        one = len(lines) == 1
        raise ValueError(
            f"{job_list.source}: {_line_list(lines)} {'has' if one else 'have'} an `idea` to expand into a caption. "
            f"{error} (or give {'that line' if one else 'those lines'} a `caption` instead)"
        ) from None
    return options


# --------------------------------------------------------------------------------------------------------------------
# Output folder and manifest


def process_state() -> PartialState:
    """accelerate's view of the processes of this run.

    `PartialState()` forms a process group only on an accelerator with a distributed backend: in a group of processes
    (`accelerate launch`, torchrun) on a machine without one, each process would be a separate single run that makes
    every image. There, and with ACCELERATE_USE_CPU set (`accelerate launch --cpu`), the processes join one group
    over gloo instead.
    """
    import torch

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU")
    if not cpu and "LOCAL_RANK" in os.environ:
        accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
        if accelerator is not None and accelerator.is_available():
            cpu = accelerator.current_accelerator().type == "mps"  # MPS has no distributed backend
        else:
            cpu = not torch.cuda.is_available()
    return PartialState(cpu=cpu)


class RunLock:
    """One run per output folder: process 0 holds an exclusive lock on `.ideogram4-batch.lock` while it runs (two
    runs would delete each other's temporary files and interleave their manifests). POSIX only (fcntl)."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_NAME
        self.handle = None

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # Windows: no lock
            return self
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ValueError(
                f"{self.path.parent}: another `ideogram4 batch` run (pid {holder}) is writing there; "
                "wait for it to finish or give another folder. (Processes started together without a process group "
                "would also each run alone: launch them with `accelerate launch`.)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()  # closing releases the lock


def check_no_other_run(out_dir) -> None:
    """Refuse a folder that another run holds before any model is loaded: process 0 tries the run lock and lets it go
    at once, and every process gets its answer (`generate_batch` then takes the lock for the run itself)."""
    error = None
    if process_state().is_main_process and Path(out_dir).is_dir():
        try:
            with RunLock(Path(out_dir)):
                pass
        except ValueError as refused:
            error = str(refused)
    (error,) = broadcast_object_list([error])
    if error is not None:
        raise ValueError(error)


def check_out_dir(out_dir, name: str = "`out_dir`") -> Path:
    """The output folder may exist or not, but may not be a file, nor hold a folder named like the manifest, and it
    (or the folder it will be made in) must be writable. `name` is how the message names the argument."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {str(out_dir)!r} is a file; give a folder for the images (created if missing).")
    if (path / MANIFEST_NAME).is_dir():
        raise ValueError(f"{path / MANIFEST_NAME} is a folder; the manifest must be a file. Move that folder away.")
    existing = next(folder for folder in (path, *path.absolute().parents) if folder.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {str(out_dir)!r}: cannot write in {existing}; give a folder you can write to.")
    return path


class Manifest:
    """`manifest.jsonl`, appended to by process 0 only: each call writes whole lines, then fsyncs."""

    def __init__(self, path: Path, run: str) -> None:
        self.path, self.run = path, run
        self.trimmed = self._trim_torn_record()
        self.descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def _trim_torn_record(self) -> int:
        """A machine that lost power mid-append leaves a last line without its newline: cut it (its image, if any,
        is found again by the next scan). Returns the bytes removed."""
        if not self.path.exists():
            return 0
        with open(self.path, "rb+") as handle:
            size = handle.seek(0, os.SEEK_END)
            start = max(0, size - MAX_RECORD_BYTES)  # a record is far shorter: its last newline is in this tail
            handle.seek(start)
            tail = handle.read()
            if not tail or tail.endswith(b"\n"):
                return 0
            keep = start + tail.rfind(b"\n") + 1
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
            return size - keep

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        text = "".join(json.dumps({"run": self.run, **record}, ensure_ascii=False) + "\n" for record in records)
        data = memoryview(text.encode("utf-8"))
        while data:
            data = data[os.write(self.descriptor, data) :]
        os.fsync(self.descriptor)

    def close(self) -> None:
        os.close(self.descriptor)


def read_manifest(path) -> list[dict]:
    """Every record of a manifest, oldest first. A path's latest state is its last record."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                records.append(json.loads(line))
            except ValueError as error:
                raise ValueError(f"{path}: line {number} is not a JSON record ({error}).") from None
    return records


# --------------------------------------------------------------------------------------------------------------------
# Images and batches


@dataclass(frozen=True)
class ImageTask:
    """One image to make: its position in the job file's image list, its job, seed, file and recipe."""

    index: int
    job: Job
    seed: int
    file: str
    recipe: dict  # for an idea, without its caption (None until expanded)
    group: tuple  # what one pipeline call shares: size, schedule, caption token count; for an idea, the task alone


@dataclass
class BatchResult:
    """What a run did. `ok` is True only when every image of every job is done and no line was invalid."""

    images: int
    generated: int
    skipped: int
    failed: list[dict]
    invalid: list[JobProblem]
    ranks: list[dict]
    manifest: Path
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.failed and not self.invalid and self.generated + self.skipped == self.images

    def summary(self) -> list[str]:
        lines = []
        for rank in self.ranks:
            rate = 60 * rank["generated"] / rank["seconds"] if rank["seconds"] else 0.0
            lines.append(
                f"rank {rank['rank']}: {rank['generated']} generated, {rank['failed']} failed in "
                f"{rank['seconds']:.1f} s ({rate:.1f} images/min)"
            )
        done = self.generated + self.skipped
        invalid_lines = sorted({problem.line for problem in self.invalid})
        lines.append(
            f"{done} of {self.images} images done ({self.generated} generated, {self.skipped} already there), "
            f"{len(self.failed)} failed, {len(invalid_lines)} invalid "
            f"line{'' if len(invalid_lines) == 1 else 's'}"
            + (f" ({_line_list(invalid_lines)})" if invalid_lines else "")
            + f"; manifest: {self.manifest}"
        )
        return lines


def _model_of(pipe, model: ModelSpec | None, ideas: bool) -> ModelSpec:
    """The model the recipes name; the pipeline's own dtype, LoRAs and (for jobs with ideas) head agree with it."""
    import torch

    from .schedulers import is_reference_sampler

    # What changes the images beyond the recipe's keys: refused, or the recipes would not reproduce them.
    unnamed = []
    if getattr(pipe, "unconditional_adapter", None) is not None and (
        model is None or model.unconditional_lora is None
    ):
        unnamed.append(
            f"single-transformer mode (the unconditional LoRA {pipe.unconditional_adapter!r}) that `model` does not "
            "name (ModelSpec(..., unconditional_lora=...))"
        )
    if not is_reference_sampler(pipe.scheduler):
        unnamed.append(f"the scheduler {type(pipe.scheduler).__name__} (not the reference sampler)")
    for name in ("transformer", "unconditional_transformer"):
        if getattr(pipe, name, None) is not None and getattr(pipe, name).is_cache_enabled:
            unnamed.append(f"a cache on `{name}` ({type(getattr(pipe, name)._cache_config).__name__})")
    if unnamed:
        raise ValueError(
            f"The pipeline runs with {' and '.join(unnamed)}, which a recipe cannot name, so its images could not "
            "be reproduced. Run batches with the pipeline as `ModelSpec.load_pipeline` builds it: the "
            "hub's FlowMatchEulerDiscreteScheduler, no cache."
        )
    dtype = {getattr(torch, name): key for key, name in DTYPES.items()}.get(pipe.transformer.dtype)
    adapters = {name for names in pipe.get_list_adapters().values() for name in names}
    adapters.discard(getattr(pipe, "unconditional_adapter", None))  # named by model.unconditional_lora, checked above
    head = getattr(pipe, "prompt_enhancer_head", None)
    if ideas and head is None:
        raise ValueError(
            "Jobs with an `idea` are expanded by the pipeline's optional `prompt_enhancer_head` (Qwen3-VL-8B-Instruct's"
            " LM head), which this pipeline does not have. Load it with the model: "
            "`ModelSpec.from_options(model_id, head=HEAD_REPO).load_pipeline(device)` (`--head` on the command line)."
        )
    if model is None:
        if not pipe.name_or_path:
            raise ValueError(
                "`model` is needed: this pipeline was not loaded with from_pretrained, so the images' recipes could "
                "not name its weights. Pass `model=ModelSpec(...)` (e.g. ModelSpec('tiny-random', seed=0, "
                "dtype='fp32'))."
            )
        head_path = head.config.get("_name_or_path") if ideas else None
        head_spec = HeadSpec(head_path) if head_path else None  # loaded with from_pretrained: its folder or repo
        model = ModelSpec(pipe.name_or_path, None, dtype or str(pipe.transformer.dtype), head=head_spec)
    if ideas and model.head is None:
        raise ValueError(
            "Jobs with an `idea` record the prompt-enhancer head that expanded them, but `model` names none. Pass "
            "`model=ModelSpec(..., head=HeadSpec(...))` (or `ModelSpec.from_options(..., head=HEAD_REPO)`)."
        )
    if dtype is not None and model.dtype != dtype:
        raise ValueError(f"`model.dtype={model.dtype!r}` but the pipeline's transformer runs in {dtype}.")
    if len(adapters) != len(model.loras):
        raise ValueError(
            f"The pipeline has {len(adapters)} LoRA adapter(s) ({sorted(adapters)}) but `model` lists "
            f"{len(model.loras)}; a recipe must name every LoRA. Load them through ModelSpec(..., loras=...)."
        )
    return model


def plan_images(
    pipe, job_list: JobList, model: ModelSpec, device_type: str, expansion: dict | None = None
) -> list[ImageTask]:
    """Every image of the valid jobs, in job order then seed order, with its recipe (for an idea, without its
    caption; `expansion` holds the checked `expansion_kwargs`). Jobs whose settings the pipeline refuses (e.g.
    guidance on a CFG-distilled checkpoint) are moved to the invalid ones."""
    expansion = check_expansion_kwargs(job_list, None) if expansion is None else expansion
    tasks, refused = [], []
    for job in job_list.jobs:
        try:
            sampling = resolve_sampling(pipe, job.preset, job.steps, job.guidance_scale)
        except ValueError as error:
            refused.append(JobProblem(job.line, "", str(error)))
            continue
        record = None
        if job.idea is not None:
            record = expansion_record(job.idea, model.head, expansion["temperature"], expansion["limits"])
        for seed in job.seeds:
            recipe = build_recipe(job.caption, seed, job.height, job.width, sampling, model, device_type, record)
            if job.idea is None:
                tokens = job_list.token_counts[job.line]
                group = (job.height, job.width, tokens, json.dumps(pipeline_arguments(recipe), sort_keys=True))
            else:
                group = ("idea", len(tasks))  # alone: its caption's token count is known only once expanded
            tasks.append(ImageTask(len(tasks), job, seed, job.file_name(seed), recipe, group))
    job_list.reject(refused)  # a refused job has no tasks
    return tasks


def scan_done(tasks: list[ImageTask], out_dir: Path, force: bool) -> tuple[list[int], dict[int, str], dict[int, str]]:
    """(indices of the tasks to generate, why an existing file is to be replaced, the captions of the ideas' images
    that are done). A task is done when its file opens completely and holds the task's recipe; an idea's image
    when it holds every field of it but the caption, which is known only once the idea is expanded."""
    pending, replaced, captions = [], {}, {}
    for task in tasks:
        path = out_dir / task.file
        if not path.exists():
            pending.append(task.index)
            continue
        if force:
            pending.append(task.index)
            replaced[task.index] = "--force"
            continue
        try:
            found = read_recipe(path)
        except RecipeError as error:
            pending.append(task.index)
            replaced[task.index] = f"unreadable: {error}"
            continue
        wanted = task.recipe if task.job.idea is None else {**task.recipe, "caption": found["caption"]}
        differences = recipe_differences(found, wanted)
        if differences:
            pending.append(task.index)
            replaced[task.index] = f"recipe differs in {', '.join(differences)}"
        elif task.job.idea is not None:
            captions[task.index] = found["caption"]
    return pending, replaced, captions


def make_batches(tasks: list[ImageTask], batch_size: int) -> list[list[ImageTask]]:
    """Tasks grouped by what one call shares (in order of first appearance), cut into batches of `batch_size`."""
    groups: dict[tuple, list[ImageTask]] = defaultdict(list)
    for task in tasks:
        groups[task.group].append(task)
    return [members[i : i + batch_size] for members in groups.values() for i in range(0, len(members), batch_size)]


def _record(task: ImageTask, status: str, caption: str | None = None, **fields) -> dict:
    """A manifest record of an image; `caption` for an idea's image, the caption it was expanded into."""
    record = {"status": status, "line": task.job.line, "name": task.job.name, "seed": task.seed, "file": task.file}
    return {**record, **fields, **({} if caption is None else {"caption": caption})}


def run_batch(
    pipe, batch: list[ImageTask], out_dir: Path, rank: int, replaced: dict[int, str], expansion: dict | None = None
) -> list[dict]:
    """One pipeline call for the batch (an idea's image, alone, expanded first), then each image written with its
    recipe. Returns one record per image."""
    started = time.perf_counter()
    recipes = [task.recipe for task in batch]
    try:
        if batch[0].job.idea is not None:
            job, seed = batch[0].job, batch[0].seed
            caption = expand_idea(pipe, job.idea, seed, job.height, job.width, expansion)
            recipes = [{**batch[0].recipe, "caption": caption}]
        for task, image, recipe in zip(batch, run_recipes(pipe, recipes), recipes):
            write_png(image, out_dir / task.file, recipe)
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        return [{**_record(task, "failed"), "error": message, "rank": rank} for task in batch]
    seconds = round((time.perf_counter() - started) / len(batch), 3)
    records = []
    for task, recipe in zip(batch, recipes):
        caption = recipe["caption"] if task.job.idea is not None else None
        record = _record(task, "done", caption, generated=True, rank=rank, seconds=seconds)
        if task.index in replaced:
            record["replaced"] = replaced[task.index]
        records.append(record)
    return records


def generate_batch(
    pipe,
    jobs,
    out_dir,
    *,
    model: ModelSpec | None = None,
    batch_size: int = 1,
    skip_invalid: bool = False,
    force: bool = False,
    progress: bool = True,
    expansion_kwargs: dict | None = None,
) -> BatchResult:
    r"""
    Generate every image of a job file into `out_dir`, resumably; under `accelerate launch`, split between processes.

    Args:
        pipe (`Ideogram4Pipeline`): the loaded pipeline, placed on this process's device.
        jobs: a JSON Lines file path, a list of job dicts (numbered from 1 like lines), or a `JobList`.
        out_dir: folder for the images and `manifest.jsonl`; created if missing.
        model (`ModelSpec`, *optional*): what the images' recipes name as the model (id, revision, dtype, LoRAs) and,
            for jobs with an `idea`, the prompt-enhancer head (`head`) the pipeline holds as `prompt_enhancer_head`.
            Default: the pipeline's `name_or_path` with no revision; required for pipelines not loaded with
            `from_pretrained`. Must list every LoRA adapter the pipeline holds.
        batch_size (`int`, defaults to 1): images per pipeline call, among images of the same size, schedule and
            caption token count. An image has the same bits at any batch size (measured on the CPU). An idea's
            image is made alone (its caption's token count is known only once expanded).
        skip_invalid (`bool`): record invalid lines in the manifest and generate the others, instead of raising
            `JobFileError` before anything is generated.
        force (`bool`): regenerate images that are already done.
        progress (`bool`): one progress bar (process 0) over all images of all processes.
        expansion_kwargs (`dict`, *optional*): `temperature`, `max_new_tokens`, `limits` for expanding the ideas, as
            in `expand_prompt` (its defaults otherwise); the temperature and limits are recorded in the recipes.
            Only for job lists with an idea. Needs llguidance (`pip install "diffusers-ideogram4[expand]"`).

    Returns:
        `BatchResult` (the same on every process): counts, failed records, invalid lines, per-process timing.
    """
    require_positive_int("batch_size", batch_size)
    out_dir = check_out_dir(out_dir)
    job_list = jobs if isinstance(jobs, JobList) else read_jobs(jobs)
    expansion = check_expansion_kwargs(job_list, expansion_kwargs)
    model = _model_of(pipe, model, ideas=bool(job_list.idea_lines))
    if job_list.token_counts is None:
        check_token_limits(job_list, pipe.tokenizer)
    tasks = plan_images(pipe, job_list, model, pipe._execution_device.type, expansion)
    if job_list.problems and not skip_invalid:
        raise job_list.error(API_SKIP_HINT)

    state = process_state()
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        # Process 0 takes the folder, writes what is known already and finds what is done; the others wait for its
        # plan (or its error) in the broadcast.
        manifest, plan = None, [None, None, None]
        if state.is_main_process:
            try:
                stack.enter_context(RunLock(out_dir))
                run = f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}-{secrets.token_hex(3)}"
                manifest = stack.enter_context(contextlib.closing(Manifest(out_dir / MANIFEST_NAME, run)))
                plan = [*_start(job_list, tasks, out_dir, force, manifest), None]
            except (ValueError, OSError) as error:
                plan = [None, None, f"{type(error).__name__}: {error}" if isinstance(error, OSError) else str(error)]
        pending, replaced, error = broadcast_object_list(plan)
        if error is not None:
            raise ValueError(error)
        return _generate(
            pipe, tasks, pending, replaced, job_list, out_dir, batch_size, progress, state, manifest, expansion
        )


def _start(job_list: JobList, tasks: list[ImageTask], out_dir: Path, force: bool, manifest: Manifest) -> tuple:
    """Process 0's part before generating: report, clean up after a killed run, record the invalid lines, find the
    images already done (and record them). Returns (indices of the tasks to generate, why files get replaced)."""
    if job_list.notes:
        notes = "\n".join(f"  {note}" for note in job_list.notes)
        warnings.warn(CaptionWarning(f"{job_list.source}: caption warnings:\n{notes}"), stacklevel=3)
    if manifest.trimmed:
        print(f"{manifest.path}: removed an incomplete last record ({manifest.trimmed} bytes) of a killed run.")
    for name in remove_stale_temporaries(out_dir):
        print(f"Removed {out_dir / name}, a partial image of a killed run.")
    by_line = defaultdict(list)
    for problem in job_list.problems:
        by_line[problem.line].append(problem)
    manifest.append(
        [
            {"status": "invalid", "line": line, "error": "; ".join(problem.text for problem in found)}
            for line, found in by_line.items()
        ]
    )
    pending, replaced, captions = scan_done(tasks, out_dir, force)
    waiting = set(pending)
    manifest.append(
        [
            _record(task, "done", generated=False, caption=captions.get(task.index))
            for task in tasks
            if task.index not in waiting
        ]
    )
    return pending, replaced


def _generate(
    pipe, tasks, pending, replaced, job_list, out_dir, batch_size, progress, state, manifest, expansion
) -> BatchResult:
    """Every process: its share of the batches, in rounds; after each round the records are gathered and process 0
    appends them to the manifest and moves the progress bar."""
    main = state.is_main_process
    skipped = len(tasks) - len(pending)
    batches = make_batches([tasks[index] for index in pending], batch_size)
    with state.split_between_processes(batches) as mine:
        mine = list(mine)
    rounds = -(-len(batches) // state.num_processes)  # process 0 gets the most batches
    restore = _quiet_pipeline(pipe)
    quiet = not (progress and main)  # one bar, process 0's
    bar = tqdm(total=len(tasks), initial=skipped, desc="images", unit="img", disable=quiet, dynamic_ncols=True)
    started = time.perf_counter()
    busy, records = 0.0, []
    try:
        for round_index in range(rounds):
            # Every process takes part in every gather, also after its own batches have run out.
            begun = time.perf_counter()
            done_now = []
            if round_index < len(mine):
                done_now = run_batch(pipe, mine[round_index], out_dir, state.process_index, replaced, expansion)
            busy += time.perf_counter() - begun
            gathered = gather_object(done_now)
            records += gathered
            if main:
                manifest.append(gathered)
                bar.update(len(gathered))
                made = sum(record["status"] == "done" for record in records)
                bar.set_postfix_str(f"{60 * made / (time.perf_counter() - started):.1f} images/min")
    finally:
        restore()
        bar.close()
    rank = state.process_index
    mine_stats = {
        "rank": rank,
        "generated": sum(record["status"] == "done" and record["rank"] == rank for record in records),
        "failed": sum(record["status"] == "failed" and record["rank"] == rank for record in records),
        "seconds": round(busy, 3),
    }
    return BatchResult(
        images=len(tasks),
        generated=sum(record["status"] == "done" for record in records),
        skipped=skipped,
        failed=[record for record in records if record["status"] == "failed"],
        invalid=list(job_list.problems),
        ranks=gather_object([mine_stats]),
        manifest=out_dir / MANIFEST_NAME,
        seconds=time.perf_counter() - started,
    )


def _quiet_pipeline(pipe):
    """Silence the pipeline's per-step bar (the batch has its own) and decode a batch one image at a time (the VAE's
    convolutions round differently per batch size; diffusers' VAE slicing decodes one at a time). Returns the undo."""
    saved_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    saved_slicing = pipe.vae.use_slicing
    pipe.set_progress_bar_config(**{**saved_bar, "disable": True})
    pipe.vae.enable_slicing()

    def restore() -> None:
        pipe._progress_bar_config = saved_bar
        pipe.vae.use_slicing = saved_slicing

    return restore


__all__ = [
    "BatchResult",
    "ImageTask",
    "Job",
    "JobFileError",
    "JobList",
    "JobProblem",
    "MANIFEST_NAME",
    "Manifest",
    "check_expansion_kwargs",
    "check_job",
    "check_out_dir",
    "check_token_limits",
    "generate_batch",
    "make_batches",
    "plan_images",
    "read_jobs",
    "read_manifest",
    "scan_done",
]
