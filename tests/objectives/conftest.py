"""tests/objectives: the preference losses run on torch tensors (and are checked against TRL), so, as in
tests/llm, they need the ``llm`` extra and are not collected without it."""

from __future__ import annotations

import importlib.util

_HAVE_LLM_EXTRA = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
collect_ignore_glob = [] if _HAVE_LLM_EXTRA else ["test_*.py"]
