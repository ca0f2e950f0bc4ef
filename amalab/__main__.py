"""``python -m amalab``: the ``amalab`` command."""

import sys

from amalab.cli import main

sys.exit(main())
