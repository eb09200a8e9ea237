"""Checks of user arguments shared by the model, the pipeline and the command line: each raises a ValueError that
names the argument, the value and the fix."""

import math
import numbers

from .constants import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, PIXELS_PER_TOKEN


def finite_float(name: str, value) -> float:
    """A real, finite number (a Python or numpy number, or a one-element tensor) as a float, or a ValueError that
    names the argument. Strings and bools are refused rather than read."""
    number = math.nan
    one_element = hasattr(value, "numel") and value.numel() == 1  # a one-element tensor or array
    if one_element or (isinstance(value, numbers.Real) and not isinstance(value, bool)):
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


def string_list(name: str, value, what: str, hint: str = "") -> list[str]:
    """`value` as a non-empty list of strings (one string is a list of one), or a ValueError that says each is `what`
    and ends with `hint` (a sentence on how to fix it, if any)."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(entry, str) for entry in values):
        raise ValueError(
            f"`{name}` must be {what} or a non-empty list of them, got {type(value).__name__}: {str(value)[:80]!r}."
            + hint
        )
    return values


def check_generator_type(generator) -> None:
    """`generator`: None, a torch.Generator or a list of them (how many is for the caller: per image, per idea)."""
    import torch  # here, not above: the command line checks its arguments before it imports torch

    generators = generator if isinstance(generator, list) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError(
            f"`generator` must be a torch.Generator or a list of them, got {generator!r}; e.g. "
            "`generator=torch.Generator().manual_seed(0)`."
        )
