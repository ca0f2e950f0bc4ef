"""The TRL integration needs the trl extra (TRL, datasets, accelerate): skip its tests without it.

This folder is not named ``trl``: a test folder of that name would shadow the library."""

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")
