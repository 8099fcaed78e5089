"""``python -m divmoe`` = the ``divmoe`` command."""
import sys

from .cli import main

sys.exit(main())
