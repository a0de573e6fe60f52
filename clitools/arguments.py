"""argparse types that range-check numbers where they enter a command, so `--k 0` is a usage error, not a traceback."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse `type`: an integer >= minimum (and <= maximum when given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value

    return parse


def float_above(minimum: float, inclusive: bool = False) -> Callable[[str], float]:
    """An argparse `type`: a finite float > minimum (>= with `inclusive`); NaN and inf are refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum}, got {value}")
        return value

    return parse
