"""What the command-line programs share (`ideogram4` and the scripts in conversion/): the options of a converter that
writes a folder, and the report of a user's mistake as one `error:` line."""

import sys
from collections.abc import Callable


# What a failed conversion raises: a user's mistake or a problem of the machine (OSError: a missing file, a read-only
# folder; ImportError: an optional package that is not installed; RuntimeError: a damaged file, a failed verification).
USER_ERRORS = (ValueError, KeyError, OSError, RuntimeError, ImportError)


def add_output_folder_options(parser, verify_help: str = "skip reloading the output") -> None:
    """The options of a converter that writes a folder (staged, verified, then moved into place): --dry-run,
    --overwrite, --replace-any-folder, --no-verify and --no-progress."""
    parser.add_argument("--dry-run", action="store_true", help="print what would be written; write nothing")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output folder written by this converter"
    )
    parser.add_argument(
        "--replace-any-folder", action="store_true", help="replace an existing output folder, whatever it holds"
    )
    parser.add_argument("--no-verify", action="store_true", help=verify_help)
    parser.add_argument("--no-progress", action="store_true")


def output_folder_arguments(args) -> dict:
    """`add_output_folder_options`' values as the keyword arguments of the `convert_*` functions."""
    return dict(
        dry_run=args.dry_run,
        overwrite=args.overwrite,
        replace_any_folder=args.replace_any_folder,
        verify=not args.no_verify,
        progress=not args.no_progress,
    )


def exit_code(run: Callable[[], int], errors: tuple[type[Exception], ...] = USER_ERRORS, code: int = 1) -> int:
    """`run()` -> the exit code it returns; one of `errors` is printed as one `error:` line on stderr, without a
    traceback, and gives `code`."""
    try:
        return run()
    except errors as error:
        print(f"error: {error}", file=sys.stderr)
        return code


def print_summary(report) -> int:
    """Print a conversion report's summary -> exit code 0."""
    print(report.summary())
    return 0
