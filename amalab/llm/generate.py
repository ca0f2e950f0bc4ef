"""Generation evaluation of the verifiable tasks: greedy decoding of held-out prompts,
batched, each response scored by its task's verifier; the success rate per task.

Decoding: prompts are tokenized as in training (:mod:`amalab.llm.tokenize`: the tokenizer's special tokens
added, e.g. a BOS), left-padded into batches (a decoder-only model continues from the last position, so
the padding must sit on the left), with the attention mask built from the prompt lengths (never from pad
ids: SmolLM2's pad is its eos), and decoded greedily by transformers' ``generate`` for at most
``max_new_tokens`` tokens, stopping at eos. The response is the text of the new tokens before the first
eos. Prompts are batched in order of length, so a batch holds little padding; the result is in input
order.

Ranks (replicated under torchrun): :func:`evaluate_generation` gives rank r of W the prompts r, r + W, ...
(as :func:`amalab.training.distributed.rank_slots` shares a batch), and one ``all_gather_object`` brings
every rank every response, in prompt order, so every rank scores all of them alike. A policy sharded with
FSDP2 is not generated from here (:mod:`amalab.llm.generation_scores` says why and marks the summary).

Scoring: the verifier spec of a generated prompt is parsed back from its text
(:func:`amalab.llm.data.synthetic.verifier.spec_of`), so held-out :class:`PreferencePair` objects are all it
needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from amalab.errors import ConfigError
from amalab.llm.data.pairs import PreferencePair
from amalab.llm.data.synthetic.verifier import spec_of, verify
from amalab.llm.precision import autocast_context
from amalab.training.distributed import World, on_every_rank


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"generation: {name} must be an integer >= 1, got {value!r}")


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of shape (B, max length), padding on the left, the mask from lengths."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            input_ids[row, width - len(sequence):] = torch.tensor(list(sequence), dtype=torch.long)
            attention_mask[row, width - len(sequence):] = 1
    return input_ids, attention_mask


def cut_at_eos(tokens: Sequence[int], eos_token_id: int) -> list[int]:
    tokens = list(tokens)
    return tokens[:tokens.index(eos_token_id)] if eos_token_id in tokens else tokens


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64,
                    batch_size: int = 8, max_prompt_length: int | None = None,
                    device: torch.device | str | None = None, autocast=None) -> list[str]:
    """The greedy continuation of every prompt, up to eos or ``max_new_tokens`` tokens (see the module
    docstring). ``max_prompt_length``: longer prompts keep their last tokens (the part next to the reply).
    ``autocast``: a context factory for the forwards (default :func:`autocast_context` of ``device``)."""
    _check_positive("max_new_tokens", max_new_tokens)
    _check_positive("batch_size", batch_size)
    if max_prompt_length is not None:
        _check_positive("max_prompt_length", max_prompt_length)
    from transformers import GenerationConfig

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None:
        raise ConfigError("generation: the tokenizer has no eos token")
    pad = eos if pad is None else pad
    device = torch.device(device) if device is not None else next(model.parameters()).device
    autocast = autocast or (lambda: autocast_context(device))
    prompts = list(prompts)
    if not prompts:
        return []
    token_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    for prompt, ids in zip(prompts, token_ids):
        if not ids:
            raise ConfigError(f"generation: the prompt {prompt[:60]!r} tokenizes to no token")
    if max_prompt_length is not None:
        token_ids = [ids[-max_prompt_length:] for ids in token_ids]
    # a fresh generation config: the model's own may ask for sampling, a temperature or a repetition penalty
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=eos, pad_token_id=pad)
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(token_ids[i]))
    responses: list[str] = [""] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            input_ids, attention_mask = left_pad([token_ids[i] for i in rows], pad)
            with autocast():
                output = model.generate(input_ids=input_ids.to(device),
                                        attention_mask=attention_mask.to(device), generation_config=config)
            new_tokens = output[:, input_ids.shape[1]:].tolist()
            for row, tokens in zip(rows, new_tokens):
                responses[row] = tokenizer.decode(cut_at_eos(tokens, eos), skip_special_tokens=False)
    finally:
        model.train(was_training)
    return responses


@dataclass
class GenerationReport:
    """Success of generated responses: per task (rate and count) and per example."""

    success_rate: dict[str, float]
    count: dict[str, int]
    records: list[dict] = field(default_factory=list)  # id, task, prompt, response, success

    def to_dict(self) -> dict:
        return {"success_rate": self.success_rate, "count": self.count}


def score_responses(pairs: Sequence[PreferencePair], responses: Sequence[str]) -> GenerationReport:
    """Verify each response against the spec parsed from its pair's prompt; the success rate per task.

    A pair whose prompt is not one of a generated family is an error (its task has no verifier).
    """
    if len(pairs) != len(responses):
        raise ConfigError(f"generation: {len(responses)} responses for {len(pairs)} prompts")
    records, successes, count = [], {}, {}
    for pair, response in zip(pairs, responses):
        try:
            spec = spec_of(pair.prompt)
        except ConfigError as error:
            raise ConfigError(f"generation: task {pair.task!r} has no verifier: {error}") from None
        success = verify(spec, response)
        records.append({"id": pair.id, "task": pair.task, "prompt": pair.prompt, "response": response,
                        "success": success})
        successes[pair.task] = successes.get(pair.task, 0) + int(success)
        count[pair.task] = count.get(pair.task, 0) + 1
    return GenerationReport({task: successes[task] / count[task] for task in count}, count, records)


def gathered_in_order(share: list, n: int, world: World) -> list:
    """The ``n`` items of every rank's ``share`` (rank r holds items r, r + W, ...), on every rank in item
    order: one ``all_gather_object`` (https://pytorch.org/docs/stable/distributed.html); one process: ``share``."""
    if not world.distributed:
        return list(share)
    shares: list = [None] * world.size
    dist.all_gather_object(shares, list(share))
    items: list = [None] * n
    for rank, items_of_rank in enumerate(shares):
        items[rank::world.size] = items_of_rank  # a share of the wrong length raises here, on every rank
    return items


def evaluate_generation(model, tokenizer, pairs: Sequence[PreferencePair], *, max_new_tokens: int = 64,
                        batch_size: int = 8, max_prompt_length: int | None = None,
                        device: torch.device | str | None = None, autocast=None,
                        world: World = World()) -> GenerationReport:
    """Greedy-decode the prompts of ``pairs`` (held-out pairs of verifiable tasks) and score them; under
    several replicated ranks each decodes its share of the prompts (module docstring) and every rank gets
    the same report. Every rank must call it with the same ``pairs``."""
    prompts = [p.prompt for p in pairs]
    # on_every_rank: a rank whose share fails (a prompt of no token) stops every rank, none waits in the gather
    share = on_every_rank(world, lambda: greedy_generate(
        model, tokenizer, prompts[world.rank::world.size], max_new_tokens=max_new_tokens, batch_size=batch_size,
        max_prompt_length=max_prompt_length, device=device, autocast=autocast))
    return score_responses(pairs, gathered_in_order(share, len(prompts), world))


__all__ = ["GenerationReport", "cut_at_eos", "evaluate_generation", "gathered_in_order", "greedy_generate",
           "left_pad", "score_responses"]
