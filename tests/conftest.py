"""Fixtures shared by several test folders. A test module never imports another test module (pytest runs
with ``--import-mode=importlib``): what several modules share lives here, as fixtures that return the value or
the helper (a function, a class).

* The offline data folder of real datasets (HH-RLHF, TruthfulQA): read in place, never copied into the
  repository, from ``$AMALAB_SHARED_DATA`` when set, else from ``../shared/data`` beside the repository
  checkout. A test that needs them skips cleanly without them.
* The tiny offline LLM (tests/llm, tests/training, tests/objectives): ``tokenizer``, ``preference_pairs``,
  ``tokenized_pairs``, ``make_model`` (a factory of seeded tiny Llamas) and ``peaked_llama(tokenizer)`` (a
  tiny Llama whose greedy choices are clear-cut, for generation).
* ``experiment``: writes the tiny two-task LLM experiment (the test-sized twin of experiments/llm_tiny) into
  a folder and returns its config path: ``experiment(tmp_path, names='["standard"]', **replace)``;
  ``experiment_tables`` holds tables to add to it (a generated task, the merges).
* ``setup`` (per module): a tiny Llama (pi_ref), two small tokenized tasks, their reference log-probs and a
  "specialist" cache; ``make_run(setup, tmp_path, mixer_name, name, **optim)`` builds a ``TrainingRun`` on
  it, ``train(setup, run)`` trains a fresh copy of the base model, ``recording_adamw`` is an AdamW that
  keeps every step's gradients; ``fresh_policy(setup)`` is a trainable copy of the base model;
  ``with one_thread(): ...`` runs a block with torch on one CPU thread.
* Several processes on one machine: ``free_port()`` (a free local TCP port for a process group's rendezvous)
  and ``fork_ranks(worker, *args, timeout_s=...)`` (forked ranks of a gloo process group, joined within a
  deadline).

torch and amalab.llm are imported inside the fixtures, so the folders that need neither (convex, mixers)
collect without the llm extra.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
#: the environment variable naming the offline data folder
SHARED_DATA_ENV = "AMALAB_SHARED_DATA"


def _locate_shared_data() -> Path:
    setting = os.environ.get(SHARED_DATA_ENV)
    return Path(setting) if setting else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def locate_shared_data():
    """The locator: () -> the data folder (``$AMALAB_SHARED_DATA``, else beside the checkout)."""
    return _locate_shared_data


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline data folder; skips the test when it is absent."""
    folder = _locate_shared_data()
    if not folder.is_dir():
        pytest.skip(f"shared data absent: no folder {folder} (set {SHARED_DATA_ENV})")
    return folder


@pytest.fixture(scope="session")
def hh_harmless_test(shared_data) -> Path:
    """The HH-RLHF harmless-base test split (``hh-rlhf/harmless-base-test.jsonl.gz``); skips when absent."""
    path = shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"shared HH-RLHF data absent: {path}")
    return path


@pytest.fixture(scope="session")
def truthfulqa_2025(shared_data) -> Path:
    """TruthfulQA's January 2025 release (``truthfulqa/TruthfulQA-2025-790.csv``); skips when absent."""
    path = shared_data / "truthfulqa" / "TruthfulQA-2025-790.csv"
    if not path.is_file():
        pytest.skip(f"shared TruthfulQA data absent: {path}")
    return path


# --- the tiny offline LLM --------------------------------------------------------------------------------

PAIRS = [
    # (prompt, chosen, rejected): different lengths, so padding and both masks are exercised
    ("Human: How do I bake bread? Assistant:", " Mix flour, water and yeast, then bake.", " No."),
    ("Human: What is the capital of France? Assistant:", " Paris.",
     " The capital of France is Lyon, I think."),
    ("Human: Tell me a joke. Assistant:", " Why did the chicken cross the road?", " I will not."),
]


@pytest.fixture(scope="session")
def tokenizer():
    from amalab.llm.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def preference_pairs():
    from amalab.llm.data.pairs import PreferencePair

    return [
        PreferencePair(id=f"ex{i}", task="helpful" if i % 2 == 0 else "harmless",
                       prompt=p, chosen=c, rejected=r)
        for i, (p, c, r) in enumerate(PAIRS)
    ]


@pytest.fixture(scope="session")
def tokenized_pairs(tokenizer, preference_pairs):
    from amalab.llm.tokenize import TokenizationConfig, tokenize_pairs

    pairs, report = tokenize_pairs(preference_pairs, tokenizer, TokenizationConfig(max_length=128))
    assert report.dropped == 0
    return pairs


@pytest.fixture
def make_model(tokenizer):
    """A factory of tiny Llamas over the tiny tokenizer's vocabulary (seeded: same seed, same weights)."""
    from amalab.llm.tiny import tiny_llama

    def make(seed: int = 0, **kwargs):
        return tiny_llama(len(tokenizer), seed=seed, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **kwargs)

    return make


def _peaked_llama(tokenizer):
    """A tiny random Llama (seed 3) with larger weights (every matrix redrawn from a seeded normal, scale
    0.3), in eval mode: sharper next-token distributions, so argmax is decided by clear margins and the
    numerical noise of padding or batching cannot flip a greedy generation."""
    import torch

    from amalab.llm.tiny import tiny_llama

    model = tiny_llama(len(tokenizer), seed=3, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


@pytest.fixture(scope="session")
def peaked_llama():
    """``peaked_llama(tokenizer) -> model``: a tiny Llama with clear argmax margins
    (:func:`_peaked_llama`)."""
    return _peaked_llama


@pytest.fixture(scope="session")
def dpo_losses_by_hand():
    """``dpo_losses(policy, reference, pairs, pad_token_id, beta)``: -log sigmoid(beta ((pi_w - ref_w) -
    (pi_l - ref_l))) of each pair, one pair at a time through the full logits (docs/maths.md (1))."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from amalab.llm.collate import collate_pairs
    from amalab.llm.logprobs import full_logits_sequence_logps

    @torch.no_grad()
    def dpo_losses(policy, reference, pairs, pad_token_id: int, beta: float):
        losses = []
        for pair in pairs:
            batch = collate_pairs([pair], pad_token_id)
            pi, ref = full_logits_sequence_logps(policy.eval(), batch), full_logits_sequence_logps(reference, batch)
            margin = beta * ((pi.chosen - ref.chosen) - (pi.rejected - ref.rejected))
            losses.append(float(-F.logsigmoid(margin)[0]))
        return np.array(losses)

    return dpo_losses


# --- the tiny LLM experiment, as a user writes it ---------------------------------------------------------

EXPERIMENT_CONFIG = """
out = "{out}"
seed = 0
device = "cpu"

[model]
name = "tiny"
tiny = {{ hidden_size = 16, intermediate_size = 32, num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1, vocab_size = 300, seed = 0 }}

[tokenize]
max_length = 40
max_prompt_length = 24

[loss]
loss_type = "dpo"
beta = 0.1

[[tasks]]
name = "alpha"
source = "alpha.jsonl"
held_out = 4

[[tasks]]
name = "beta"
source = "beta.jsonl"
held_out = 4

{extra_task}

[specialists.optim]
max_steps = 3
batch_size = 4
learning_rate = 1e-2

[train]
max_steps = 4
batch_size = {batch}
learning_rate = 1e-2
eval_steps = 2
save_steps = 2

[methods]
names = {names}
seeds = 1
seeds_per_method = {{ ama-s = 2 }}

[methods.options]
ama-r = {{ eta_alpha = 2.0 }}
ama-r-sim = {{ eta_alpha = 2.0 }}
doremi = {{ eta_alpha = 2.0 }}
ama-s = {{ gamma = 0.5 }}
odm = {{ gamma = 0.5 }}
{extra}
"""

ALL_METHODS = '["standard", "uniform", "doremi", "odm", "ama-r", "ama-r-sim", "ama-s"]'


def _write_task(path: Path, task: str, n: int) -> None:
    rows = [{"prompt": f"Human: {task} question {i}? Assistant:", "chosen": f" {task} good {i} yes",
             "rejected": f" {task} bad {i} no no"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_experiment(tmp_path: Path, names: str = ALL_METHODS, **replace) -> Path:
    """Tasks alpha (16 pairs) and beta (10) and the config; ``extra``, ``batch`` and ``extra_task`` fill the
    template's slots, every other keyword replaces its text by its value."""
    _write_task(tmp_path / "alpha.jsonl", "alpha", 16)
    _write_task(tmp_path / "beta.jsonl", "beta", 10)
    text = EXPERIMENT_CONFIG.format(out=tmp_path / "run", names=names, extra=replace.pop("extra", ""),
                                    batch=replace.pop("batch", "4"),
                                    extra_task=replace.pop("extra_task", ""))
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def experiment():
    """``experiment(tmp_path, names=ALL_METHODS, **replace) -> config path``: the tiny LLM experiment."""
    return _write_experiment


#: a third, generated task (verifiable: its generations are scored), for ``experiment(..., extra_task=)``
GENERATED_TASK = """
[[tasks]]
name = "sums"
source = "generated:arithmetic?n=14&hardness=1&noise=0.0&seed=0"
held_out = 4
"""
#: every merge and greedy generation, for ``experiment(..., extra=)``
MERGES = """
[merges]
names = ["linear", "task_arithmetic", "ties", "dare_ties"]
seeds = 2
options = { task_arithmetic = { scale = 0.5 }, ties = { density = 0.5 }, dare_ties = { drop = 0.3 } }

[generation]
max_new_tokens = 6
batch_size = 4
"""


@pytest.fixture(scope="session")
def experiment_tables():
    """Tables to add to the tiny experiment: ``generated_task`` (a generated third task) and ``merges``
    (every merge, with greedy generation)."""
    return SimpleNamespace(generated_task=GENERATED_TASK, merges=MERGES)


# --- one training run on a tiny Llama ----------------------------------------------------------------------

def _synthetic_tasks(n=(12, 8)):
    """Two small tasks of real-looking pairs (distinct texts, so distinct ids)."""
    from amalab.llm.data.pairs import PreferencePair

    tasks = []
    for t, count in enumerate(n):
        pairs = []
        for i in range(count):
            prompt = f"Human: question {i} of task {t}? Assistant:"
            pairs.append(PreferencePair(f"t{t}-{i}", f"task{t}", prompt, f" good answer {i} {'yes' * (i % 3)}",
                                        f" bad answer {i} {'no' * (i % 4)}"))
        tasks.append(pairs)
    return tasks


def _build_setup() -> dict:
    """A tiny Llama (pi_ref), two small tokenized tasks, their reference log-probs, a "specialist" cache."""
    import numpy as np
    import torch

    from amalab.llm.evaluate import pair_logps, pair_losses
    from amalab.llm.tiny import tiny_llama, tiny_tokenizer
    from amalab.llm.tokenize import TokenizationConfig, tokenize_pairs
    from amalab.objectives.preference import PreferenceLoss
    from amalab.training.cache import ValueCache

    tokenizer = tiny_tokenizer()
    base = tiny_llama(len(tokenizer), seed=3, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    tasks = _synthetic_tasks()
    tok = TokenizationConfig(max_length=48)
    sets = [tokenize_pairs(pairs, tokenizer, tok)[0] for pairs in tasks]
    train, evals = [s[:-3] for s in sets], [s[-3:] for s in sets]
    reference = pair_logps(base, [p for s in sets for p in s], tokenizer.pad_token_id, 8, torch.device("cpu"))
    # a "specialist": the base model's own losses shifted, so excess is nonzero for some pairs
    ids = [p.id for s in sets for p in s]
    losses, _ = pair_losses(reference, reference, ids, PreferenceLoss("dpo", 0.1))
    specialist = ValueCache(ids, {"loss": losses - 0.01 * np.arange(len(ids)) % 0.05})
    return dict(tokenizer=tokenizer, base=base, train=train, evals=evals, reference=reference,
                specialist=specialist)


def _make_run(setup, tmp_path, mixer_name="ama-s", name="run", **optim):
    from amalab.llm.train import TrainingRun
    from amalab.mixers import make_mixer
    from amalab.objectives.preference import PreferenceLoss
    from amalab.training.config import OptimConfig

    options = {"ama-s": {"gamma": 0.5}, "ama-r": {"eta_alpha": 5.0}, "ama-r-sim": {"eta_alpha": 5.0},
               "standard": {}, "odm": {"gamma": 0.5}}[mixer_name]
    sizes = [len(s) for s in setup["train"]]
    settings = dict(max_steps=4, batch_size=4, learning_rate=5e-3, warmup_steps=1, per_device_eval_batch_size=8,
                    max_grad_norm=1.0)
    settings.update(optim)
    mixer = make_mixer(mixer_name, 2, sizes=sizes, **options)
    baseline_losses = [setup["specialist"]] * 2 if mixer.baseline == "specialist" else None
    return TrainingRun(name=name, run_dir=tmp_path / name, mixer=mixer, task_names=["task0", "task1"],
                       train_sets=setup["train"], eval_sets=setup["evals"], reference=setup["reference"],
                       baseline_losses=baseline_losses, specialist_caches=[setup["specialist"]] * 2,
                       optim=OptimConfig(**settings),
                       loss=PreferenceLoss("dpo", 0.1), seed=7, pad_token_id=setup["tokenizer"].pad_token_id,
                       description={"mixer": mixer_name, "optim": settings})


def _fresh_policy(setup):
    """A deep copy of ``setup["base"]`` with every parameter trainable: each run starts from the same base
    model and never changes the module-scoped original."""
    import copy

    model = copy.deepcopy(setup["base"])
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _train(setup, run):
    """Train a fresh copy of the base model on the CPU; returns (model, final record)."""
    import torch

    from amalab.llm.train import run_training

    model = _fresh_policy(setup)
    final = run_training(model, run, torch.device("cpu"), show_progress=False)
    return model, final


@pytest.fixture(scope="module")
def setup():
    """The tiny training setup, built once per module (its keys: tokenizer, base, train, evals,
    reference, specialist)."""
    return _build_setup()


@pytest.fixture(scope="session")
def make_run():
    """``make_run(setup, tmp_path, mixer_name="ama-s", name="run", **optim) -> TrainingRun``."""
    return _make_run


@pytest.fixture(scope="session")
def fresh_policy():
    """``fresh_policy(setup) -> model``: a trainable deep copy of ``setup["base"]``. A forked rank gets it as
    an argument of its worker (the fork hands it over as it is)."""
    return _fresh_policy


@contextlib.contextmanager
def _one_thread():
    """torch on one CPU thread inside the block, its previous thread count given back after (an error
    included). The single-process side of a comparison with forked or torchrun ranks, which each use one
    thread, then does the same computations; and the tiny models gain nothing from more threads, which on a
    busy machine's cores make them many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def one_thread():
    """``with one_thread(): ...``: torch on one CPU thread in the block, then as before
    (:func:`_one_thread`)."""
    return _one_thread


@pytest.fixture(scope="session")
def train():
    """``train(setup, run) -> (model, final)``: a fresh copy of the base model trained on the CPU."""
    return _train


@pytest.fixture(scope="session")
def recording_adamw():
    """AdamW that keeps a copy of the gradients of every step it takes (the class attribute ``steps``)."""
    import torch

    class RecordingAdamW(torch.optim.AdamW):
        steps: list = []

        def step(self, closure=None):
            RecordingAdamW.steps.append([p.grad.detach().clone()
                                         for g in self.param_groups for p in g["params"]])
            return super().step(closure)

    return RecordingAdamW


# --- several processes on one machine -----------------------------------------------------------------------

def _free_port() -> int:
    """A TCP port of 127.0.0.1 free now (the OS picks it), for a process group's rendezvous: a fixed port
    would clash with another test run, or a lingering one, on the same machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fork_ranks(worker, *args, timeout_s: float, nprocs: int = 2, poll_s: float = 2,
                what: str = "the 2 processes") -> None:
    """Run ``worker(rank, port, *args)`` in ``nprocs`` forked processes (ranks 0, 1, ...; ``port`` a free
    local port for their rendezvous) and wait for all of them; a rank that raises fails the test with its
    traceback.

    Fork, not spawn: the children inherit the imported modules (spawn re-imports torch and transformers in
    each child, most of the time of these tests) and the arguments as they are, fixtures' values (functions,
    classes) included, unpickled. Each worker should use one thread (``torch.set_num_threads(1)``), which
    makes the fork after the parent's OpenMP use safe.

    The deadline turns a hang into a failure: a regression that leaves one rank waiting in a collective the
    other never joins fails the test after ``timeout_s`` seconds, its processes killed, instead of hanging
    CI. Set it above the process group's own timeout, so that the ranks normally fail first with their error.
    """
    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=(_free_port(), *args), nprocs=nprocs, join=False,
                                 start_method="fork")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=poll_s):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{what} did not end in {timeout_s} s (a rank left waiting in a collective?)")


def _in_gloo_group(rank: int, port: int, worker, nprocs: int, group_timeout_s: float, *args) -> None:
    """Rank ``rank``'s body under :func:`_fork_gloo_ranks`: one CPU thread, a gloo group of ``nprocs`` joined
    with a short timeout (a rank left waiting in a collective fails instead of hanging), ``worker(world,
    *args)``, the group left."""
    import datetime

    import torch
    import torch.distributed as dist

    from amalab.training.distributed import World

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=nprocs,
                            timeout=datetime.timedelta(seconds=group_timeout_s))
    worker(World(rank, nprocs), *args)
    dist.destroy_process_group()


def _fork_gloo_ranks(worker, *args, group_timeout_s: float, nprocs: int = 2, **fork) -> None:
    """``worker(world, *args)`` on ``nprocs`` forked ranks of one gloo group (:func:`_in_gloo_group`), under
    :func:`_fork_ranks` (``fork``: its ``timeout_s``, ``poll_s``, ``what``; ``timeout_s`` defaults to the
    group's timeout plus a minute, so that the ranks normally fail first with their error)."""
    fork.setdefault("timeout_s", group_timeout_s + 60)
    _fork_ranks(_in_gloo_group, worker, nprocs, group_timeout_s, *args, nprocs=nprocs, **fork)


def _own_rows_only(full, rank: int):
    """``full`` with NaN in every row but those of ``rank``'s part of 2 (FSDP2 shards dimension 0 as
    ``torch.chunk``): a rank that loads from it any row outside its own part gets NaN."""
    import torch

    poisoned = torch.full_like(full, float("nan"))
    poisoned.chunk(2)[rank].copy_(full.chunk(2)[rank])
    return poisoned


@pytest.fixture(scope="session")
def own_rows_only():
    """``own_rows_only(full, rank) -> tensor`` (:func:`_own_rows_only`); a forked rank gets it as an argument."""
    return _own_rows_only


@pytest.fixture(scope="session")
def free_port():
    """``free_port() -> int``: a TCP port of 127.0.0.1 free now (torchrun's ``--master_port``)."""
    return _free_port


@pytest.fixture(scope="session")
def fork_ranks():
    """``fork_ranks(worker, *args, timeout_s, nprocs=2, poll_s=2, what="the 2 processes")``: ``worker(rank,
    port, *args)`` in forked ranks, joined within ``timeout_s`` (:func:`_fork_ranks`)."""
    return _fork_ranks


@pytest.fixture(scope="session")
def fork_gloo_ranks():
    """``fork_gloo_ranks(worker, *args, group_timeout_s, nprocs=2, timeout_s=..., poll_s=2, what=...)``:
    ``worker(world, *args)`` on forked ranks of one gloo group (:func:`_fork_gloo_ranks`)."""
    return _fork_gloo_ranks
