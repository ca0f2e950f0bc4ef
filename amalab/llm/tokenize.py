"""Tokenize each preference pair once: prompt ids, chosen ids, rejected ids (docs/maths.md section 9).

Convention (as TRL's DPO): the prompt and each completion are tokenized separately and concatenated, so the
completion tokens are exactly the tokens the model is scored on, whatever the tokenizer would merge across
the boundary. The prompt is tokenized with the tokenizer's special tokens (e.g. a BOS it adds at the start),
a completion without, and every completion ends with eos (appended unless its text already tokenizes to a
final eos): log pi(y|x) includes the probability of stopping.

Truncation: a prompt longer than ``max_prompt_length`` keeps its end (the part next to the reply); then
each completion is cut at the end to fit ``len(prompt) + len(completion) <= max_length``. A pair whose
prompt leaves no room for a single completion token (``len(prompt) >= max_length`` after prompt
truncation), or whose prompt tokenizes to nothing (its first completion token would have no position to be
predicted from), is dropped and counted in the :class:`TokenizationReport`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

from amalab.errors import ConfigError
from amalab.llm.data.pairs import PreferencePair


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair: the model reads prompt_ids + chosen_ids and prompt_ids + rejected_ids."""

    id: str
    task: str
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]

    @property
    def chosen_length(self) -> int:
        return len(self.prompt_ids) + len(self.chosen_ids)

    @property
    def rejected_length(self) -> int:
        return len(self.prompt_ids) + len(self.rejected_ids)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TokenizationConfig:
    """How pairs are tokenized; part of a cache's manifest (:meth:`to_dict`).

    :meth:`check` is the one rule on the limits (a config's ``[tokenize]`` obeys it too).
    """

    max_length: int = 512
    max_prompt_length: int | None = None

    def check(self) -> None:
        if not _is_int(self.max_length) or self.max_length < 2:
            raise ValueError(f"max_length: expected an integer >= 2, got {self.max_length!r}")
        if self.max_prompt_length is not None and (
                not _is_int(self.max_prompt_length) or not 1 <= self.max_prompt_length < self.max_length):
            raise ValueError(f"max_prompt_length: expected an integer in [1, max_length = {self.max_length}), "
                             f"got {self.max_prompt_length!r}")

    def __post_init__(self) -> None:
        try:
            self.check()
        except ValueError as error:  # load_section adds the file and table of a config's [tokenize]
            raise ConfigError(str(error)) from None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TokenizationReport:
    """What tokenization did to a dataset: nothing is dropped or cut silently."""

    kept: int
    dropped_long_prompt: tuple[str, ...] = field(default=())  # ids: prompt alone >= max_length tokens
    dropped_empty_prompt: tuple[str, ...] = field(default=())  # ids: prompt tokenizes to no token
    truncated_prompts: int = 0
    truncated_completions: int = 0  # chosen and rejected counted separately

    @property
    def dropped(self) -> int:
        return len(self.dropped_long_prompt) + len(self.dropped_empty_prompt)

    def summary(self) -> str:
        return (
            f"kept {self.kept} pairs, dropped {len(self.dropped_long_prompt)} "
            f"(prompt alone fills max_length) and {len(self.dropped_empty_prompt)} (empty prompt); "
            f"truncated {self.truncated_prompts} prompts "
            f"and {self.truncated_completions} completions"
        )


def _ids(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def tokenize_pairs(
    pairs: Iterable[PreferencePair],
    tokenizer,
    config: TokenizationConfig = TokenizationConfig(),
) -> tuple[list[TokenizedPair], TokenizationReport]:
    """Tokenize every pair once (see the module docstring for the convention); kept pairs keep their order."""
    pairs = list(pairs)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("tokenization: the tokenizer has no eos token (every completion ends with eos)")
    prompts = _ids(tokenizer, [pair.prompt for pair in pairs], add_special_tokens=True)
    chosens = _ids(tokenizer, [pair.chosen for pair in pairs], add_special_tokens=False)
    rejecteds = _ids(tokenizer, [pair.rejected for pair in pairs], add_special_tokens=False)

    kept: list[TokenizedPair] = []
    long_prompt: list[str] = []
    empty_prompt: list[str] = []
    truncated_prompts = truncated_completions = 0
    for pair, prompt, chosen, rejected in zip(pairs, prompts, chosens, rejecteds):
        if config.max_prompt_length is not None and len(prompt) > config.max_prompt_length:
            prompt = prompt[-config.max_prompt_length:]
            truncated_prompts += 1
        if not prompt or len(prompt) >= config.max_length:
            (empty_prompt if not prompt else long_prompt).append(pair.id)
            continue
        room = config.max_length - len(prompt)
        completions = []
        for completion in (chosen, rejected):
            if not completion or completion[-1] != eos:
                completion = completion + [eos]
            if len(completion) > room:
                completion = completion[:room]
                truncated_completions += 1
            completions.append(tuple(completion))
        kept.append(TokenizedPair(pair.id, pair.task, tuple(prompt), completions[0], completions[1]))
    report = TokenizationReport(
        kept=len(kept),
        dropped_long_prompt=tuple(long_prompt),
        dropped_empty_prompt=tuple(empty_prompt),
        truncated_prompts=truncated_prompts,
        truncated_completions=truncated_completions,
    )
    return kept, report

