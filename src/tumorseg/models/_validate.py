"""Small argument checks shared by the model builders (each error names the parameter)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence


def check_input_shape(input_shape, multiple: int, model: str) -> tuple[int, int, int]:
    """``(H, W, C)`` of positive ints with H and W divisible by ``multiple``."""
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise ValueError(f"{model}: input_shape must be (height, width, channels), got {input_shape!r}") from None
    if len(shape) != 3 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in shape):
        raise ValueError(f"{model}: input_shape must be 3 positive ints (height, width, channels), got {input_shape!r}")
    height, width, channels = (int(v) for v in shape)
    if height % multiple or width % multiple:
        raise ValueError(
            f"{model}: input height and width must be divisible by {multiple} "
            f"(the model downsamples {multiple.bit_length() - 1} times), got {height}x{width}"
        )
    return height, width, channels


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def check_float(name: str, value, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_int_list(name: str, value, low: int, length: int | None = None) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list of integers, got {value!r}")
    items = tuple(check_int(f"{name}[{i}]", v, low) for i, v in enumerate(value))
    if not items:
        raise ValueError(f"{name} must not be empty")
    if length is not None and len(items) != length:
        raise ValueError(f"{name} must have {length} values, got {len(items)}: {list(items)}")
    return items
