"""Generation under torchrun (amalab.llm.generate, amalab.llm.generation_scores): 2 forked gloo processes.

Replicated ranks decode their share of the prompts each (rank r: prompts r, r + 2, ...) and all get the
generations and successes one process gets. A policy sharded with FSDP2 is not generated from: one line says
so, and the run's success column in the summary says "skipped" instead of going missing.

Each scenario is its own fork of 2 processes with a short process-group timeout (as
tests/training/test_shared_decisions.py), so a rank left waiting in a collective fails the test, not CI.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from amalab.llm.config import GenerationConfig, LLMConfig
from amalab.llm.data.synthetic.generator import GeneratorKnobs, generate_task
from amalab.llm.generate import evaluate_generation
from amalab.llm.generation_scores import add_generation
from amalab.llm.logprobs import shard_causal_lm
from amalab.llm.models import decoder_layers
from amalab.llm.report import summarize, summary_table, write_summary
from amalab.llm.tiny import tiny_tokenizer
from amalab.training.distributed import World, barrier, close_world, init_world

CPU = torch.device("cpu")
TIMEOUT_S = 30  # the process group's timeout: a rank left in a collective fails after it
MAX_PROMPT_LENGTH = 64


class Scripted(torch.nn.Module):
    """A "policy" answering each prompt it knows with a fixed text (its pair's chosen or rejected response),
    so that successes are known; it counts the prompts it is asked to continue."""

    def __init__(self, tokenizer, answers: dict[tuple[int, ...], str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # greedy_generate finds the device here
        self.tokenizer, self.answers, self.rows = tokenizer, answers, 0

    def generate(self, input_ids, attention_mask, generation_config):
        eos = generation_config.eos_token_id
        new = [self.tokenizer(self.answers[tuple(ids[mask.bool()].tolist())], add_special_tokens=False)["input_ids"]
               for ids, mask in zip(input_ids, attention_mask)]
        width = max(len(tokens) for tokens in new) + 1
        self.rows += len(new)
        return torch.cat([input_ids, torch.tensor([t + [eos] * (width - len(t)) for t in new])], dim=1)


def counted(model):
    """``model`` whose ``generate`` counts the prompts (rows) it continues, in ``model.rows``."""
    model.rows, generate = 0, model.generate

    def counting(input_ids, **kwargs):
        model.rows += len(input_ids)
        return generate(input_ids=input_ids, **kwargs)

    model.generate = counting
    return model


def make_setup(peaked_llama) -> dict:
    """Two generated tasks (7 and 1 held-out prompts: rank 1 gets no prompt of the second), a tiny Llama with
    clear argmax margins (``peaked_llama``: the conftest fixture, as tests/llm/test_generate.py), and a
    scripted policy answering 5 of 8 correctly."""
    tokenizer = tiny_tokenizer()
    tasks = [generate_task(GeneratorKnobs("arithmetic", n=7, seed=1)), generate_task(GeneratorKnobs("format", n=1,
                                                                                                    seed=1))]
    tasks = [SimpleNamespace(name=t.pairs[0].task, eval=t.pairs) for t in tasks]
    model = peaked_llama(tokenizer)
    answers = {}
    for t in tasks:
        for i, pair in enumerate(t.eval):
            key = tuple(tokenizer(pair.prompt, add_special_tokens=True)["input_ids"][-MAX_PROMPT_LENGTH:])
            answers[key] = pair.chosen if i % 3 != 1 else pair.rejected  # prompts 1 and 4 answered wrongly
    return dict(tokenizer=tokenizer, tasks=tasks, model=model, answers=answers)


def fake_experiment(setup: dict, world: World, out: Path) -> SimpleNamespace:
    """What generation scoring reads of an Experiment."""
    config = LLMConfig(generation=GenerationConfig(max_new_tokens=6, batch_size=2, max_prompts=0))
    return SimpleNamespace(config=config, tasks=setup["tasks"], tokenizer=setup["tokenizer"], device=CPU,
                           autocast=contextlib.nullcontext, world=world, out=out)


def generations(setup: dict, world: World, out: Path) -> dict:
    """Generations of the tiny Llama and successes of the scripted policy on this rank, with the prompts each
    generated."""
    model = counted(copy.deepcopy(setup["model"]))
    pairs = setup["tasks"][0].eval
    report = evaluate_generation(model, setup["tokenizer"], pairs, max_new_tokens=6, batch_size=2,
                                 max_prompt_length=MAX_PROMPT_LENGTH, world=world)
    scripted = Scripted(setup["tokenizer"], setup["answers"])
    final = add_generation(fake_experiment(setup, world, out), scripted, out / "run", {})
    return {"responses": [r["response"] for r in report.records], "llama_rows": model.rows,
            "final": final, "scripted_rows": scripted.rows}


def sharded(setup: dict, world: World, out: Path) -> dict:
    """A tiny Llama sharded with FSDP2 over the 2 ranks: its run is marked, and one line (rank 0) says why."""
    model = copy.deepcopy(setup["model"])
    policy = shard_causal_lm(model, decoder_layers(model), world)
    counted(model)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        final = add_generation(fake_experiment(setup, world, out), policy, out / "run", {"tasks": {}})
        final = add_generation(fake_experiment(setup, world, out), policy, out / "run", final)  # told once
    return {"final": final, "printed": printed.getvalue(), "llama_rows": model.rows}


def _worker(rank: int, port: int, scenario: str, root: str, setup: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    world = init_world(CPU, timeout_s=TIMEOUT_S)
    barrier(world)
    try:
        result = {"generations": generations, "sharded": sharded}[scenario](setup, world, Path(root))
    except Exception as e:
        result = {"error": f"{type(e).__name__}: {e}"}
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(result))
    close_world(world)


def two_ranks(scenario: str, root: Path, setup: dict, fork_ranks) -> list[dict]:
    """Each rank's result of ``scenario`` in 2 forked gloo processes (``fork_ranks``: the conftest
    fixture)."""
    fork_ranks(_worker, scenario, str(root), setup, timeout_s=TIMEOUT_S + 60,
               what=f"{scenario}: the 2 processes")
    results = [json.loads((root / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert all("error" not in r for r in results), results
    return results


@pytest.fixture(scope="module")
def setup(peaked_llama):
    return make_setup(peaked_llama)


def test_replicated_ranks_share_the_prompts_and_get_what_one_process_gets(setup, fork_ranks, one_thread,
                                                                           tmp_path):
    with one_thread():
        alone = generations(setup, World(), tmp_path / "alone")
    assert alone["llama_rows"] == 7 and alone["scripted_rows"] == 8
    assert len(set(alone["responses"])) > 1  # distinct generations: an order mix-up would show
    success = alone["final"]["tasks"]
    assert success == {"generated-arithmetic": {"success": 5 / 7}, "generated-format": {"success": 1.0}}
    ranks = two_ranks("generations", tmp_path, setup, fork_ranks)
    for rank, result in enumerate(ranks):
        assert result["responses"] == alone["responses"], rank  # every rank has every generation, in order
        assert result["final"] == alone["final"], rank
    assert [r["llama_rows"] for r in ranks] == [4, 3]  # prompts 0, 2, 4, 6 and 1, 3, 5
    assert [r["scripted_rows"] for r in ranks] == [5, 3]  # and the one prompt of the second task on rank 0
    assert json.loads((tmp_path / "run" / "generation.json").read_text()) == {
        "generated-arithmetic": 5 / 7, "generated-format": 1.0}


def test_a_sharded_policy_is_not_generated_from_and_the_summary_says_so(setup, fork_ranks, tmp_path):
    ranks = two_ranks("sharded", tmp_path, setup, fork_ranks)
    mark = {"reason": "[model] fsdp", "tasks": ["generated-arithmetic", "generated-format"]}
    assert [r["final"] for r in ranks] == [{"tasks": {}, "generation_skipped": mark}] * 2
    assert [r["llama_rows"] for r in ranks] == [0, 0]
    told = ranks[0]["printed"]
    assert told.count("\n") == 1 and told.startswith("generation: skipped under [model] fsdp: ")
    assert ranks[1]["printed"] == ""  # rank 0 alone speaks
    assert not (tmp_path / "run").exists()  # no generation.json: a run without fsdp scores it later
    records = [{"method": "standard", "seed": 0, **ranks[0]["final"]},
               {"method": "uniform", "seed": 0, "tasks": {"generated-arithmetic": {"success": 0.5}}}]
    summary = summarize(["generated-arithmetic", "generated-format"], records)
    header, _, standard, uniform = summary_table(summary).splitlines()
    assert header.split()[-4:] == ["generated-arithmetic", "success", "generated-format", "success"]
    assert standard.startswith("standard") and standard.count("skipped (fsdp)") == 2
    assert uniform.split()[-2:] == ["0.5000", "-"]
    write_summary(tmp_path, summary)
    csv_rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert csv_rows[1].startswith("standard,0,generated-arithmetic,,,,,skipped: [model] fsdp,")
