"""`python -m fastvit_style ...`: the `fastvit-style` command, for where the console script is not on PATH."""

import sys

from .cli import main

sys.exit(main())
