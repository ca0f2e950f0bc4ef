"""Preference pairs of the tasks (spec section 1): z = (x, y_w, y_l) with a stable id and its task."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PreferencePair:
    """One preference example: ``chosen`` (y_w) is preferred to ``rejected`` (y_l) as a reply to ``prompt``.

    ``id`` is a content hash, stable across runs and machines, that caches key on.
    """

    id: str
    task: str
    prompt: str
    chosen: str
    rejected: str
