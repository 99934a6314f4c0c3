"""``python -m anvil_nb``: the command line (see :mod:`anvil_nb.cli`)."""

from __future__ import annotations

import sys

from anvil_nb.cli import main

if __name__ == "__main__":
    sys.exit(main())
