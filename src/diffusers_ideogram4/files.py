"""The user's files, as the command line reads and writes them: strict UTF-8 in, complete-or-nothing out.

- `read_text(name)`: a file, or stdin for `-`, decoded as strict UTF-8; anything else is one `UserFileError` line that
  names the file and the first bad byte.
- `write_atomically(path, data)`: the bytes are encoded before this is called, written to a temporary file beside
  `path`, flushed to disk and renamed over `path`. A failure at any point leaves `path` as it was (or absent) and no
  temporary file behind.
- `check_image_path(path)` before any expensive work, `save_image(image, path)` after it: the image is encoded in
  memory first, then written with `write_atomically`.
"""

import contextlib
import io
import os
import secrets
import stat
import sys
from pathlib import Path


STDIN = "-"


class UserFileError(ValueError):
    """A file named by the user cannot be read or written; the message names it, says why, and what was kept."""


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def read_text(name: str) -> str:
    """The text of file `name` (stdin for `-`), decoded as strict UTF-8; a byte-order mark is kept (the caption check
    names it).

    Raises:
        UserFileError: the file cannot be read, or is not valid UTF-8 (the message gives the offset of the first
            bad byte).
    """
    label = "stdin" if name == STDIN else name
    try:
        if name == STDIN:
            # The byte stream when there is one: sys.stdin's own decoding may map bad bytes to lone surrogates.
            data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        else:
            data = Path(name).read_bytes()
    except OSError as error:
        raise UserFileError(f"cannot read {label}: {_reason(error)}") from None
    try:
        # A text stream without bytes (an embedding program's) is checked by encoding it back.
        return data.decode("utf-8") if isinstance(data, bytes) else data.encode("utf-8").decode("utf-8")
    except UnicodeError as error:
        unit = "byte" if isinstance(data, bytes) else "character"
        shown = f"0x{data[error.start]:02x}" if isinstance(data, bytes) else f"U+{ord(data[error.start]):04X}"
        raise UserFileError(
            f"{label} is not UTF-8 text: {unit} {shown} at offset {error.start:,} ({error.reason}); captions are "
            "UTF-8, re-save it as UTF-8"
        ) from None


def write_atomically(path, data: bytes) -> None:
    """Replace the file at `path` by `data`, completely or not at all.

    The bytes go to a temporary file in the same folder (so that the final rename stays on one file system), are
    flushed to disk, and the temporary file is renamed over `path`. On any failure, an interruption included, the
    temporary file is removed and `path` keeps its old bytes. A symlink at `path` is followed (its target is
    replaced); a file that exists keeps its permission bits, and one the user may not write is refused.

    Raises:
        UserFileError: naming `path` and the reason; nothing was changed.
    """
    target = Path(os.path.realpath(path))
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        if target.exists() and not os.access(target, os.W_OK):
            raise PermissionError(13, "Permission denied (the file is read-only)")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as error:
        raise UserFileError(f"cannot write {path}: {_reason(error)}; nothing was written") from None
    try:
        with open(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if target.exists():
            os.chmod(temporary, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(temporary, target)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise UserFileError(f"cannot write {path}: {_reason(error)}; {path} was not changed") from None
        raise
    _sync_folder(target.parent)


def _sync_folder(folder: Path) -> None:
    """Flush the rename itself to disk; folders cannot be opened for this on every platform (Windows)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def image_format(path) -> str:
    """Pillow's format for the extension of `path` (`.png` -> `"PNG"`).

    Raises:
        UserFileError: Pillow cannot write files with that extension (or there is none).
    """
    from PIL import Image

    Image.init()
    extension = Path(path).suffix.lower()
    found = Image.registered_extensions().get(extension)
    if found is None or found not in Image.SAVE:
        shown = f"extension {extension!r}" if extension else "no extension"
        raise UserFileError(
            f"cannot write {path}: {shown} is not an image format Pillow can write; end the name with .png "
            "(lossless), .webp, .jpg or another format Pillow saves"
        )
    return found


def check_image_path(path) -> None:
    """Everything about an output image path that can be checked before the image exists: `check_output_path`, and
    an extension Pillow can write."""
    check_output_path(path, example="image.png")


def check_output_path(path, example: str | None = None) -> None:
    """Everything about an output path that can be checked before the content exists (with `example`, an image's).

    Raises:
        UserFileError: `path` is a folder, has an extension Pillow cannot write (images), is in a folder that does
            not exist or cannot be written, or is a file that cannot be replaced.
    """
    target = Path(path)
    if target.is_dir():
        raise UserFileError(
            f"cannot write {path}: it is a folder; give a file name such as {target / (example or 'out.txt')}"
        )
    if example is not None:
        image_format(target)
    folder = Path(os.path.realpath(target)).parent
    if not folder.is_dir():
        raise UserFileError(f"cannot write {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserFileError(f"cannot write {path}: the folder {folder} is not writable")
    if target.exists() and not os.access(target, os.W_OK):
        raise UserFileError(f"cannot write {path}: the file is read-only")


def save_image(image, path, **options) -> None:
    """Encode `image` in memory in the format of `path`'s extension (with Pillow's save `options`, e.g. `pnginfo`),
    then `write_atomically` it.

    Raises:
        UserFileError: the extension is not one Pillow writes, the image cannot be encoded in that format, or
            the file cannot be written; `path` is unchanged.
    """
    encoding = image_format(path)
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=encoding, **options)
    except (OSError, ValueError) as error:
        reason = _reason(error) if isinstance(error, OSError) else error
        raise UserFileError(f"cannot write {path}: {reason}; nothing was written") from None
    write_atomically(path, buffer.getvalue())
