"""The training step is policy-agnostic: a toy bigram policy over toy sequences trains through the very step the
LLM runs use.

Reference: the same step written out by hand, with torch autograd, the mixer's own one-batch ``step``
(which orders update and coefficients itself, so sequential AMA-R is checked too) and a plain AdamW.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from amalab.training.cache import ValueCache
from amalab.training.config import OptimConfig
from amalab.training.sampler import TaskSampler
from amalab.training.state import TrainState
from amalab.training.step import ExampleLosses, train_step
from amalab.mixers import make_mixer

VOCAB, SEED, BETA = 6, 11, 0.5
MIXER_OPTIONS = {"ama-s": {"gamma": 0.5}, "ama-r": {"eta_alpha": 5.0}, "ama-r-sim": {"eta_alpha": 5.0},
                 "standard": {}}


class BigramPolicy(torch.nn.Module):
    """log pi(y) = sum_t log softmax(table[y_{t-1}])[y_t]: a policy with sequence log-probs, no transformer."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed)))

    def sequence_logp(self, sequence: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.table, dim=-1)[sequence[:-1], sequence[1:]].sum()


@dataclass
class ToyExample:
    id: str
    chosen: torch.Tensor
    rejected: torch.Tensor


@dataclass
class ToyBatch:
    ids: list[str]
    chosen: list[torch.Tensor]
    rejected: list[torch.Tensor]


def toy_logps(policy: BigramPolicy, batch: ToyBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.stack([policy.sequence_logp(s) for s in batch.chosen]),
            torch.stack([policy.sequence_logp(s) for s in batch.rejected]))


def toy_losses(logps, batch) -> torch.Tensor:
    chosen, rejected = logps  # DPO against a uniform reference (its log-ratios cancel)
    return -torch.nn.functional.logsigmoid(BETA * (chosen - rejected))


TOY = ExampleLosses(collate=lambda examples: ToyBatch([e.id for e in examples], [e.chosen for e in examples],
                                                      [e.rejected for e in examples]),
                    sequence_logps=toy_logps, losses=toy_losses,
                    tokens=lambda batch: (float(sum(len(s) for s in batch.chosen + batch.rejected)), 0.0))


def toy_tasks() -> list[list[ToyExample]]:
    generator = torch.Generator().manual_seed(5)
    return [[ToyExample(f"t{t}-{i}", torch.randint(0, VOCAB, (3 + i % 3,), generator=generator),
                        torch.randint(0, VOCAB, (4 + i % 2,), generator=generator)) for i in range(n)]
            for t, n in enumerate((7, 5))]


def toy_baselines(tasks) -> list[ValueCache]:
    policy = BigramPolicy(seed=1)  # some other policy's losses: excesses of both signs
    caches = []
    for examples in tasks:
        with torch.no_grad():
            losses = toy_losses(toy_logps(policy, TOY.collate(examples)), None)
        caches.append(ValueCache([e.id for e in examples], {"loss": losses.double().numpy()}))
    return caches


def fresh_state(mixer_name: str, tasks, optim: OptimConfig) -> TrainState:
    mixer = make_mixer(mixer_name, 2, sizes=[len(t) for t in tasks], **MIXER_OPTIONS[mixer_name])
    return TrainState.fresh(BigramPolicy(), optim, mixer, [len(t) for t in tasks], SEED)


def by_hand(mixer_name: str, tasks, baselines, optim: OptimConfig):
    """One step written out: the draws, the mixer's one-batch step, autograd and AdamW."""
    policy = BigramPolicy()
    mixer = make_mixer(mixer_name, 2, sizes=[len(t) for t in tasks], **MIXER_OPTIONS[mixer_name])
    task_ids = mixer.draw(np.random.default_rng([SEED, 0x5eed]), optim.batch_size)
    examples = [tasks[t][i] for t, i in TaskSampler([len(t) for t in tasks], SEED).take(task_ids)]
    losses = toy_losses(toy_logps(policy, TOY.collate(examples)), None)
    baseline = None
    if mixer.baseline != "none":
        baseline = np.array([baselines[t].get("loss", [e.id])[0] for t, e in zip(task_ids, examples)])
    coefficients = mixer.step(task_ids, losses.detach().double().numpy(), baseline)
    (torch.from_numpy(coefficients).float() * losses).sum().backward()
    gradient = policy.table.grad.clone()
    torch.optim.AdamW(policy.parameters(), lr=optim.learning_rate, weight_decay=0.0).step()
    return policy, mixer, gradient


@pytest.mark.parametrize("mixer_name", ["ama-s", "ama-r", "ama-r-sim", "standard"])
def test_a_toy_policy_trains_through_the_step(mixer_name):
    tasks = toy_tasks()
    baselines = toy_baselines(tasks)
    optim = OptimConfig(max_steps=3, batch_size=6, learning_rate=0.05, warmup_steps=0, max_grad_norm=0.0)
    state = fresh_state(mixer_name, tasks, optim)
    gradients = []  # Adam's first step hides the gradient's scale: compare the gradient itself too
    state.optimizer.register_step_pre_hook(lambda *args: gradients.append(state.policy.table.grad.clone()))
    result = train_step(state, tasks, TOY, baselines if state.mixer.baseline != "none" else None, optim)
    policy, mixer, gradient = by_hand(mixer_name, tasks, baselines, optim)
    assert result.diverged is None and state.step == 1 == result.metrics["step"]
    assert gradient.abs().max() > 1e-3
    torch.testing.assert_close(gradients[0], gradient, rtol=1e-6, atol=1e-8)
    assert not torch.equal(state.policy.table, BigramPolicy().table)  # it moved
    torch.testing.assert_close(state.policy.table, policy.table, rtol=1e-6, atol=1e-7)
    for key, value in mixer.state_dict().items():
        np.testing.assert_allclose(state.mixer.state_dict()[key], value, rtol=1e-12, atol=1e-15, err_msg=key)
    assert result.metrics["tokens"] > 0 and result.metrics["mixer_seconds"] > 0


def test_micro_batches_of_a_toy_policy_equal_one_batch():
    tasks = toy_tasks()
    baselines = toy_baselines(tasks)
    tables = []
    for micro in (0, 2):
        optim = OptimConfig(max_steps=3, batch_size=6, learning_rate=0.05, micro_batch_size=micro)
        state = fresh_state("ama-s", tasks, optim)
        for _ in range(2):
            train_step(state, tasks, TOY, baselines, optim)
        tables.append(state.policy.table.detach())
    torch.testing.assert_close(tables[0], tables[1], rtol=1e-5, atol=1e-6)


def test_a_non_finite_loss_is_a_signal_and_changes_nothing():
    tasks = toy_tasks()
    baselines = toy_baselines(tasks)
    broken = [ValueCache(c.ids, {"loss": np.full(len(c.ids), np.nan)}) for c in baselines]
    optim = OptimConfig(max_steps=3, batch_size=6, learning_rate=0.05)
    state = fresh_state("ama-s", tasks, optim)
    before_policy, before_mixer = state.policy.table.detach().clone(), state.mixer.state_dict()
    result = train_step(state, tasks, TOY, broken, optim)
    assert result.diverged is not None and "non-finite" in result.diverged and result.metrics == {}
    assert state.step == 0 and torch.equal(state.policy.table, before_policy)
    for key, value in before_mixer.items():
        np.testing.assert_array_equal(state.mixer.state_dict()[key], value)


@pytest.mark.parametrize("mixer_name", ["ama-s", "ama-r"])
def test_a_train_state_round_trip_continues_bitwise(mixer_name):
    tasks = toy_tasks()
    baselines = toy_baselines(tasks)
    optim = OptimConfig(max_steps=4, batch_size=6, learning_rate=0.05, warmup_steps=2)
    straight = fresh_state(mixer_name, tasks, optim)
    for _ in range(2):
        train_step(straight, tasks, TOY, baselines, optim)
    saved = copy.deepcopy(straight.state_dict())
    train_step(straight, tasks, TOY, baselines, optim)
    resumed = fresh_state(mixer_name, tasks, optim)
    resumed.load_state_dict(saved)
    assert resumed.step == 2
    train_step(resumed, tasks, TOY, baselines, optim)
    assert torch.equal(resumed.policy.table, straight.policy.table)
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()
    for key, value in straight.mixer.state_dict().items():
        np.testing.assert_array_equal(resumed.mixer.state_dict()[key], value)
