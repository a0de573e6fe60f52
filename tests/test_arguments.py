"""Numbers entering a command line are range-checked by argparse: a usage error, never a traceback."""

from __future__ import annotations

import argparse

import pytest

from clitools.arguments import float_above, int_at_least


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--k", type=int_at_least(1, 1000))
    parser.add_argument("--rate", type=float_above(0))
    parser.add_argument("--wait", type=float_above(0, inclusive=True))
    return parser


@pytest.mark.parametrize(
    "argv",
    [
        ["--k", "0"],
        ["--k", "1001"],
        ["--k", "1e300"],
        ["--k", "10" * 20],
        ["--rate", "0"],
        ["--rate", "nan"],
        ["--rate", "inf"],
        ["--rate", "-1e300"],
        ["--wait", "-0.1"],
        ["--rate", "abc"],
    ],
)
def test_out_of_range_or_malformed_is_refused(argv: list[str]) -> None:
    with pytest.raises(argparse.ArgumentError):
        _parser().parse_args(argv)


def test_in_range_values_parse() -> None:
    args = _parser().parse_args(["--k", "1000", "--rate", "0.5", "--wait", "0"])
    assert (args.k, args.rate, args.wait) == (1000, 0.5, 0.0)
