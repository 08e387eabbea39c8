"""``python -m stablerl ...`` is the CLI (what ``torchrun -m stablerl train ...`` launches)."""

import sys

from stablerl.cli import main

sys.exit(main())
