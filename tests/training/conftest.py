"""tests/training: the policy-agnostic training core. Most of it trains or checks torch modules, so, as in
tests/llm, those tests need the ``llm`` extra (torch, transformers); without it only the torch-free ones are
collected."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_HAVE_LLM_EXTRA = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
_TORCH_FREE = {"test_sampler.py"}
collect_ignore = [] if _HAVE_LLM_EXTRA else sorted(
    p.name for p in Path(__file__).parent.glob("test_*.py") if p.name not in _TORCH_FREE)
