"""`python -m chaos <experiment> [options]`; `python -m chaos --list` names them."""

from __future__ import annotations

import importlib
import sys

# experiment key -> module with `main(argv: list[str]) -> int` (0: the experiment passed)
EXPERIMENTS: dict[str, str] = {
    "e1": "chaos.e1_trainer_kills",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print(__doc__)
        for key, module in EXPERIMENTS.items():
            doc = (importlib.import_module(module).__doc__ or "").strip().splitlines()[0]
            print(f"  {key:<5}{doc}")
        return 0 if argv else 2
    key = argv[0].lower()
    if key not in EXPERIMENTS:
        print(f"unknown experiment {argv[0]!r}; known: {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    return importlib.import_module(EXPERIMENTS[key]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
