"""`ideogram4 caption validate | format | preview | expand`: the caption tools on the command line.

`add_caption_commands(subparsers)` adds them to any argparse parser; each handler is `args.func(args) -> int`.
"""

import argparse
import json
import sys

from ..constants import DEFAULT_IMAGE_SIDE as DEFAULT_SIDE
from ..files import STDIN, UserFileError, check_image_path, read_text, save_image, write_atomically
from ..recipe import DEFAULT_DTYPE, DTYPES
from .builder import to_json
from .checker import CaptionIssue, check_caption
from .preview import render_layout


# Exit codes: 0 success, 1 a caption has errors, 2 a usage error: a bad argument, or a file that cannot be read
# (missing, not UTF-8) or written (one `error: ...` line on stderr; nothing was written).
EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def add_caption_commands(subparsers) -> argparse.ArgumentParser:
    """Add the `caption` command and its subcommands to an argparse `subparsers` object.

    Args:
        subparsers: what `parser.add_subparsers()` returned.

    Returns:
        The `caption` parser.
    """
    parser = subparsers.add_parser(
        "caption",
        help="Validate, format and preview structured JSON captions.",
        description="Tools for Ideogram 4's structured JSON captions.",
    )
    commands = parser.add_subparsers(dest="caption_command", required=True, metavar="{validate,format,preview,expand}")

    validate = commands.add_parser(
        "validate",
        help="Check caption files; exit 1 if any has errors.",
        description="Print every issue as `FILE: path: message (hint)`; warnings end with [warning]. Exit 1 if any "
        "file has errors, 0 otherwise.",
    )
    validate.add_argument("files", nargs="+", metavar="FILE", help="a file holding one caption object, '-' for stdin")
    validate.set_defaults(func=run_validate)

    format_ = commands.add_parser(
        "format",
        help="Print a caption in canonical form (trained key order, minified UTF-8).",
        description="Reorder keys into the trained order and minify with literal UTF-8; values are not changed. "
        "Remaining issues are listed on stderr.",
    )
    format_.add_argument("file", metavar="FILE", help="a file holding one caption object, '-' for stdin")
    destination = format_.add_mutually_exclusive_group()
    destination.add_argument("-o", "--output", metavar="OUT", help="write here instead of stdout")
    destination.add_argument("--in-place", action="store_true", help="rewrite FILE")
    format_.set_defaults(func=run_format)

    preview = commands.add_parser(
        "preview",
        help="Draw a caption's layout (boxes, labels, palettes) to a PNG.",
        description="Draw every element's bbox with its label and palette, on white or over --image.",
    )
    preview.add_argument("file", metavar="FILE", help="a file holding one caption object, '-' for stdin")
    preview.add_argument("-o", "--output", required=True, metavar="layout.png", help="image to write")
    preview.add_argument("--width", type=int, default=None, help=f"default: --image's width, else {DEFAULT_SIDE}")
    preview.add_argument("--height", type=int, default=None, help=f"default: --image's height, else {DEFAULT_SIDE}")
    preview.add_argument("--image", default=None, metavar="generated.png", help="draw over this image")
    preview.set_defaults(func=run_preview)

    expand = commands.add_parser(
        "expand",
        help="Expand a plain-text idea into a caption with the text encoder (local, grammar-constrained).",
        description="Decode a structured caption for IDEA with Ideogram 4's text encoder and the Qwen3-VL LM head, "
        "constrained to the caption grammar: the result always passes `caption validate`. Needs "
        '`pip install "diffusers-ideogram4[expand]"`.',
    )
    expand.add_argument("idea", metavar="IDEA", help="the idea as plain text, '-' for stdin")
    expand.add_argument("-o", "--output", default=None, metavar="caption.json", help="write here instead of stdout")
    expand.add_argument("--height", type=int, default=DEFAULT_SIDE, help=f"image height (default {DEFAULT_SIDE})")
    expand.add_argument("--width", type=int, default=DEFAULT_SIDE, help=f"image width (default {DEFAULT_SIDE})")
    expand.add_argument("--seed", type=int, default=0, help="sampling seed; the same seed gives the same caption")
    add_expansion_options(expand)
    expand.add_argument("--max-new-tokens", type=int, default=None, help="default: what the 2048-token limit leaves")
    expand.add_argument(
        "--model",
        default=None,
        help="hub id or local folder of the pipeline (only its text encoder and tokenizer are loaded); "
        "'tiny-random' builds a tiny random model offline (a valid but meaningless caption)",
    )
    expand.add_argument("--head", default=None, help="hub id or folder of the LM head (default: the published one)")
    expand.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help=f"default {DEFAULT_DTYPE} (fp32 for tiny-random)"
    )
    expand.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    expand.add_argument("--offload", action="store_true", help="enable_model_cpu_offload")
    expand.set_defaults(func=run_expand)
    return parser


def add_expansion_options(parser) -> None:
    """How ideas are expanded: shared by `caption expand`, `generate --idea` and `batch` (jobs with an `idea`)."""
    parser.add_argument("--temperature", type=float, default=None, help="expansion: default 0.7; 0 decodes greedily")
    parser.add_argument(
        "--max-elements", type=int, default=None, help="expansion: at most this many elements (default 12)"
    )
    parser.add_argument(
        "--max-chars", type=int, default=None, help="expansion: cap on every string of the caption, in characters"
    )


def _print(line: str, stream=None) -> None:
    """print() that cannot fail on characters the terminal's encoding lacks (they are escaped)."""
    stream = sys.stdout if stream is None else stream
    encoding = getattr(stream, "encoding", None) or "utf-8"
    print(line.encode(encoding, "backslashreplace").decode(encoding), file=stream)


def _read(name: str) -> str | None:
    """The caption text of a file (or stdin) as strict UTF-8, without the file's trailing newline; None after
    printing one `error:` line when it cannot be read."""
    try:
        text = read_text(name)
    except UserFileError as error:
        _print(f"error: {error}", sys.stderr)
        return None
    # A newline at the end is the file's, not the caption's.
    return text.rstrip("\r\n")


def _line(name: str, issue: CaptionIssue) -> str:
    return f"{name}: {issue}" + ("" if issue.is_error else " [warning]")


def run_validate(args) -> int:
    """`caption validate FILE...`: print every issue; 1 if any file has errors, 2 if one cannot be read."""
    failed = unreadable = False
    for name in args.files:
        text = _read(name)
        if text is None:
            unreadable = True
            continue
        issues = check_caption(text)
        for issue in issues:
            _print(_line(name, issue))
        if not issues:
            _print(f"{name}: ok")
        failed = failed or any(issue.is_error for issue in issues)
    return EXIT_USAGE if unreadable else EXIT_INVALID if failed else EXIT_OK


def _load(name: str) -> tuple[str | None, dict | None]:
    """(text, caption dict); (text, None) after printing why the text holds no caption object; (None, None) when the
    file could not be read (its `error:` line printed: a usage error)."""
    text = _read(name)
    if text is None:
        return None, None
    try:
        caption = json.loads(text)
    except (ValueError, RecursionError):
        caption = None
    if not isinstance(caption, dict):
        for issue in check_caption(text):
            if issue.is_error:
                _print(_line(name, issue), sys.stderr)
        return text, None
    return text, caption


def _has_duplicate_keys(text: str) -> bool:
    repeated = []

    def pairs_hook(pairs):
        keys = [key for key, _ in pairs]
        repeated.extend(key for key in set(keys) if keys.count(key) > 1)
        return dict(pairs)

    json.loads(text, object_pairs_hook=pairs_hook)
    return bool(repeated)


def run_format(args) -> int:
    """`caption format FILE [-o OUT | --in-place]`: canonical key order, minified; issues left go to stderr."""
    if args.in_place and args.file == STDIN:
        _print("error: --in-place needs a file, not stdin; use -o OUT", sys.stderr)
        return EXIT_USAGE
    text, caption = _load(args.file)
    if caption is None:
        return EXIT_USAGE if text is None else EXIT_INVALID
    if _has_duplicate_keys(text):  # json.loads kept only the last value of each: formatting would drop the others
        for issue in check_caption(text):
            _print(_line(args.file, issue), sys.stderr)
        _print(
            f"error: {args.file} repeats keys; keep one value of each before formatting (nothing was written)",
            sys.stderr,
        )
        return EXIT_INVALID
    try:
        canonical = to_json(caption)
    except (ValueError, RecursionError) as error:
        _print(f"{args.file}: $: cannot serialize: {error}", sys.stderr)
        return EXIT_INVALID
    # Encoded before anything is opened: text UTF-8 cannot hold (a lone surrogate) stops here, nothing written.
    try:
        data = (canonical + "\n").encode("utf-8")
    except UnicodeEncodeError:
        for issue in check_caption(canonical):
            if issue.is_error:
                _print(_line(args.file, issue), sys.stderr)
        _print(f"error: {args.file} holds text that UTF-8 cannot encode (above); nothing was written", sys.stderr)
        return EXIT_INVALID
    output = args.file if args.in_place else args.output
    if output is None:
        stdout = getattr(sys.stdout, "buffer", None)  # the bytes themselves, whatever the terminal's encoding
        if stdout is None:
            sys.stdout.write(data.decode("utf-8"))
        else:
            sys.stdout.flush()
            stdout.write(data)
            stdout.flush()
    else:
        try:
            write_atomically(output, data)
        except UserFileError as error:
            _print(f"error: {error}", sys.stderr)
            return EXIT_USAGE
    for issue in check_caption(canonical):
        _print(_line(args.file, issue), sys.stderr)
    return EXIT_OK


def run_expand(args) -> int:
    """`caption expand IDEA [-o caption.json]`: the model side lives with `generate` (it imports torch)."""
    from ..cli import run_caption_expand

    return run_caption_expand(args)


def run_preview(args) -> int:
    """`caption preview FILE -o layout.png [--width W --height H] [--image generated.png]`."""
    from PIL import Image

    try:
        check_image_path(args.output)
    except UserFileError as error:
        _print(f"error: {error}", sys.stderr)
        return EXIT_USAGE
    text, caption = _load(args.file)
    if caption is None:
        return EXIT_USAGE if text is None else EXIT_INVALID
    image = None
    if args.image is not None:
        try:
            image = Image.open(args.image)
            image.load()
        except (OSError, Image.DecompressionBombError) as error:
            _print(f"error: cannot read --image {args.image}: {error}", sys.stderr)
            return EXIT_USAGE
    width = args.width if args.width is not None else image.width if image is not None else DEFAULT_SIDE
    height = args.height if args.height is not None else image.height if image is not None else DEFAULT_SIDE
    try:
        save_image(render_layout(caption, width, height, image=image), args.output)
    except ValueError as error:  # a bad size, or UserFileError: the output could not be written
        _print(f"error: {error}", sys.stderr)
        return EXIT_USAGE
    for issue in check_caption(text):
        _print(_line(args.file, issue), sys.stderr)
    _print(f"wrote {args.output} ({width}x{height})")
    return EXIT_OK
