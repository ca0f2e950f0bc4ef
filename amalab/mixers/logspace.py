"""Log-space normalisation on the last axis (plain numpy: scipy's versions cost ~100x more on tiny arrays)."""

from __future__ import annotations

import numpy as np


def log_normalize(log_w: np.ndarray) -> np.ndarray:
    """log_w - logsumexp(log_w) along the last axis, computed without overflow."""
    shifted = log_w - log_w.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(log_w: np.ndarray) -> np.ndarray:
    """exp(log_w) / sum exp(log_w) along the last axis, computed without overflow."""
    w = np.exp(log_w - log_w.max(axis=-1, keepdims=True))
    return w / w.sum(axis=-1, keepdims=True)
