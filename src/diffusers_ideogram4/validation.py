"""Checks of user arguments shared by the model, the pipeline and the command line: each raises a ValueError that
names the argument, the value and the fix."""

import math
import numbers

from .constants import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, PIXELS_PER_TOKEN


def finite_float(name: str, value) -> float:
    """A real, finite number (a Python or numpy number, or a one-element tensor) as a float, or a ValueError that
    names the argument. Strings and bools are refused rather than read."""
    number = math.nan
    if hasattr(value, "numel") and value.numel() == 1:  # a one-element tensor or array
        number = float(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    return number


def require_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def check_image_size(height, width) -> None:
    """Both sides a multiple of 16 in 256..2048 (SPEC 6), or a ValueError that suggests the nearest valid sizes."""
    for name, side in (("height", height), ("width", width)):
        if isinstance(side, bool) or not isinstance(side, int):
            raise ValueError(f"`{name}` must be an int number of pixels, got {side!r}.")
        if side % PIXELS_PER_TOKEN or not MIN_IMAGE_SIDE <= side <= MAX_IMAGE_SIDE:
            below = side // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN
            nearby = {min(max(v, MIN_IMAGE_SIDE), MAX_IMAGE_SIDE) for v in (below, below + PIXELS_PER_TOKEN)}
            raise ValueError(
                f"`{name}={side}` is not supported: Ideogram 4 needs a multiple of {PIXELS_PER_TOKEN} between "
                f"{MIN_IMAGE_SIDE} and {MAX_IMAGE_SIDE} pixels per side. Try "
                + " or ".join(f"`{name}={v}`" for v in sorted(nearby))
                + "."
            )
