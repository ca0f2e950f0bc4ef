"""What an LLM experiment tells its user while it works: messages, and progress bars over the pairs it scores.

Only rank 0 of a distributed run speaks; ``enabled = False`` (``--quiet``) silences both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from amalab.training.cache import ValueCache, cached
from amalab.training.distributed import World


@dataclass(frozen=True)
class Progress:
    """Where an experiment's messages and progress bars go: rank 0 of ``world``, when ``enabled``."""

    world: World
    enabled: bool = True

    def say(self, message: str) -> None:
        if self.enabled and self.world.is_main:
            print(message, flush=True)

    def timed(self, what: str, n: int, fn: Callable[[Callable[[int], None]], object]):
        """``fn(progress)`` with a progress bar over its ``n`` pairs (rank 0); then its time and throughput."""
        start = time.perf_counter()
        with tqdm(total=n, desc=what, unit="pair", dynamic_ncols=True, mininterval=1.0,
                  disable=not (self.enabled and self.world.is_main)) as bar:
            # each rank scores about 1/W of the pairs: rank 0's count, scaled, is the whole job's progress
            result = fn(lambda done: bar.update(done * self.world.size))
        seconds = time.perf_counter() - start
        self.say(f"{what}: {n} pairs in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} pairs/s)")
        return result

    def cached(self, folder: Path, manifest: dict, what: str, n: int, build) -> ValueCache:
        """The cache in ``folder`` (:func:`amalab.training.cache.cached`), built by ``build(progress)`` over ``n``
        pairs, timed, when missing."""
        return cached(folder, manifest, lambda: self.timed(what, n, build), log=self.say, world=self.world)
