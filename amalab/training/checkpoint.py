"""Atomic checkpoints of a training run: everything a resumed run needs to continue exactly.

Layout, under ``<run_dir>/checkpoints/``::

    step-000100/            one complete checkpoint
        model.safetensors   the trained parameters (a tied weight once, see ``model_aliases``)
        optimizer.pt        optimizer state dict (torch.save)             } each present only
        scheduler.pt        learning-rate scheduler state dict            } when it was given
        mixer.npz           mixer state: a dict of numpy arrays (docs/maths.md section 8)
        sampler.json        sampler state (plain JSON data)
        rng.json            every RNG state (capture_rng_states)
        state.json          format, step, model keys and tied aliases, file list
    step-000200/
    latest                  the name of the newest complete checkpoint, replaced atomically

A checkpoint folder is built and renamed into place by :func:`amalab.atomic_write.atomic_folder` (every file,
the folder and its parent fsynced); the ``latest`` pointer is replaced after that. A save interrupted at any
point therefore leaves the previous checkpoint and pointer intact, and no half-written folder ever carries a
``step-`` name. Only one process (rank 0) may write a run's checkpoints. Loading maps every tensor to the CPU
unless told otherwise, whatever device saved it; ``torch.load`` runs with ``weights_only``, so loading never
runs code stored in a checkpoint. Under several ranks, rank 0 names the checkpoint every rank loads
(:func:`load_latest`; docs/distributed.md).

What needs only the trained weights (a finished run's policy, evaluation, merges, export) loads with
``weights_only=True``: state.json and model.safetensors alone, never the optimizer state (as large as the
weights twice over) nor the other parts. On the CPU the model tensors are memory-mapped (safetensors maps the
file; a page is read when first touched), so a rank that copies out only its shard of a sharded parameter
reads only that shard (:func:`amalab.training.state.load_trainable_state`). A resume maps optimizer.pt the same
way, and a rank copies out only its part of a sharded parameter's moments
(:func:`amalab.training.state.load_optimizer_state`).
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from amalab.atomic_write import atomic_folder, remove_leftovers, write_text_atomic
from amalab.errors import ConfigError
from amalab.training.distributed import World, decide_on_rank0, on_every_rank
from amalab.training.tensor_identity import tied_aliases

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
STATE_FILE = "state.json"  # written last: a folder without it was never completed
#: 2: optimizer state keyed by parameter name (torch.distributed.checkpoint), safetensors only
FORMAT_VERSION = 2
_STEP_NAME = re.compile(r"^step-(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass
class Checkpoint:
    """A loaded checkpoint; the parts that were not saved are None."""

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict | None = None
    scheduler_state: dict | None = None
    mixer_state: dict[str, np.ndarray] | None = None
    sampler_state: dict | None = None
    rng_states: dict | None = None
    #: loaded with ``weights_only``: the model state alone, which cannot resume a run
    weights_only: bool = False

    def state_dict(self) -> dict:
        """The parts under the names :meth:`~amalab.training.state.TrainState.load_state_dict` reads."""
        if self.weights_only:
            raise ValueError(f"{self.path}: loaded with weights_only, which cannot resume a run: load it all")
        return {"step": self.step, "model_state": self.model_state, "optimizer_state": self.optimizer_state,
                "scheduler_state": self.scheduler_state, "mixer_state": self.mixer_state,
                "sampler_state": self.sampler_state, "rng_states": self.rng_states}


# --- RNG states --------------------------------------------------------------------------------------

def plain_state(value):
    """numpy arrays and scalars inside a bit generator state, as JSON-ready lists and numbers."""
    if isinstance(value, dict):
        return {k: plain_state(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    return value


def unplain_state(value):
    if isinstance(value, dict):
        if set(value) == {"ndarray", "dtype"}:
            return np.array(value["ndarray"], dtype=value["dtype"])
        return {k: unplain_state(v) for k, v in value.items()}
    return value


def capture_rng_states(generators: dict[str, np.random.Generator] | None = None) -> dict:
    """Every RNG state as plain JSON data: Python ``random``, numpy's legacy global RNG, torch's CPU
    generator, every CUDA device's generator (when CUDA is available) and the given numpy Generators."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "python": [version, list(internal), gauss_next],
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state().tolist(),
        "generators": {key: plain_state(g.bit_generator.state) for key, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        states["torch_cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return states


def restore_rng_states(states: dict, generators: dict[str, np.random.Generator] | None = None) -> None:
    """Put back the states of :func:`capture_rng_states`; each given Generator gets its saved state.

    CUDA states are restored on as many devices as both the saved run and this machine have (a run
    saved on GPUs resumed on a CPU has no CUDA generator to restore, and needs none).
    """
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    legacy = states["numpy"]
    np.random.set_state((legacy["name"], np.array(legacy["keys"], dtype=np.uint32), legacy["pos"],
                         legacy["has_gauss"], legacy["cached_gaussian"]))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if torch.cuda.is_available() and states.get("torch_cuda"):
        for device, state in enumerate(states["torch_cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.tensor(state, dtype=torch.uint8), device)
    saved = states.get("generators", {})
    for key, generator in (generators or {}).items():
        if key not in saved:
            raise ValueError(f"no saved RNG state for generator {key!r}; saved: {sorted(saved) or 'none'}")
        generator.bit_generator.state = unplain_state(saved[key])


# --- writing -----------------------------------------------------------------------------------------

def _json_default(value):
    # numpy scalars and arrays in states are written as plain numbers and lists
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _to_json(data, what: str) -> str:
    try:
        return json.dumps(data, default=_json_default)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint {what} must be JSON-serializable: {e}") from None


def _separate_tensors(model_state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU tensors that share no memory (what safetensors requires), and the tied names left out.

    A tied weight (an LM head that is the embedding matrix) is stored once under its first name and restored
    as one tensor on load (:func:`~amalab.training.tensor_identity.tied_aliases`). Any other overlap, and
    non-contiguous tensors, are copied.
    """
    for name, tensor in model_state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"model_state[{name!r}] is a {type(tensor).__name__}, not a tensor")
    aliases = tied_aliases(model_state)
    tensors: dict[str, torch.Tensor] = {}
    storages: set[tuple] = set()
    for name, tensor in model_state.items():
        if name in aliases:
            continue
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        if tensor.numel() and (storage in storages or not tensor.is_contiguous()):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        storages.add(storage)
        tensors[name] = tensor.cpu()
    return tensors, aliases


def _list_step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_NAME.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run, as (step, folder), oldest first."""
    return [(s, p) for s, p in _list_step_dirs(Path(run_dir) / CHECKPOINT_DIR) if (p / STATE_FILE).is_file()]


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict | None = None, scheduler_state: dict | None = None,
                    mixer_state: dict[str, np.ndarray] | None = None, sampler_state: dict | None = None,
                    rng_states: dict | None = None, keep_last: int | None = 3) -> Path:
    """Write checkpoint ``step`` of the run atomically, point ``latest`` at it and prune old ones.

    The arguments are the parts of :meth:`amalab.training.state.TrainState.state_dict`:
    ``optimizer_state`` / ``scheduler_state`` their ``state_dict()``s, ``mixer_state`` the mixer's
    ``state_dict()`` (numpy arrays), ``sampler_state`` plain JSON data, ``rng_states`` from
    :func:`capture_rng_states`. ``keep_last``: how many checkpoints to keep (None keeps all); checkpoints of
    later steps than this one belong to an abandoned continuation (the run was resumed from an earlier step)
    and are removed. Returns the checkpoint's folder.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"checkpoint step must be an integer >= 0, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)
                                  or keep_last < 1):
        raise ValueError(f"keep_last must be an integer >= 1 or None, got {keep_last!r}")
    step = int(step)
    tensors, aliases = _separate_tensors(model_state)
    # serialize the JSON parts first, so that a value JSON cannot hold fails before anything is written
    json_parts = {name: _to_json(value, what) for name, value, what in (
        ("sampler.json", sampler_state, "sampler_state"), ("rng.json", rng_states, "rng_states"))
        if value is not None}
    torch_parts = {name: value for name, value in (("optimizer.pt", optimizer_state),
                                                   ("scheduler.pt", scheduler_state)) if value is not None}
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root)
    final = root / step_dir_name(step)
    with atomic_folder(final) as folder:
        save_file(tensors, str(folder / "model.safetensors"))
        for name, value in torch_parts.items():
            with (folder / name).open("wb") as f:
                torch.save(value, f)
        if mixer_state is not None:
            np.savez(folder / "mixer.npz", **{key: np.asarray(value) for key, value in mixer_state.items()})
        for name, text in json_parts.items():
            (folder / name).write_text(text, encoding="utf-8")
        files = [*torch_parts, *(["mixer.npz"] if mixer_state is not None else []), *json_parts]
        state = {"format": FORMAT_VERSION, "step": step, "model_aliases": aliases, "model_keys": list(model_state),
                 "files": files}
        (folder / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
    _point_latest(root, final.name)
    remove_leftovers(root)
    _prune(root, step, keep_last)
    return final


def _point_latest(root: Path, name: str) -> None:
    write_text_atomic(root / LATEST, name + "\n")


def _prune(root: Path, current: int, keep_last: int | None) -> None:
    older = []
    for step, path in _list_step_dirs(root):
        if step > current:
            shutil.rmtree(path, ignore_errors=True)
        elif step < current:
            older.append(path)
    if keep_last is not None:
        for path in older[:max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(path, ignore_errors=True)


# --- reading -----------------------------------------------------------------------------------------

def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *,
                    weights_only: bool = False) -> Checkpoint:
    """Read one checkpoint folder; tensors go to ``map_location`` (the CPU by default, memory-mapped there).

    ``weights_only``: read state.json and the model's tensors alone; the optimizer, scheduler, mixer, sampler
    and RNG files are never opened (those parts are None) and the checkpoint cannot resume a run. A part
    state.json lists that is missing or unreadable is a ConfigError naming it.
    """
    path = Path(path)
    state = _read_state(path)
    model_state = _model_state(path, state, map_location)
    if weights_only:
        return Checkpoint(path=path, step=state["step"], model_state=model_state, weights_only=True)
    files = set(state["files"])

    def part(name, read):
        return _read_part(path, name, read) if name in files else None

    def torch_file(file):
        # torch's weights_only (unrelated to ours): loading a checkpoint must never run code stored in it.
        # Memory-mapped: a rank that copies out only its part of a sharded parameter's moments reads only that
        return torch.load(file, map_location=map_location, weights_only=True, mmap=True)

    # keyword arguments are read in order: the optimizer first, the part a resume cannot do without
    return Checkpoint(path=path, step=state["step"], model_state=model_state,
                      optimizer_state=part("optimizer.pt", torch_file),
                      scheduler_state=part("scheduler.pt", torch_file),
                      mixer_state=part("mixer.npz", _read_npz), sampler_state=part("sampler.json", _read_json),
                      rng_states=part("rng.json", _read_json))


def _read_state(path: Path) -> dict:
    """The checkpoint's state.json (FileNotFoundError: not a complete checkpoint)."""
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    state = json.loads(state_path.read_text(encoding="utf-8"))
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{state_path}: checkpoint format {state.get('format')!r}, "
                         f"this code reads {FORMAT_VERSION}")
    return state


def _model_state(path: Path, state: dict, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    """The model's tensors under every saved name. On the CPU safetensors memory-maps the file: nothing is
    read until a tensor's pages are touched, and a slice reads only its own."""
    tensors = load_file(str(path / "model.safetensors"), device=str(map_location))
    for alias, target in state["model_aliases"].items():
        tensors[alias] = tensors[target]  # tied weights come back as one tensor, as they were saved
    return {key: tensors[key] for key in state["model_keys"]}


_NO_RESUME = "the checkpoint cannot resume a run (its weights still load, for evaluation or export)"


def _read_part(path: Path, name: str, read: Callable[[Path], Any]) -> Any:
    """``read(file)`` of part ``name``, which state.json lists; ConfigError if it is missing or unreadable."""
    file = path / name
    if not file.is_file():
        raise ConfigError(f"{path}: {name} is missing (state.json lists it): {_NO_RESUME}")
    try:
        return read(file)
    except (ValueError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        # not the error's text: torch's suggests loading without weights_only, which may run code in the file
        raise ConfigError(f"{file}: unreadable ({type(e).__name__}): {_NO_RESUME}") from None


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    with np.load(file, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _read_json(file: Path):
    return json.loads(file.read_text(encoding="utf-8"))


def latest_checkpoint_path(run_dir: str | Path) -> Path | None:
    """The folder ``latest`` points at; without a usable pointer, the complete checkpoint of the highest
    step."""
    root = Path(run_dir) / CHECKPOINT_DIR
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if _STEP_NAME.match(name) and (root / name / STATE_FILE).is_file():
            return root / name
    complete = list_checkpoints(run_dir)
    return complete[-1][1] if complete else None


def load_latest(run_dir: str | Path, map_location: str | torch.device = "cpu", *,
                world: World = World(), weights_only: bool = False) -> Checkpoint | None:
    """The newest complete checkpoint of the run, or None if it has none yet; ``weights_only``: its model
    state alone (:func:`load_checkpoint`), for what evaluates or exports a run, never resumes it.

    Under several ranks, the newest as rank 0 sees it: rank 0 names it and every rank loads that one, so
    that all continue from the same step; a rank that cannot makes every rank raise its error
    (docs/distributed.md).
    """
    # the name, not the path: each rank reads its own run_dir (a shared folder may be mounted elsewhere)
    name = decide_on_rank0(world, lambda: _name_or_none(latest_checkpoint_path(run_dir)))
    if name is None:
        return None
    path = Path(run_dir) / CHECKPOINT_DIR / name
    return on_every_rank(world, lambda: _load_named(path, map_location, world, weights_only))


def _name_or_none(path: Path | None) -> str | None:
    return None if path is None else path.name


def _load_named(path: Path, map_location: str | torch.device, world: World, weights_only: bool) -> Checkpoint:
    """Checkpoint ``path``, which rank 0 named; a rank other than 0 that lacks it says why that matters."""
    try:
        return load_checkpoint(path, map_location, weights_only=weights_only)
    except FileNotFoundError as e:
        if world.is_main:
            raise
        raise ConfigError(f"rank {world.rank} does not see the checkpoint rank 0 continues from ({e}): every "
                          "rank must see the run folder rank 0 writes (put `out` on a filesystem they share)"
                          ) from None


__all__ = [
    "Checkpoint", "capture_rng_states", "latest_checkpoint_path", "list_checkpoints", "load_checkpoint",
    "load_latest", "restore_rng_states", "save_checkpoint", "step_dir_name",
]
