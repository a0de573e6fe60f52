"""`python -m demo`: the whole system on this machine (see demo/__init__.py; the core-only demo is demo.model_only)."""

from __future__ import annotations

import sys

from demo.run import main

if __name__ == "__main__":
    sys.exit(main())
