"""Per-task example sampler: which training example of task i fills a slot the mixer gave to task i.

docs/maths.md sections 3-4 draw examples uniformly from the chosen task; we draw them without replacement
within an epoch: each task walks through a fresh random permutation of its training indices, and starts a
new permutation (a new epoch) when it runs out, so every example is seen once per epoch of its task.

The permutation of epoch e of task i comes from ``numpy.random.default_rng([seed, i, e])``: a seeded
Generator of its own, re-derived on demand rather than carried along. The whole state is therefore two
integers per task (epoch, position), and a resumed run draws exactly the same sequence as an
uninterrupted one; the state holds no generator bits that could drift between numpy versions of the
same seed-sequence algorithm.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class TaskSampler:
    """Seeded per-task epoch permutations, cycled by epoch.

    ``task_sizes[i]``: the number of training examples of task i (every one must be >= 1).
    ``task_names``: used in error messages only.
    """

    def __init__(self, task_sizes: Sequence[int], seed: int, task_names: Sequence[str] | None = None):
        sizes = [int(n) for n in task_sizes]
        if not sizes:
            raise ValueError("TaskSampler needs at least one task")
        self.names = list(task_names) if task_names is not None else [f"task {i}" for i in range(len(sizes))]
        if len(self.names) != len(sizes):
            raise ValueError(f"{len(self.names)} task names for {len(sizes)} task sizes")
        for i, n in enumerate(sizes):
            if n < 1:
                raise ValueError(f"{self.names[i]} (task id {i}) has no training examples to sample")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"sampler seed must be an integer >= 0, got {seed!r}")
        self.seed = int(seed)
        self.sizes = sizes
        self.epochs = [0] * len(sizes)
        self.positions = [0] * len(sizes)
        self._permutations: dict[int, tuple[int, np.ndarray]] = {}  # task -> (epoch, permutation)

    @property
    def k(self) -> int:
        return len(self.sizes)

    def permutation(self, task: int, epoch: int) -> np.ndarray:
        """The order in which task ``task`` visits its examples in epoch ``epoch``."""
        cached = self._permutations.get(task)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, task, epoch])
            cached = (epoch, rng.permutation(self.sizes[task]))
            self._permutations[task] = cached
        return cached[1]

    def _check_task(self, task) -> int:
        if isinstance(task, (bool, np.bool_)) or not isinstance(task, (int, np.integer)):
            raise ValueError(f"task id must be an integer, got {task!r}")
        if not 0 <= task < self.k:
            raise ValueError(f"task id {task} is out of range: there are {self.k} tasks "
                             f"(ids 0 to {self.k - 1})")
        return int(task)

    def take(self, task_ids: Iterable[int]) -> list[tuple[int, int]]:
        """The next example of each requested task, in order: a list of (task, index into its train list).

        A task asked for several times gets successive examples of its permutation. All ids are checked
        before anything is drawn, so a bad id leaves the state untouched.
        """
        ids = task_ids.reshape(-1).tolist() if isinstance(task_ids, np.ndarray) else list(task_ids)
        tasks = [self._check_task(t) for t in ids]
        draws = []
        for task in tasks:
            if self.positions[task] == self.sizes[task]:
                self.epochs[task] += 1
                self.positions[task] = 0
            index = int(self.permutation(task, self.epochs[task])[self.positions[task]])
            self.positions[task] += 1
            draws.append((task, index))
        return draws

    def state_dict(self) -> dict:
        """Plain JSON-serializable state: seed, sizes, and per task its epoch and position within it."""
        return {"seed": self.seed, "sizes": list(self.sizes), "epochs": list(self.epochs),
                "positions": list(self.positions)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state saved by :meth:`state_dict`; the seed and task sizes must match this sampler."""
        expected = {"seed", "sizes", "epochs", "positions"}
        if not isinstance(state, dict) or set(state) != expected:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"sampler state must have keys {sorted(expected)}, got {keys}")
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, "
                             f"this sampler has seed {self.seed}")
        if list(state["sizes"]) != self.sizes:
            raise ValueError(f"sampler state was saved for task sizes {list(state['sizes'])}, "
                             f"this sampler has {self.sizes}: the training data changed")
        epochs, positions = [int(e) for e in state["epochs"]], [int(p) for p in state["positions"]]
        if len(epochs) != self.k or len(positions) != self.k:
            raise ValueError(f"sampler state has {len(epochs)} epochs and {len(positions)} positions "
                             f"for {self.k} tasks")
        for i, (e, p) in enumerate(zip(epochs, positions)):
            if e < 0 or not 0 <= p <= self.sizes[i]:
                raise ValueError(f"sampler state of {self.names[i]}: epoch {e}, position {p} out of range "
                                 f"(size {self.sizes[i]})")
        self.epochs, self.positions = epochs, positions
