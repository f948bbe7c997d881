"""Splits: stratified, seeded, byte-reproducible, leakage-free, stable as data grows."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graft.config.params import Split
from graft.data.schemas import SPLITS_TABLE, TableError, read_table
from graft.data.split import SplitError, make_splits, render_summary


def manifest(per_class: dict[tuple[str, str], int]) -> pd.DataFrame:
    rows = []
    for (role, label), count in per_class.items():
        for i in range(count):
            sha = hashlib.sha256(f"{role}/{label}/{i}".encode()).hexdigest()
            rows.append(
                dict(
                    role=role,
                    path=f"{label}/{i}.png",
                    sha256=sha,
                    label=label,
                    width=8,
                    height=8,
                    mode="L",
                    format="PNG",
                    bytes=100,
                    verdict="accepted",
                    reason=None,
                )
            )
    frame = pd.DataFrame(rows)
    return frame.astype({"width": "Int64", "height": "Int64", "bytes": "Int64"})


SETTINGS = Split.model_validate(
    {
        "pretrain": {"train": 0.8, "val": 0.2, "test": 0.0},
        "target": {"train": 0.5, "val": 0.25, "test": 0.25},
    }
)


@pytest.fixture
def table() -> pd.DataFrame:
    return manifest(
        {("pretrain", "0"): 50, ("pretrain", "1"): 30, ("target", "a"): 40, ("target", "b"): 20}
    )


def test_stratified_counts(table: pd.DataFrame) -> None:
    splits = make_splits(table, SETTINGS, seed=1)
    counts = splits.groupby(["role", "label", "split"]).size().to_dict()
    assert counts[("pretrain", "0", "train")] == 40 and counts[("pretrain", "0", "val")] == 10
    assert ("pretrain", "0", "test") not in counts
    assert counts[("target", "a", "train")] == 20 and counts[("target", "a", "test")] == 10
    assert counts[("target", "b", "val")] == 5 and counts[("target", "b", "test")] == 5


def test_no_image_in_two_splits(table: pd.DataFrame) -> None:
    splits = make_splits(table, SETTINGS, seed=1)
    assert not splits.duplicated(["role", "sha256"]).any()


def test_same_manifest_and_seed_give_byte_identical_files(
    table: pd.DataFrame, tmp_path: Path
) -> None:
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    make_splits(table, SETTINGS, seed=7).to_csv(first, index=False)
    make_splits(table.sample(frac=1, random_state=3), SETTINGS, seed=7).to_csv(second, index=False)
    assert first.read_bytes() == second.read_bytes()
    make_splits(table, SETTINGS, seed=8).to_csv(second, index=False)
    assert first.read_bytes() != second.read_bytes()


def test_adding_images_moves_few_existing_ones(table: pd.DataFrame) -> None:
    before = make_splits(table, SETTINGS, seed=1).set_index("sha256")["split"]
    grown = manifest(
        {("pretrain", "0"): 50, ("pretrain", "1"): 30, ("target", "a"): 44, ("target", "b"): 20}
    )
    after = make_splits(grown, SETTINGS, seed=1).set_index("sha256")["split"]
    moved = (before != after.reindex(before.index)).sum()
    assert moved <= 4  # at most one per cut per added image, never a reshuffle


def test_too_few_images_is_a_clear_error() -> None:
    with pytest.raises(SplitError, match=r"class 'b' of source 'target' has 2 images"):
        make_splits(
            manifest({("pretrain", "0"): 10, ("target", "a"): 10, ("target", "b"): 2}),
            SETTINGS,
            seed=1,
        )


def test_rejected_rows_are_not_split(table: pd.DataFrame) -> None:
    table.loc[0, "verdict"] = "corrupt"
    splits = make_splits(table, SETTINGS, seed=1)
    assert table.loc[0, "sha256"] not in set(splits["sha256"])


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=5),
    train=st.floats(min_value=0.3, max_value=0.8),
    val=st.floats(min_value=0.05, max_value=0.2),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_split_properties(sizes: list[int], train: float, val: float, seed: int) -> None:
    # max(): train 0.8 + val 0.2 leaves a test share of -5e-17 in floating point.
    fractions = {"train": train, "val": val, "test": max(0.0, 1 - train - val)}
    settings_ = Split.model_validate({"pretrain": fractions, "target": fractions})
    counts = {("pretrain", "p"): 10}
    counts.update({("target", f"class {i}"): n for i, n in enumerate(sizes)})
    table = manifest(counts)
    try:
        splits = make_splits(table, settings_, seed)
    except SplitError as error:
        assert "too few" in str(error)
        assert min(sizes) < 5 or min(sizes) * train < 2  # only tiny classes may be refused
        return
    # Every accepted image exactly once, in one split.
    assert sorted(splits["sha256"]) == sorted(table["sha256"])
    for (role, label), group in splits.groupby(["role", "label"]):
        size = counts[(str(role), str(label))]
        got = group["split"].value_counts().to_dict()
        assert got.get("train", 0) >= 1 and got.get("val", 0) >= 1
        for name in ("val", "test"):
            expected = fractions[name] * size
            assert abs(got.get(name, 0) - expected) <= 1, (name, got, size)
    # Independent of the order rows arrive in.
    shuffled = make_splits(table.sample(frac=1, random_state=seed % 1000), settings_, seed)
    assert shuffled.equals(splits)


def test_summary_counts_each_class_per_split_with_totals(table: pd.DataFrame) -> None:
    summary = render_summary(make_splits(table, SETTINGS, seed=1))
    target = summary.split("## target")[1]
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in target.splitlines()
        if line.startswith("|") and not set(line) <= set("|:- ")
    ]
    assert rows == [
        ["class", "train", "val", "test", "total"],
        ["a", "20", "10", "10", "40"],
        ["b", "10", "5", "5", "20"],
        ["total", "30", "15", "15", "60"],
    ]
    assert "## pretrain" in summary.split("## target")[0]


def test_a_damaged_splits_file_is_a_clear_error(table: pd.DataFrame, tmp_path: Path) -> None:
    path = tmp_path / "splits.csv"
    splits = make_splits(table, SETTINGS, seed=1)
    splits.loc[3, "split"] = "training"
    splits.to_csv(path, index=False)
    with pytest.raises(TableError, match=r"splits table is invalid(.|\n)*training"):
        read_table(path, SPLITS_TABLE)
