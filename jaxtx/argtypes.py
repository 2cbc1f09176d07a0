"""argparse `type=` converters that range-check numbers, so a bad flag value is refused by argparse itself:

    p.add_argument("--seq-len", type=integer(minimum=1))
    p.add_argument("--top-p", type=real(0.0, 1.0, low_open=True))      # (0, 1]

argparse turns the ArgumentTypeError into `jaxtx CMD: error: argument --top-p: 1.5 is not in (0, 1]` and exit
status 2, naming the flag. Floats must be finite: `float("nan")` parses, and NaN compares False with every bound, so
an unchecked NaN slips through any `x < lo` test (a NaN length penalty made beam search print nothing).
"""
from __future__ import annotations

import argparse
import math


def _range_text(lo, hi, low_open: bool, high_open: bool) -> str:
    if hi is None:
        return f"{'>' if low_open else '>='} {lo}"
    if lo is None:
        return f"{'<' if high_open else '<='} {hi}"
    return f"in {'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"


def integer(minimum: int | None = None, maximum: int | None = None):
    """An int in [minimum, maximum] (either bound may be None)."""
    rule = _range_text(minimum, maximum, False, False) if (minimum, maximum) != (None, None) else ""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer" + (f" (expected {rule})" if rule else "")) \
                from None
        if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
            raise argparse.ArgumentTypeError(f"{v} is not {rule}")
        return v

    parse.__name__ = "integer"
    return parse


def real(minimum: float | None = None, maximum: float | None = None, *, low_open: bool = False,
         high_open: bool = False):
    """A finite float in the interval given by the bounds (open or closed on each side; a bound may be None)."""
    rule = _range_text(minimum, maximum, low_open, high_open) if (minimum, maximum) != (None, None) else ""
    expected = f" (expected {rule})" if rule else ""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number{expected}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number{expected}")
        below = minimum is not None and (v <= minimum if low_open else v < minimum)
        above = maximum is not None and (v >= maximum if high_open else v > maximum)
        if below or above:
            raise argparse.ArgumentTypeError(f"{text} is not {rule}")
        return v

    parse.__name__ = "real"
    return parse
