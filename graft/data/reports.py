"""Markdown pieces of the stages' reports for people (``summary.md``)."""

from __future__ import annotations

import pandas as pd


def class_counts_markdown(table: pd.DataFrame, index: str = "class") -> str:
    """A Markdown (pipe) table of ``table``: one row per class, one column per column.

    ``table`` is a counts frame such as ``pd.crosstab`` makes: class names as its index, one
    integer column per verdict or split. The first column is headed ``index`` (``class``; a
    table of another kind of row, such as roles, names its own). Class names are written
    exactly as they are: tabulate's number parsing would turn a class ``007`` into ``7``, so
    it is off, and the counts are right-aligned explicitly instead.
    """
    named = table.rename_axis(index=index, columns=None)
    align = ("left", *["right"] * len(named.columns))
    return named.to_markdown(disable_numparse=True, colalign=align)
