"""``python -m divmoe``: the ``divmoe`` command (what ``torchrun -m divmoe`` runs)."""

import sys

from .cli import main

sys.exit(main())
