"""Issue 17, by class: nothing the CLI writes is half-written, the caption check's work is bounded, text that is not
what it seems is named, and every CLI mistake is one `error:` line before anything is loaded."""

import io
import json
import os
import random

import pytest
import torch
from PIL import Image

import diffusers_ideogram4.testing
from conftest import CAPTION
from diffusers_ideogram4 import Ideogram4Pipeline
from diffusers_ideogram4.captions import check_caption
from diffusers_ideogram4.captions.checker import MAX_ISSUES_PER_PLACE, _overlapping_boxes
from diffusers_ideogram4.captions.limits import _longest_token_bytes, check_prompt_lengths, min_caption_tokens
from diffusers_ideogram4.cli import main
from diffusers_ideogram4.files import UserFileError, check_image_path, read_text, write_atomically
from diffusers_ideogram4.testing import tiny_tokenizer
from diffusers_ideogram4.text_encoder import tokenize_prompt


def caption_with(elements: list, **top) -> str:
    caption = {**top, "compositional_deconstruction": {"background": "white", "elements": elements}}
    return json.dumps(caption, ensure_ascii=False, separators=(",", ":"))


def text_element(bbox, text="A") -> dict:
    return {"type": "text", "bbox": bbox, "text": text, "desc": "label"}


def one_error_line(err: str) -> str:
    """The single line a CLI mistake prints: `error: ...`, no traceback."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# Data loss: every command that writes a user file writes all of it or nothing
# ---------------------------------------------------------------------------------------------------------------------

OLD_BYTES = b"the user's old file, to be kept byte for byte\n"


def _format_in_place(folder):
    target = folder / "caption.json"
    target.write_text(json.dumps(json.loads(CAPTION), indent=2), encoding="utf-8")
    return target, ["caption", "format", str(target), "--in-place"]


def _format_to_existing(folder):
    source, target = folder / "caption.json", folder / "out.json"
    source.write_text(CAPTION, encoding="utf-8")
    target.write_bytes(OLD_BYTES)
    return target, ["caption", "format", str(source), "-o", str(target)]


def _preview_to_existing(folder):
    source, target = folder / "caption.json", folder / "layout.png"
    source.write_text(CAPTION, encoding="utf-8")
    target.write_bytes(OLD_BYTES)
    return target, ["caption", "preview", str(source), "-o", str(target), "--width", "64", "--height", "64"]


def _generate_to_existing(folder):
    target = folder / "image.png"
    target.write_bytes(OLD_BYTES)
    argv = ["generate", CAPTION, "--model", "tiny-random", "-o", str(target), "--height", "256", "--width", "256"]
    return target, argv + ["--steps", "1"]


WRITERS = {
    "caption format --in-place": _format_in_place,
    "caption format -o EXISTING": _format_to_existing,
    "caption preview -o EXISTING": _preview_to_existing,
    "generate -o EXISTING": _generate_to_existing,
}


def _fail(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("where", ["fsync", "replace"])
@pytest.mark.parametrize("command", WRITERS)
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, capsys, monkeypatch, command, where):
    target, argv = WRITERS[command](tmp_path)
    before, listing = target.read_bytes(), sorted(os.listdir(tmp_path))
    monkeypatch.setattr(os, where, _fail)
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"error: cannot write {target}: No space left on device; {target} was not changed"
    assert target.read_bytes() == before and sorted(os.listdir(tmp_path)) == listing


@pytest.mark.parametrize("command", WRITERS)
def test_an_encoding_failure_is_found_before_anything_is_opened(tmp_path, capsys, monkeypatch, command):
    target, argv = WRITERS[command](tmp_path)
    if command.startswith("caption format"):
        # Valid JSON, but the escape decodes to a lone surrogate that UTF-8 cannot encode.
        source = tmp_path / "caption.json"
        source.write_text(CAPTION.replace('"HELLO"', '"\\ud800"'), encoding="utf-8")
        if command.endswith("--in-place"):
            target = source
    else:
        monkeypatch.setattr(Image.Image, "save", lambda *args, **kwargs: _fail())  # the image encoder fails
    before, listing = target.read_bytes(), sorted(os.listdir(tmp_path))
    opened = []
    real_open = os.open
    monkeypatch.setattr(
        os, "open", lambda path, *args, **kwargs: opened.append(str(path)) or real_open(path, *args, **kwargs)
    )
    code = main(argv)
    err = capsys.readouterr().err
    if command.startswith("caption format"):
        assert code == 1
        path = "compositional_deconstruction.elements[0].text"
        assert (
            f"{source}: {path}: string holds a lone surrogate U+D800 at character 0, which UTF-8 cannot encode" in err
        )
        assert err.endswith(f"error: {source} holds text that UTF-8 cannot encode (above); nothing was written\n")
    else:
        assert code == 2
        assert one_error_line(err) == f"error: cannot write {target}: No space left on device; nothing was written"
    assert [path for path in opened if path.startswith(str(tmp_path))] == []
    assert target.read_bytes() == before and sorted(os.listdir(tmp_path)) == listing


def test_write_atomically_replaces_the_whole_file_and_keeps_its_mode(tmp_path):
    target = tmp_path / "out.json"
    target.write_bytes(OLD_BYTES)
    target.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_atomically(link, b"new")
    assert target.read_bytes() == b"new" and link.is_symlink()  # the link's target was replaced, not the link
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path)) == ["link.json", "out.json"]
    with pytest.raises(UserFileError, match=f"cannot write {tmp_path / 'no' / 'x.json'}: No such file or directory"):
        write_atomically(tmp_path / "no" / "x.json", b"x")


def test_write_atomically_refuses_a_read_only_file_itself(tmp_path, monkeypatch):
    # A rename would replace a read-only file (it needs only the folder's permission); the write asks os.access
    # itself, faked here because root may write anywhere.
    target = tmp_path / "locked.json"
    target.write_bytes(OLD_BYTES)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(target) and real_access(path, mode))
    with pytest.raises(UserFileError) as caught:
        write_atomically(target, b"new")
    assert str(caught.value) == (
        f"cannot write {target}: Permission denied (the file is read-only); nothing was written"
    )
    assert target.read_bytes() == OLD_BYTES and os.listdir(tmp_path) == ["locked.json"]


def test_an_extension_pillow_reads_but_cannot_write_is_refused(tmp_path):
    with pytest.raises(UserFileError) as caught:
        check_image_path(tmp_path / "out.psd")  # Pillow opens Photoshop files but saves none
    assert str(caught.value) == (
        f"cannot write {tmp_path}/out.psd: extension '.psd' is not an image format Pillow can write; end the name "
        "with .png (lossless), .webp, .jpg or another format Pillow saves"
    )


def test_an_interrupted_write_removes_its_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_bytes(OLD_BYTES)

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, b"new")
    assert target.read_bytes() == OLD_BYTES and os.listdir(tmp_path) == ["out.json"]


# ---------------------------------------------------------------------------------------------------------------------
# Denial of service: the caption check's work is bounded
# ---------------------------------------------------------------------------------------------------------------------


def test_a_caption_too_long_by_its_length_gets_one_issue():
    caption = caption_with([], high_level_description="a " * 300_000)
    [issue] = check_caption(caption)
    assert (issue.path, issue.is_error) == ("$", True)
    assert issue.message == (
        f"caption is too long: at least {-(-len(caption) // 256):,} tokens ({len(caption):,} characters, at most 256 "
        "per token), over the limit of 2048 (chat template included); nothing else was checked"
    )
    assert check_caption(json.loads(caption)) == [issue]  # a dict is measured as its minified text


def test_a_caption_too_long_by_its_structure_gets_one_issue():
    caption = caption_with([{}] * 5_000)  # 15 KB, but each `{},` weighs 3 + 3 + 2 of the 16 a Qwen token holds
    [issue] = check_caption(caption)
    weight = sum(3 * caption.count(c) for c in '{}[]"') + sum(2 * caption.count(c) for c in ",:")
    assert weight == 5_000 * 6 + 4_999 * 2 + 50  # the elements, their commas, the rest (8 quotes, 6 brackets, 4 , :)
    assert issue.message == (
        f"caption is too long: at least {-(-weight // 16):,} tokens (0 digits, one token each, and brackets, quotes, "
        f"commas and colons weighing {weight:,}, at most 16 per token), over the limit of 2048 (chat template "
        "included); nothing else was checked"
    )
    digits = caption_with([{"type": "obj", "bbox": [100, 100, 900, 900], "desc": "x"}] * 200)  # 2,400 digits
    assert min_caption_tokens(digits)[0] > 2400 and check_caption(digits)[0].message.startswith(
        "caption is too long: at least"
    )


def test_under_the_bound_the_full_check_runs_and_lists_at_most_a_few_issues_per_place():
    caption = caption_with([{}] * 4_000)
    assert min_caption_tokens(caption)[0] <= 2048
    issues = check_caption(caption)
    at = [issue for issue in issues if issue.path.endswith(".type")]
    assert len(at) == MAX_ISSUES_PER_PLACE + 1 == 21
    assert [issue.path for issue in at[:3]] == [f"compositional_deconstruction.elements[{i}].type" for i in range(3)]
    assert str(at[-1]) == (
        "compositional_deconstruction.elements[*].type: and 3,980 more errors here, not listed (at most 20 per place "
        "are)"
    )
    assert at[-1].is_error and issues.index(at[-1]) == issues.index(at[-2]) + 1


def test_unknown_keys_are_one_place():
    element = {"type": "obj", "desc": "x", **{f"k{chr(97 + i % 26)}{chr(97 + i // 26)}": "" for i in range(100)}}
    issues = [issue for issue in check_caption(caption_with([element])) if "unknown key" in issue.message]
    assert len(issues) == 20
    more = check_caption(caption_with([element]))[-1]
    assert (more.path, more.message) == (
        "compositional_deconstruction.elements[*][*]",
        "and 80 more errors here, not listed (at most 20 per place are)",
    )


def test_overlapping_text_boxes_are_counted_and_the_first_listed():
    issues = check_caption(caption_with([text_element([100, 100, 900, 900], f"T{i}") for i in range(40)]))
    overlaps = [issue for issue in issues if issue.path.endswith(".bbox")]
    assert len(overlaps) == 21 and all(not issue.is_error for issue in overlaps)
    assert overlaps[0].message == (
        "text bbox [100, 100, 900, 900] overlaps the bbox [100, 100, 900, 900] of text element elements[0]"
    )
    pairs = 40 * 39 // 2
    assert overlaps[-1].message == f"and {pairs - 20:,} more warnings here, not listed (at most 20 per place are)"


def brute_force_overlaps(boxes):
    def overlap(a, b):
        return max(a[0], b[0]) < min(a[2], b[2]) and max(a[1], b[1]) < min(a[3], b[3])

    return {(i, j) for (i, a) in boxes for (j, b) in boxes if i < j and overlap(a, b)}


@pytest.mark.parametrize("seed", range(5))
def test_the_sweep_counts_what_comparing_every_pair_counts(seed):
    rng = random.Random(seed)
    boxes = []
    for index in range(200):
        y, x = rng.randrange(0, 1000, 50), rng.randrange(0, 1000, 50)  # a coarse grid: many shared and touching edges
        boxes.append(
            (index, [y, x, min(y + rng.randrange(0, 300, 50), 1000), min(x + rng.randrange(0, 300, 50), 1000)])
        )
    expected = brute_force_overlaps(boxes)
    pairs, total = _overlapping_boxes(boxes, limit=len(expected) + 10)
    assert total == len(expected) and set(pairs) == expected and len(pairs) == len(set(pairs))
    listed, total = _overlapping_boxes(boxes, limit=7)
    assert total == len(expected) and len(listed) == min(7, total) and set(listed) <= expected


def test_boxes_that_touch_have_no_area_or_are_out_of_range_do_not_overlap():
    boxes = [(0, [0, 0, 500, 500]), (1, [500, 0, 1000, 500]), (2, [0, 500, 500, 1000]), (3, [100, 100, 100, 400])]
    assert _overlapping_boxes(boxes, 10) == ([], 0)
    assert _overlapping_boxes([(0, [0, 0, 500, 500]), (1, [-5, 0, 2000, 500])], 10) == ([], 0)
    assert _overlapping_boxes([(0, [0, 0, 500, 500]), (1, [499, 499, 501, 501])], 10) == ([(0, 1)], 1)


def test_the_pipeline_refuses_a_prompt_its_length_proves_too_long_before_the_tokenizer(monkeypatch):
    pipe = diffusers_ideogram4.testing.tiny_pipeline(seed=0)
    longest = _longest_token_bytes(pipe.tokenizer)
    caption = caption_with([text_element([100, 100, 900, 900], f"T{i}") for i in range(2_000)])  # 171 KB
    tokenized = []
    monkeypatch.setattr(type(pipe), "tokenize", lambda self, prompts: tokenized.append(prompts))
    message = (
        rf"`prompt` is too long: prompt\[0\] has {len(caption):,} characters, at least "
        rf"{-(-len(caption) // (2 * longest)):,} tokens \(this tokenizer puts at most {2 * longest} characters in a "
        r"token\), over the limit of 2048 tokens"
    )
    for mode in ("error", "warn", "off"):
        with pytest.raises(ValueError, match=message):
            pipe(caption, height=256, width=256, caption_check=mode)
    assert tokenized == []


def test_the_length_bound_never_refuses_a_prompt_that_fits():
    tokenizer = tiny_tokenizer()
    longest = _longest_token_bytes(tokenizer)
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    token = max(vocab, key=len)
    text = tokenizer.convert_tokens_to_string([token])
    assert len(token) == longest
    # The densest text this tokenizer has, just past the bound: the exact count is over the limit too.
    prompt = (text * (2048 * 2 * longest // len(text) + 2))[: 2048 * 2 * longest + 1]
    with pytest.raises(ValueError, match="characters in a token"):
        check_prompt_lengths([prompt], tokenizer)
    assert len(tokenize_prompt(tokenizer, prompt)) > 2048
    check_prompt_lengths([prompt[: 2048 * 2 * longest]], tokenizer)  # at the bound: left to the exact count


# ---------------------------------------------------------------------------------------------------------------------
# Text that is not what it seems
# ---------------------------------------------------------------------------------------------------------------------

E0 = "compositional_deconstruction.elements[0]"


@pytest.mark.parametrize(
    "caption, path, message",
    [
        (
            caption_with([text_element([1, 1, 9, 9], "\ud800")]),
            f"{E0}.text",
            "string holds a lone surrogate U+D800 at character 0",
        ),
        (
            caption_with([text_element([1, 1, 9, 9], "ok\\udc80")]).replace("\\\\", "\\"),
            f"{E0}.text",
            "string holds a lone surrogate U+DC80 at character 2",
        ),
        (
            caption_with([], high_level_description="a\\ud83d").replace("\\\\", "\\"),
            "high_level_description",
            "string holds a lone surrogate U+D83D at character 1",
        ),
        (
            json.loads(caption_with([text_element([1, 1, 9, 9], "x")]).replace('"desc"', '"d\ud800"')),
            f'{E0}["d\\ud800"]',
            "key holds a lone surrogate U+D800 at character 1",
        ),
    ],
)
def test_text_utf8_cannot_encode_is_an_error_at_its_path(caption, path, message):
    issues = [issue for issue in check_caption(caption) if "surrogate" in issue.message]
    assert [(issue.path, issue.is_error) for issue in issues] == [(path, True)]
    assert issues[0].message == f"{message}, which UTF-8 cannot encode"


def test_a_surrogate_pair_is_one_character_not_an_error():
    caption = caption_with([text_element([1, 1, 9, 9], "\\ud83d\\ude00")]).replace("\\\\", "\\")
    assert json.loads(caption)["compositional_deconstruction"]["elements"][0]["text"] == "\U0001f600"
    assert not any("surrogate" in issue.message for issue in check_caption(caption))


def test_a_byte_order_mark_is_named_and_the_rest_is_checked():
    [issue] = check_caption("\ufeff" + CAPTION)
    assert (issue.path, issue.is_error) == ("$", True)
    assert issue.message == "caption starts with a byte-order mark (U+FEFF, the bytes EF BB BF in a UTF-8 file)"
    assert check_caption("\ufeffa cat")[1].message.startswith("plain text")  # only what follows the mark is plain


def test_files_and_stdin_are_read_as_strict_utf8(tmp_path, monkeypatch):
    bad = tmp_path / "latin1.json"
    bad.write_bytes(CAPTION.replace("HELLO", "HÉLLO").encode("latin-1"))
    offset = CAPTION.index("HELLO") + 1
    with pytest.raises(UserFileError) as raised:
        read_text(str(bad))
    assert str(raised.value) == (
        f"{bad} is not UTF-8 text: byte 0xc9 at offset {offset:,} (invalid continuation byte); captions are UTF-8, "
        "re-save it as UTF-8"
    )
    # Python's own stdin may turn bad bytes into lone surrogates (surrogateescape): the bytes are read instead.
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b'{"a":"\xff"}'), errors="surrogateescape"))
    with pytest.raises(UserFileError, match=r"^stdin is not UTF-8 text: byte 0xff at offset 6 \(invalid start byte\)"):
        read_text("-")
    monkeypatch.setattr("sys.stdin", io.StringIO('{"a":"\udcff"}'))  # a text stream without bytes
    with pytest.raises(UserFileError, match=r"^stdin is not UTF-8 text: character U\+DCFF at offset 6"):
        read_text("-")
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf{}")
    assert read_text(str(tmp_path / "bom.json")) == "\ufeff{}"


def test_the_cli_names_bad_utf8_and_a_bom(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        "sys.stdin", io.TextIOWrapper(io.BytesIO(CAPTION.encode()[:-2] + b'\xff"}'), errors="surrogateescape")
    )
    assert main(["caption", "validate", "-"]) == 2
    assert one_error_line(capsys.readouterr().err).startswith("error: stdin is not UTF-8 text: byte 0xff at offset")
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + CAPTION.encode())
    assert main(["caption", "validate", str(bom)]) == 1
    out = capsys.readouterr().out
    assert out == f"{bom}: $: caption starts with a byte-order mark (U+FEFF, the bytes EF BB BF in a UTF-8 file) (" + (
        "remove it (save the file as UTF-8 without BOM): the prompt is tokenized verbatim, the mark included)\n"
    )
    assert main(["generate", str(bom), "--model", "tiny-random", "-o", str(tmp_path / "x.png")]) == 2
    assert "caption starts with a byte-order mark" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# CLI mistakes: one `error:` line, exit code 2, before anything is loaded
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    """Records every model load the CLI tries: there must be none for a mistake."""
    loads = []
    monkeypatch.setattr(diffusers_ideogram4.testing, "tiny_pipeline", lambda **kwargs: loads.append("tiny"))
    monkeypatch.setattr(Ideogram4Pipeline, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a)))
    return loads


def _generate(tmp_path, *arguments, output="out.png", model="tiny-random"):
    return ["generate", CAPTION, "--model", model, "-o", str(tmp_path / output), *arguments]


@pytest.mark.parametrize(
    "output, arguments, expected",
    [
        (
            "missing/out.png",
            [],
            "error: cannot write {tmp}/missing/out.png: the folder {tmp}/missing does not exist; create it first",
        ),
        (".", [], "error: cannot write {tmp}: it is a folder; give a file name such as {tmp}/image.png"),
        (
            "out.pngx",
            [],
            "error: cannot write {tmp}/out.pngx: extension '.pngx' is not an image format Pillow can write; end the name with .png (lossless), .webp, .jpg or another format Pillow saves",
        ),
        (
            "out",
            [],
            "error: cannot write {tmp}/out: no extension is not an image format Pillow can write; end the name with .png (lossless), .webp, .jpg or another format Pillow saves",
        ),
        (
            "out.png",
            ["--guidance-scale", "nan"],
            "error: --guidance-scale nan: give a finite number (the presets guide with 7.0, then 3.0), or leave it out for the preset's schedule.",
        ),
        (
            "out.png",
            ["--guidance-scale=-inf"],
            "error: --guidance-scale -inf: give a finite number (the presets guide with 7.0, then 3.0), or leave it out for the preset's schedule.",
        ),
        (
            "out.png",
            ["--seed", str(2**64)],
            f"error: --seed {2**64} is out of range: give a whole number from {-(2**63)} to {2**64 - 1}.",
        ),
        (
            "out.png",
            ["--device", "gpu"],
            "error: --device 'gpu' is not a device this torch can use (Expected one of cpu, cuda, ipu, xpu, mkldnn, opengl, opencl, ideep, hip, ve, fpga, maia, xla, lazy, vulkan, mps, meta, hpu, mtia, privateuseone device type at start of device string: gpu); try cpu or cuda.",
        ),
        (
            "out.png",
            ["--device", "cpu:3"],
            "error: --device cpu:3: this machine has 1 cpu device(s), numbered from 0 to 0.",
        ),
        (
            "out.png",
            ["--device", "meta"],
            "error: --device 'meta' is not a device this torch can use (Device 'meta' does not have a corresponding module registered as 'torch.meta'.); try cpu or cuda.",
        ),
    ],
)
def test_generate_refuses_a_bad_argument_before_loading(tmp_path, capsys, no_loading, output, arguments, expected):
    assert main(_generate(tmp_path, *arguments, output=output)) == 2
    assert one_error_line(capsys.readouterr().err) == expected.format(tmp=tmp_path)
    assert no_loading == [] and sorted(os.listdir(tmp_path)) == []


def test_generate_refuses_a_device_this_machine_lacks(tmp_path, capsys, no_loading, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(_generate(tmp_path, "--device", "cuda")) == 2
    assert (
        one_error_line(capsys.readouterr().err)
        == "error: --device cuda: this machine has no cuda device; use --device cpu."
    )
    assert no_loading == []


def test_generate_refuses_an_unwritable_folder_or_file(tmp_path, capsys, no_loading, monkeypatch):
    # Root may write anywhere whatever the mode bits say: the check asks os.access, which is what is faked here.
    real_access = os.access
    read_only = {str(tmp_path), str(tmp_path / "locked.png")}
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) not in read_only and real_access(path, mode))
    (tmp_path / "locked.png").write_bytes(OLD_BYTES)
    assert main(_generate(tmp_path)) == 2
    assert (
        one_error_line(capsys.readouterr().err)
        == f"error: cannot write {tmp_path}/out.png: the folder {tmp_path} is not writable"
    )
    read_only.remove(str(tmp_path))
    assert main(_generate(tmp_path, output="locked.png")) == 2
    assert (
        one_error_line(capsys.readouterr().err) == f"error: cannot write {tmp_path}/locked.png: the file is read-only"
    )
    assert no_loading == []


def test_generate_refuses_a_model_path_that_is_not_there(tmp_path, capsys, no_loading):
    assert main(_generate(tmp_path, model=str(tmp_path / "missing"))) == 2
    expected = (
        f"error: --model {tmp_path}/missing: there is no such folder, and it is not a hub repo id (owner/name) either."
    )
    assert one_error_line(capsys.readouterr().err) == expected
    (tmp_path / "weights.safetensors").write_bytes(b"")
    assert main(_generate(tmp_path, model=str(tmp_path / "weights.safetensors"))) == 2
    expected = f"error: --model {tmp_path}/weights.safetensors is a file: give the model's folder (with model_index.json) or a hub id."
    assert one_error_line(capsys.readouterr().err) == expected
    assert no_loading == []


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["caption", "validate", "{tmp}/missing.json"],
            "error: cannot read {tmp}/missing.json: No such file or directory",
        ),
        (["caption", "format", "{tmp}", "-o", "{tmp}/out.json"], "error: cannot read {tmp}: Is a directory"),
        (
            ["caption", "format", "{tmp}/c.json", "-o", "{tmp}/no/out.json"],
            "error: cannot write {tmp}/no/out.json: No such file or directory; nothing was written",
        ),
        (
            ["caption", "format", "{tmp}/c.json", "-o", "{tmp}"],
            "error: cannot write {tmp}: Is a directory; {tmp} was not changed",
        ),
        (
            ["caption", "preview", "{tmp}/c.json", "-o", "{tmp}/layout.txt"],
            "error: cannot write {tmp}/layout.txt: extension '.txt' is not an image format Pillow can write; end the name with .png (lossless), .webp, .jpg or another format Pillow saves",
        ),
        (
            ["caption", "preview", "{tmp}/c.json", "-o", "{tmp}/no/layout.png"],
            "error: cannot write {tmp}/no/layout.png: the folder {tmp}/no does not exist; create it first",
        ),
        (
            ["caption", "preview", "{tmp}/c.json", "-o", "{tmp}/layout.png", "--image", "{tmp}/c.json"],
            "error: cannot read --image {tmp}/c.json: cannot identify image file '{tmp}/c.json'",
        ),
        (
            ["caption", "preview", "{tmp}/c.json", "-o", "{tmp}/layout.png", "--width", "-3"],
            "error: render_layout: `width` must be a positive int (pixels), got -3.",
        ),
    ],
)
def test_caption_commands_report_mistakes_in_one_line(tmp_path, capsys, argv, expected):
    (tmp_path / "c.json").write_text(CAPTION, encoding="utf-8")
    listing = sorted(os.listdir(tmp_path))
    assert main([part.format(tmp=tmp_path) for part in argv]) == 2
    assert one_error_line(capsys.readouterr().err) == expected.format(tmp=tmp_path)
    assert sorted(os.listdir(tmp_path)) == listing


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["generate", CAPTION, "--height", "q"],
            "error: argument --height: invalid int value: 'q' (see `ideogram4 generate --help`)",
        ),
        (
            ["generate", CAPTION, "--steps", "1.5"],
            "error: argument --steps: invalid int value: '1.5' (see `ideogram4 generate --help`)",
        ),
        (
            ["caption", "preview", "c.json"],
            "error: the following arguments are required: -o/--output (see `ideogram4 caption preview --help`)",
        ),
    ],
)
def test_argument_syntax_errors_are_one_line_too(capsys, argv, expected):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert one_error_line(capsys.readouterr().err) == expected
