"""The diagnostic run's points and its workspace: each dataset and loss on which the methods are compared
(:class:`Point`, :func:`run_points`), and the run's simulators, pools and output folder with the steps that
train and evaluate models (:class:`Run`). Trained models and records live under a hash of the settings they
depend on (:func:`settings_key`); :mod:`amalab.control.comparison` runs one point through them.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from amalab.atomic_write import write_bytes_atomic, write_json_atomic
from amalab.control.behaviour import train_behaviour
from amalab.control.config import DataConfig, DiagnoseConfig, LossConfig
from amalab.control.dataset import TaskData, build_task_data, task_sizes
from amalab.control.evaluation import episode_returns
from amalab.control.policy import GaussianMLP, LabelledSegment, observation_standardization
from amalab.control.segments import simulate_pool
from amalab.control.simulator import Simulators
from amalab.control.tasks import GOAL_SIZE
from amalab.control.teacher import TeacherConfig
from amalab.control.training import behaviour_cloning_losses, segment_pair_losses, train_policy
from amalab.mixers import make_mixer
from amalab.training.cache import ValueCache, cached_arrays

#: how rollouts treat gymnasium's ``terminated`` (docs/maths.md section 13), in every cache manifest: behaviour
#: policies and segments simulated before episodes ended are not reused
EPISODES_END = "at termination, absorbing reward after"

#: how data is drawn (:func:`data_seed`), in the settings hash: models trained on data shared by every seed are
#: not reused
DATA = "drawn per training seed"


@dataclass(frozen=True)
class Point:
    """One dataset and loss on which methods are compared with ``seeds`` seeds."""

    name: str
    sweep: str | None  # the swept knob (None: the main comparison)
    value: float | None
    data: DataConfig
    teacher: TeacherConfig
    loss: LossConfig
    methods: list[str]
    merges: list[str]
    seeds: int

    @property
    def folder(self) -> str:
        """Points with the same dataset and loss share their folder, so a sweep value equal to the main
        settings reuses the main comparison's models and records."""
        smoothing = f"-eps{self.loss.label_smoothing:g}" if self.loss.label_smoothing else ""
        return f"{self.dataset}-{self.loss.loss_type}{self.loss.beta:g}{smoothing}"

    @property
    def dataset(self) -> str:
        """The dataset's name: points that differ only in the loss share one dataset and one reference."""
        t = self.teacher
        return (f"imbalance{self.data.imbalance:g}-poor{self.data.poor_share:g}-mistake{t.mistake:g}-beta{t.beta:g}"
                f"-gamma{t.gamma:g}-skip{t.skip:g}-equal{t.equal:g}")


def run_points(config: DiagnoseConfig) -> list[Point]:
    """The main comparison, then each sweep value (noise and quality sweeps for each of the sweep losses)."""
    main = Point("main", None, None, config.data, config.teacher, config.loss, config.methods.names,
                 config.merges.names, config.methods.seeds)
    sweeps, points = config.sweeps, [main]
    losses = [LossConfig(name, config.loss.beta, sweeps.label_smoothing if name in ("robust", "exo_pair") else 0.0)
              for name in sweeps.losses] or [config.loss]
    axes = [("imbalance", sweeps.imbalance, [config.loss]), ("mistake", sweeps.mistake, losses),
            ("poor_share", sweeps.poor_share, losses)]
    for axis, values, axis_losses in axes:
        for loss in axis_losses:
            for value in values:
                data = replace(config.data, **{axis: value}) if axis != "mistake" else config.data
                teacher = replace(config.teacher, mistake=value) if axis == "mistake" else config.teacher
                points.append(Point(f"{axis}-{value:g}-{loss.loss_type}", axis, value, data, teacher, loss,
                                    sweeps.methods, sweeps.merges, sweeps.seeds))
    return points


def data_seed(config: DiagnoseConfig, task_index: int, seed: int) -> int:
    """The seed of task ``task_index``'s data for training seed ``seed``: its behaviour policies, segments and
    labels. Each training seed draws its own data, so an interval over seeds holds the data's variance too
    (CEM's behaviour policies vary most; docs/maths.md (64))."""
    return int(np.random.SeedSequence([config.seed, task_index, seed]).generate_state(1)[0])


def settings_key(config: DiagnoseConfig) -> str:
    """A hash of every setting a trained model or its evaluation depends on (not the lists of methods, seeds
    and sweep values, which only add models): models and records live under it, so a changed setting
    trains afresh instead of reusing what other settings produced."""
    settings = {name: asdict(getattr(config, name)) if name not in ("tasks",) else [asdict(t) for t in config.tasks]
                for name in ("tasks", "behaviour", "pool", "policy", "reference", "specialists", "train",
                             "evaluation")}
    settings["evaluation"].pop("min_gain")  # it decides which tasks the summary normalizes, no model or record
    settings.update(seed=config.seed, environment=config.environment, options=config.environment_options,
                    methods=config.methods.options,
                    merges=config.merges.options, episodes=EPISODES_END, data=DATA)
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Run:
    """The run's simulators, pools and output folder, and the steps that train and evaluate models."""

    def __init__(self, config: DiagnoseConfig, show_progress: bool = True):
        self.config, self.out, self.show_progress = config, Path(config.out), show_progress
        torch.set_num_threads(config.threads)
        self.sims = Simulators(config.environment, config.simulators, config.environment_options)
        self.sims.layout.check(config.tasks)
        self.models = self.out / "models" / settings_key(config)
        self._pools: dict[tuple[int, int], dict] = {}

    def log(self, message: str) -> None:
        if self.show_progress:
            tqdm.write(message)

    def pool(self, i: int, seed: int) -> dict:
        """Task ``i``'s segment pool for training seed ``seed``: its behaviour policies (CEM) and the segments
        they simulate, drawn with :func:`data_seed` and cached on disk (a worker reads what the data jobs
        wrote)."""
        if (i, seed) in self._pools:
            return self._pools[i, seed]
        c, task, drawn = self.config, self.config.tasks[i], data_seed(self.config, i, seed)
        behaviour_manifest = {"environment": c.environment, "options": c.environment_options, "task": asdict(task),
                              "behaviour": asdict(c.behaviour), "seed": c.seed, "data_seed": seed,
                              "episodes": EPISODES_END}

        def behaviour():
            policies, returns = train_behaviour(self.sims, task, c.behaviour, drawn, self.show_progress)
            return {"policies": policies, "returns": returns}

        found = cached_arrays(self.out / "behaviour" / task.name / f"seed-{seed}", behaviour_manifest, behaviour,
                              self.log)
        self.log(f"behaviour {task.name}, seed {seed}: returns by level {np.round(found['returns'], 1).tolist()}")
        self._pools[i, seed] = cached_arrays(
            self.out / "pool" / task.name / f"seed-{seed}", {**behaviour_manifest, "pool": asdict(c.pool)},
            lambda: simulate_pool(self.sims, task, found["policies"], c.behaviour.noise, c.pool, drawn,
                                  self.show_progress), self.log)
        return self._pools[i, seed]

    def datasets(self, point: Point, seed: int) -> list[TaskData]:
        """Training seed ``seed``'s datasets of ``point``: each task's labelled pairs from the seed's pool."""
        c = self.config
        sizes = task_sizes(c.pool.train_starts, len(c.tasks), point.data.imbalance)
        return [build_task_data(self.pool(i, seed), task, i, c.pool.train_starts, sizes[i], point.data.poor_share,
                                point.teacher, data_seed(c, i, seed)) for i, task in enumerate(c.tasks)]

    def new_policy(self, seed: int, data: list[TaskData]) -> GaussianMLP:
        """A policy initialized by ``seed``; with ``[policy] normalize``, standardizing its input by the training
        segments of ``data`` (chosen and rejected, every task)."""
        c = self.config.policy
        stats = observation_standardization([s for d in data for p in d.train for s in (p.chosen, p.rejected)]
                                            ) if c.normalize else None
        torch.manual_seed(seed)
        return GaussianMLP(self.sims.observation_size + GOAL_SIZE, self.sims.action_size, c.hidden, c.init_log_std,
                           stats)

    def trained(self, path: Path, start: GaussianMLP, train) -> GaussianMLP:
        """The policy saved at ``path``, or a copy of ``start`` trained by ``train(policy)`` and saved there."""
        policy = copy.deepcopy(start)
        if path.is_file():
            policy.load_state_dict(torch.load(path, weights_only=True))
            return policy
        train(policy)
        buffer = io.BytesIO()
        torch.save(policy.state_dict(), buffer)
        write_bytes_atomic(path, buffer.getvalue())
        return policy

    def reference(self, point: Point, seed: int, data: list[TaskData]) -> GaussianMLP:
        """Training seed ``seed``'s reference: behaviour cloning on the union of its dataset's segments
        (``data``), chosen and rejected, through the step."""
        segments = [[LabelledSegment(f"{p.id}/{side}", i, s) for p in d.train
                     for side, s in (("chosen", p.chosen), ("rejected", p.rejected))] for i, d in enumerate(data)]
        mixer = make_mixer("standard", len(data), sizes=[len(s) for s in segments])
        return self.trained(self.models / "references" / f"{point.dataset}-{seed}.pt",
                            self.new_policy(self.config.seed + seed, data),
                            lambda policy: train_policy(policy, segments, behaviour_cloning_losses(), mixer, None,
                                                        self.config.reference, self.config.seed + seed, "reference"))

    def record(self, path: Path, policy: GaussianMLP, data: list[TaskData], reference: ValueCache, loss: LossConfig,
               about: dict) -> dict:
        """Evaluate ``policy`` (true returns, held-out losses per task) into ``path``, or read it from there."""
        if path.is_file():
            return json.loads(path.read_text())
        held_out = [float(segment_pair_losses(policy, d.held_out, reference, loss.loss_type, loss.beta, loss.options).mean())
                    for d in data]
        returns, lengths = episode_returns(policy, self.sims, self.config.tasks, self.config.evaluation,
                                           about["seed"])
        record = {**about, "returns": returns.mean(axis=1).tolist(), "episode_returns": returns.tolist(),
                  "episode_lengths": lengths.tolist(), "held_out_loss": held_out}
        write_json_atomic(path, record, indent=1)
        return record


_WORKSPACES: dict[str, Run] = {}  # this process's Run, by the repr of its config: one at a time


def workspace(config: DiagnoseConfig) -> Run:
    """This process's :class:`Run` for ``config``, made at a worker's first job (its own simulators, the pools
    read from the cache the parent filled), with torch set to the config's threads for the job (a worker of
    :mod:`amalab.runner` starts each job on one)."""
    key = repr(config)
    if key not in _WORKSPACES:
        use_workspace(Run(config, show_progress=False))
    torch.set_num_threads(config.threads)
    return _WORKSPACES[key]


def use_workspace(run: Run) -> None:
    """Make ``run`` this process's workspace for its config (the parent's, for jobs run in this process)."""
    _WORKSPACES.clear()  # a Run holds simulators and pools: keep only the current one
    _WORKSPACES[repr(run.config)] = run
