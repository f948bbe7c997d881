"""Markdown pieces shared by the stages' human-readable reports."""

from __future__ import annotations

import pandas as pd


def markdown_table(table: pd.DataFrame, first_column: str) -> list[str]:
    """A Markdown table of a counts frame: one row per index entry, one column per column."""
    lines = [f"| {first_column} | " + " | ".join(str(c) for c in table.columns) + " |"]
    lines.append("| --- " * (len(table.columns) + 1) + "|")
    for label, counts in table.iterrows():
        lines.append(f"| {label} | " + " | ".join(str(n) for n in counts) + " |")
    return lines
