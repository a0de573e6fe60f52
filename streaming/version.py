"""The installed package's version, read from its metadata (pyproject.toml is the one place it is written)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "hsnn-serve"


def package_version() -> str:
    """`hsnn-serve`'s version, or "0+unknown" when running from a checkout that was never installed."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0+unknown"
