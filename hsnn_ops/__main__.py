"""`python -m hsnn_ops` is `hsnn-ops`."""

import sys

from hsnn_ops.cli import main

sys.exit(main())
