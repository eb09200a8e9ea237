"""What the command-line programs share (`ideogram4` and the scripts in conversion/): the options of a converter that
writes a folder, and the report of a user's mistake as one `error:` line."""

import sys
from collections.abc import Callable


# What a failed conversion raises: a user's mistake or a problem of the machine (OSError: a missing file, a read-only
# folder; ImportError: an optional package that is not installed; RuntimeError: a damaged file, a failed verification).
USER_ERRORS = (ValueError, KeyError, OSError, RuntimeError, ImportError)


def add_output_folder_options(parser, verify_help: str = "skip reloading the output") -> None:
    """The options of a converter that writes a folder (staged, verified, then moved into place): --output,
    --dry-run, --overwrite, --replace-any-folder, --no-verify and --no-progress, each under the name of the `convert_*`
    keyword it fills."""
    parser.add_argument("--output", required=True, help="folder to create (written beside it, moved in when done)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be written; write nothing")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output folder written by this converter"
    )
    parser.add_argument(
        "--replace-any-folder", action="store_true", help="replace an existing output folder, whatever it holds"
    )
    parser.add_argument("--no-verify", dest="verify", action="store_false", help=verify_help)
    add_progress_option(parser)


def add_progress_option(parser) -> None:
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def exit_code(run: Callable[[], int], errors: tuple[type[Exception], ...] = USER_ERRORS, code: int = 1) -> int:
    """`run()` -> the exit code it returns; one of `errors` is printed as one `error:` line on stderr, without a
    traceback, and gives `code`."""
    try:
        return run()
    except errors as error:
        print(f"error: {error}", file=sys.stderr)
        return code


def run_converter(convert: Callable, args) -> int:
    """`convert(**vars(args))` (each option's `dest` is the keyword it fills), its report's summary printed -> exit
    code 0; a user's mistake is one `error:` line and exit code 1, with nothing written."""

    def run() -> int:
        print(convert(**vars(args)).summary())
        return 0

    return exit_code(run)
