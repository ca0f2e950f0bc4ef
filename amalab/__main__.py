"""``python -m amalab`` is the ``amalab`` command (what ``torchrun -m amalab llm train CONFIG`` runs)."""

import sys

from amalab.cli import main

sys.exit(main())
