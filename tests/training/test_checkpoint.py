"""Tests of amalab.training.checkpoint: exact round trips, atomic saves when interrupted, RNG restore, pruning."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from amalab.errors import ConfigError
from amalab.training import checkpoint as ckpt
from amalab.training.checkpoint import (
    capture_rng_states, list_checkpoints, load_checkpoint, load_latest, restore_rng_states, save_checkpoint,
)
from amalab.training.sampler import TaskSampler


class TinyLM(torch.nn.Module):
    """An embedding tied to the output layer, as in SmolLM2, plus a bf16 buffer and an integer buffer."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 4)
        self.hidden = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 11, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.randn(3, dtype=torch.bfloat16))
        self.register_buffer("counts", torch.arange(5, dtype=torch.int64))

    def forward(self, ids):
        return self.head(torch.tanh(self.hidden(self.embed(ids))))


def train_a_little(model, optimizer, scheduler, steps=3):
    for _ in range(steps):
        loss = model(torch.randint(0, 11, (2, 5))).logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def make_training(seed=0):
    torch.manual_seed(seed)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    return model, optimizer, scheduler


def assert_same(a, b, where="state"):
    """Bitwise equality of nested state dicts (tensors, arrays, numbers, lists)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        # compare the bytes, so that NaNs and signed zeros count too
        assert a.contiguous().view(-1).view(torch.uint8).tolist() == \
            b.contiguous().view(-1).view(torch.uint8).tolist(), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def save_example(run_dir, step, model, optimizer, scheduler, **kwargs):
    mixer_state = {"exp3.log_weights": np.array([0.1, -2.0, 3.5]), "t": np.array(step, dtype=np.int64)}
    return save_checkpoint(run_dir, step, model.state_dict(), optimizer.state_dict(), scheduler.state_dict(),
                           mixer_state=mixer_state, sampler_state={"positions": [step, 1]},
                           rng_states=capture_rng_states(),
                           **kwargs)


def test_round_trip_is_bitwise_exact(tmp_path):
    model, optimizer, scheduler = make_training()
    train_a_little(model, optimizer, scheduler)
    folder = save_example(tmp_path, 7, model, optimizer, scheduler)
    assert folder == tmp_path / "checkpoints" / "step-000007"
    loaded = load_latest(tmp_path)
    assert loaded.step == 7 and loaded.path == folder
    assert_same(loaded.model_state, model.state_dict())
    assert_same(loaded.optimizer_state, optimizer.state_dict())
    assert_same(loaded.scheduler_state, scheduler.state_dict())
    assert_same(loaded.mixer_state, {"exp3.log_weights": np.array([0.1, -2.0, 3.5]), "t": np.array(7)})
    assert loaded.sampler_state == {"positions": [7, 1]}
    # tied weights are stored once and come back as one tensor
    assert loaded.model_state["head.weight"] is loaded.model_state["embed.weight"]
    assert (folder / "model.safetensors").is_file()


def test_a_weights_only_load_is_the_model_state_alone(tmp_path):
    """The same checkpoint format read for its weights alone: the full load's model state, tied weights one
    tensor, no other part, and optimizer.pt never opened (deleted here: the full load names it)."""
    model, optimizer, scheduler = make_training()
    train_a_little(model, optimizer, scheduler)
    folder = save_example(tmp_path, 7, model, optimizer, scheduler)
    (folder / "optimizer.pt").unlink()
    loaded = load_latest(tmp_path, weights_only=True)
    assert loaded.step == 7 and loaded.path == folder and loaded.weights_only
    assert_same(loaded.model_state, model.state_dict())
    assert loaded.model_state["head.weight"] is loaded.model_state["embed.weight"]
    assert (loaded.optimizer_state, loaded.scheduler_state, loaded.mixer_state, loaded.sampler_state,
            loaded.rng_states) == (None,) * 5
    with pytest.raises(ConfigError, match="optimizer.pt is missing .*cannot resume a run"):
        load_latest(tmp_path)


def test_resumed_training_continues_exactly(tmp_path):
    """Train 6 steps in one go, or 3 + save + load into fresh objects + 3: the same parameters, bitwise."""
    model, optimizer, scheduler = make_training()
    torch.manual_seed(1)
    train_a_little(model, optimizer, scheduler, steps=6)
    expected = model.state_dict()

    model, optimizer, scheduler = make_training()
    torch.manual_seed(1)
    train_a_little(model, optimizer, scheduler, steps=3)
    save_checkpoint(tmp_path, 3, model.state_dict(), optimizer.state_dict(), scheduler.state_dict(),
                    rng_states=capture_rng_states())
    torch.manual_seed(12345)  # anything the process does after saving must not matter
    model, optimizer, scheduler = make_training(seed=99)
    loaded = load_latest(tmp_path)
    model.load_state_dict(loaded.model_state)
    optimizer.load_state_dict(loaded.optimizer_state)
    scheduler.load_state_dict(loaded.scheduler_state)
    restore_rng_states(loaded.rng_states)
    train_a_little(model, optimizer, scheduler, steps=3)
    assert_same(model.state_dict(), expected)


def test_rng_restore_reproduces_the_same_draws():
    generators = {"mixer": np.random.default_rng(3), "mt": np.random.Generator(np.random.MT19937(4))}
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.randn(2)  # noqa: B018 (move every generator along)
    generators["mixer"].random(), generators["mt"].random()
    states = json.loads(json.dumps(capture_rng_states(generators)))  # plain JSON data

    def draws():
        return (random.random(), random.gauss(0, 1), np.random.normal(size=3).tolist(),
                torch.randn(4).tolist(), generators["mixer"].integers(0, 1000, 5).tolist(),
                generators["mt"].normal(size=2).tolist())

    first = draws()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    generators["mixer"] = np.random.default_rng(100)
    generators["mt"] = np.random.Generator(np.random.MT19937(100))
    assert draws() != first
    restore_rng_states(states, generators)
    assert draws() == first
    with pytest.raises(ValueError, match="no saved RNG state for generator 'other'"):
        restore_rng_states(states, {"other": np.random.default_rng()})


@pytest.mark.parametrize("killed", [False, True], ids=["exception", "hard-kill"])
def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, killed):
    """A save that fails half-way through a file: with an exception (the cleanup runs) or a hard kill
    (simulated by disabling the cleanup), the previous checkpoint stays the one loaded, and no
    half-written folder is ever visible under a step name."""
    model, optimizer, scheduler = make_training()
    save_example(tmp_path, 10, model, optimizer, scheduler)
    before = load_latest(tmp_path)
    train_a_little(model, optimizer, scheduler)

    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # a half-written file, then the "crash"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    if killed:
        monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *args, **kwargs: None)
    with pytest.raises(OSError, match="disk full"):
        save_example(tmp_path, 20, model, optimizer, scheduler)
    monkeypatch.undo()

    root = tmp_path / "checkpoints"
    visible = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    assert visible == ["latest", "step-000010"]
    hidden = [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert len(hidden) == (1 if killed else 0)  # a killed save leaves its temporary folder behind
    assert (root / "latest").read_text() == "step-000010\n"
    after = load_latest(tmp_path)
    assert after.step == 10
    assert_same(after.model_state, before.model_state)
    assert_same(after.optimizer_state, before.optimizer_state)
    save_example(tmp_path, 20, model, optimizer, scheduler)  # the next save cleans up
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000010", "step-000020"]


def test_killed_save_leftovers_are_never_loaded_and_are_cleaned_up(tmp_path):
    """A hard kill leaves a temporary folder (no cleanup runs); neither it nor a step folder that lacks
    state.json is ever taken for a checkpoint, and the next save removes the leftovers."""
    model, optimizer, scheduler = make_training()
    save_example(tmp_path, 10, model, optimizer, scheduler)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-000020-abc").mkdir()
    (root / ".tmp-step-000020-abc" / "model.safetensors").write_bytes(b"\0" * 10)
    (root / "step-000030").mkdir()  # incomplete: no state.json
    (root / "latest").unlink()      # even without the pointer
    assert load_latest(tmp_path).step == 10
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10]
    save_example(tmp_path, 20, model, optimizer, scheduler)
    assert not (root / ".tmp-step-000020-abc").exists()
    assert load_latest(tmp_path).step == 20


def test_crash_before_the_pointer_moves_loads_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = make_training()
    save_example(tmp_path, 10, model, optimizer, scheduler)

    def fail(*args):
        raise OSError("killed")

    monkeypatch.setattr(ckpt, "_point_latest", fail)
    with pytest.raises(OSError):
        save_example(tmp_path, 20, model, optimizer, scheduler)
    assert load_latest(tmp_path).step == 10  # the pointer still names the old, complete checkpoint


def test_keep_last_n_and_abandoned_continuations(tmp_path):
    model, optimizer, scheduler = make_training()
    for step in (10, 20, 30, 40, 50):
        save_example(tmp_path, step, model, optimizer, scheduler, keep_last=3)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40, 50]
    # resumed from step 30 and saved step 35: 40 and 50 belong to the abandoned continuation
    save_example(tmp_path, 35, model, optimizer, scheduler, keep_last=3)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 35]
    # saving the same step again replaces it
    save_example(tmp_path, 35, model, optimizer, scheduler, keep_last=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [35]
    assert load_latest(tmp_path).step == 35
    for step in (40, 50):
        save_example(tmp_path, step, model, optimizer, scheduler, keep_last=None)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [35, 40, 50]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")) == []


def test_no_checkpoint_and_bad_arguments(tmp_path):
    assert load_latest(tmp_path) is None
    model, _, _ = make_training()
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        save_checkpoint(tmp_path, -1, model.state_dict())
    with pytest.raises(ValueError, match="keep_last must be an integer >= 1"):
        save_checkpoint(tmp_path, 1, model.state_dict(), keep_last=0)
    with pytest.raises(TypeError, match=r"model_state\['x'\] is a list"):
        save_checkpoint(tmp_path, 1, {"x": [1.0]})
    with pytest.raises(TypeError, match="checkpoint sampler_state must be JSON-serializable: object is not"):
        save_checkpoint(tmp_path, 1, model.state_dict(), sampler_state={"x": object()})
    assert not (tmp_path / "checkpoints" / "step-000001").exists()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path)


def test_only_model_state_and_views_that_share_memory(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    state = {"whole": base, "first_half": base[:6], "strided": base.view(3, 4).t()}
    save_checkpoint(tmp_path, 0, state)
    loaded = load_latest(tmp_path)
    assert_same(loaded.model_state, state)
    assert loaded.optimizer_state is None and loaded.mixer_state is None and loaded.rng_states is None


def test_tied_weights_are_stored_once_through_the_train_state(tmp_path):
    """The policy's state as the trainer takes it (torch.distributed.checkpoint, copied to the CPU) keeps
    the tie: safetensors holds the tensor once, and it loads back as one tensor into both names."""
    from safetensors import safe_open

    from amalab.training.state import load_trainable_state, trainable_state

    model, _, _ = make_training()
    state = trainable_state(model)
    assert state["head.weight"] is state["embed.weight"]
    folder = save_checkpoint(tmp_path, 1, state)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["embed.weight", "hidden.bias", "hidden.weight"]
    loaded = load_latest(tmp_path).model_state
    assert loaded["head.weight"] is loaded["embed.weight"]
    fresh, _, _ = make_training(seed=5)
    load_trainable_state(fresh, loaded)
    assert_same(dict(fresh.named_parameters()), dict(model.named_parameters()))
    assert fresh.head.weight is fresh.embed.weight


def test_sampler_state_round_trip(tmp_path):
    sampler = TaskSampler([5, 3], seed=2)
    sampler.take([0, 1, 1, 0, 0])
    model, _, _ = make_training()
    save_checkpoint(tmp_path, 5, model.state_dict(), sampler_state=sampler.state_dict())
    resumed = TaskSampler([5, 3], seed=2)
    resumed.load_state_dict(load_latest(tmp_path).sampler_state)
    assert resumed.take([0, 1] * 6) == sampler.take([0, 1] * 6)
