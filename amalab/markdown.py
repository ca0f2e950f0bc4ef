"""Markdown tables, for every report that writes one (the LLM experiment's summary.md, the MuJoCo suite's
table.md)."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], rule: str = " --- ") -> str:
    """A pipe table: ``| a | b |`` lines, the header, then its rule row (``|`` + ``rule|`` per column: the
    LLM summary's ``| --- |``, the MuJoCo table's ``|---|``), then the rows. No trailing newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + f"{rule}|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
