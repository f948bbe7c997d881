"""The Markdown tables of the stage reports."""

from __future__ import annotations

import pandas as pd

from graft.data.reports import class_counts_markdown


def test_class_names_are_written_as_they_are() -> None:
    rows = pd.DataFrame({"label": ["007", "007", "3.10", "1e3"], "split": ["train", "val"] * 2})
    table = pd.crosstab(rows["label"], rows["split"])
    lines = class_counts_markdown(table).splitlines()
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["class", "train", "val"]
    rule = cells[1]  # names aligned left, counts right
    assert rule[0].startswith(":") and not rule[0].endswith(":")
    assert all(cell.endswith(":") and not cell.startswith(":") for cell in rule[1:])
    assert cells[2:] == [["007", "1", "1"], ["1e3", "0", "1"], ["3.10", "1", "0"]]
