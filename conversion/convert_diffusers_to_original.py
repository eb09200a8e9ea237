"""Convert an Ideogram 4 repo in the diffusers layout back to the original fused-attention layout.

    python conversion/convert_diffusers_to_original.py --source ideogram-4-bf16 --output ideogram-4-bf16-original

One safetensors file per transformer (`attention.qkv` = rows [q; k; v], `attention.o`), every tensor bit for bit; the
other components are copied. The logic is `diffusers_ideogram4.conversion.convert_diffusers_to_original`.
"""

import argparse
import sys

from diffusers_ideogram4.conversion import ORIGINAL_WEIGHTS_NAME, convert_diffusers_to_original


USER_ERRORS = (ValueError, OSError, RuntimeError)  # OSError: missing files, read-only folders, ...


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="local folder or hub repo id in the diffusers layout")
    parser.add_argument("--output", required=True, help="folder to create (written beside it, moved in when done)")
    parser.add_argument("--components", default=None, help="comma-separated subset, e.g. transformer")
    parser.add_argument(
        "--weights-name",
        default=ORIGINAL_WEIGHTS_NAME,
        help=f"file name of each transformer's weights (default {ORIGINAL_WEIGHTS_NAME})",
    )
    parser.add_argument("--revision", default=None, help="source revision on the hub")
    parser.add_argument("--dry-run", action="store_true", help="print what would be written; write nothing")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output folder written by this converter"
    )
    parser.add_argument(
        "--replace-any-folder", action="store_true", help="replace an existing output folder, whatever it holds"
    )
    parser.add_argument("--no-verify", action="store_true", help="skip reloading the output")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = convert_diffusers_to_original(
            args.source,
            args.output,
            components=args.components,
            weights_name=args.weights_name,
            dry_run=args.dry_run,
            overwrite=args.overwrite,
            replace_any_folder=args.replace_any_folder,
            verify=not args.no_verify,
            revision=args.revision,
            progress=not args.no_progress,
        )
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
