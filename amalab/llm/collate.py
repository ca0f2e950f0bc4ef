"""Pad tokenized pairs into one concatenated batch [chosen_1..chosen_B; rejected_1..rejected_B].

One forward pass scores both replies (docs/maths.md (27)). Rows are right-padded with the pad id,
and every mask comes from the sequence lengths, never from comparing ids with the pad id: SmolLM2's pad id is
its eos, which also ends every completion.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from amalab.errors import ConfigError
from amalab.llm.tokenize import TokenizedPair


@dataclass(frozen=True)
class PreferenceBatch:
    """B pairs as 2B rows: row b is prompt_b + chosen_b, row B + b is prompt_b + rejected_b.

    completion_mask[r, t] is True exactly when the next-token target of position t, input_ids[r, t + 1], is a
    completion token; the last column is therefore always False. completion_token_counts[r] is the number of
    completion tokens of row r (its row sum), the |y| of docs/maths.md (27).
    """

    input_ids: torch.Tensor  # (2B, L) long
    attention_mask: torch.Tensor  # (2B, L) long, 1 on real tokens
    completion_mask: torch.Tensor  # (2B, L) bool, see the class docstring
    completion_token_counts: torch.Tensor  # (2B,) long
    ids: tuple[str, ...]  # (B,) example ids

    @property
    def num_pairs(self) -> int:
        return len(self.ids)

    @property
    def chosen_token_counts(self) -> torch.Tensor:
        return self.completion_token_counts[: self.num_pairs]

    @property
    def rejected_token_counts(self) -> torch.Tensor:
        return self.completion_token_counts[self.num_pairs :]

    def to(self, device: torch.device | str) -> "PreferenceBatch":
        moved = {
            f.name: getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }
        return PreferenceBatch(**moved)


def collate_pairs(pairs: Sequence[TokenizedPair], pad_token_id: int) -> PreferenceBatch:
    """Right-pad B tokenized pairs into a :class:`PreferenceBatch` of 2B rows (chosen rows first)."""
    if not pairs:
        raise ConfigError("collate: an empty list of pairs")
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool) or pad_token_id < 0:
        raise ConfigError(f"collate: pad_token_id must be a non-negative integer, got {pad_token_id!r}")
    rows = [(pair.prompt_ids, pair.chosen_ids) for pair in pairs] + [
        (pair.prompt_ids, pair.rejected_ids) for pair in pairs
    ]
    for pair in pairs:
        if not pair.prompt_ids:
            raise ConfigError(f"collate: example {pair.id} has an empty prompt (its first completion token "
                              "would have no position to be predicted from)")
    width = max(len(prompt) + len(completion) for prompt, completion in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    counts = torch.zeros(len(rows), dtype=torch.long)
    for row, (prompt, completion) in enumerate(rows):
        length = len(prompt) + len(completion)
        input_ids[row, :length] = torch.tensor(list(prompt) + list(completion), dtype=torch.long)
        attention_mask[row, :length] = 1
        # position t predicts token t + 1: the completion tokens sit at len(prompt) .. length - 1
        completion_mask[row, len(prompt) - 1 : length - 1] = True
        counts[row] = len(completion)
    return PreferenceBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        completion_token_counts=counts,
        ids=tuple(pair.id for pair in pairs),
    )


def padded_length(pair: TokenizedPair) -> int:
    """The columns a pair needs in a batch: the longer of its two rows."""
    return max(pair.chosen_length, pair.rejected_length)


def length_sorted_batches(pairs: Sequence[TokenizedPair], batch_size: int) -> list[list[TokenizedPair]]:
    """Batches of pairs of similar length (longest first), for no-gradient passes such as cache building.

    Sorting by the longer of a pair's two rows keeps padding small; longest first makes an out-of-memory
    batch fail at once. Ties keep the input order, so the batches are deterministic.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}")
    order = sorted(range(len(pairs)), key=lambda i: (-padded_length(pairs[i]), i))
    ordered = [pairs[i] for i in order]
    return [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]
