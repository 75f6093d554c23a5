"""``python -m pytest_gpumem.cli``: the same as the ``gpumem`` command."""

import sys

from . import main

sys.exit(main())
