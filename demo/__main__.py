"""`python -m demo`: the whole system on this machine (see demo/__init__.py; the core-only demo is hsnn.demo)."""

from __future__ import annotations

import sys

from demo.run import main

if __name__ == "__main__":
    sys.exit(main())
