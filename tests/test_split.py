"""Splits: stratified, seeded, byte-reproducible, leakage-free, stable as data grows."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graft.config.params import NearDuplicates, Split
from graft.data.schemas import SPLITS_TABLE, TableError, read_table
from graft.data.split import (
    SplitError,
    make_splits,
    render_summary,
    split_dataset,
    split_metrics,
)


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
                    phash=None,
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
    summary = render_summary(split_dataset(table, SETTINGS, seed=1))
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


# Near-duplicates: hashes are planted directly, so a test says exactly which images are near.


def flip(digest: str, bits: int, first: int = 0) -> str:
    """``digest`` with ``bits`` bits flipped from bit ``first`` up: that many bits away."""
    return f"{int(digest, 16) ^ (((1 << bits) - 1) << first):016x}"


def with_hashes(table: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """``table`` with random, mutually far perceptual hashes and a 64 px image size."""
    rng = np.random.default_rng(seed)
    digests = [f"{int(h):016x}" for h in rng.integers(0, 2**63, len(table), dtype=np.int64)]
    return table.assign(phash=digests, width=64, height=64).astype(
        {"width": "Int64", "height": "Int64"}
    )


def position(table: pd.DataFrame, role: str, label: str, index: int) -> int:
    return int(table.index[(table["path"] == f"{label}/{index}.png") & (table["role"] == role)][0])


def plant(
    table: pd.DataFrame,
    copies: dict[tuple[str, str, int], tuple[str, str, int, int]],
    first: int = 0,
) -> None:
    """Make each key image a near copy (``bits`` away, from bit ``first``) of its value image."""
    for (role, label, index), (of_role, of_label, of_index, bits) in copies.items():
        source = str(table.at[position(table, of_role, of_label, of_index), "phash"])
        table.loc[position(table, role, label, index), "phash"] = flip(source, bits, first)


def test_a_near_duplicate_group_never_spans_two_splits(table: pd.DataFrame) -> None:
    table = with_hashes(table)
    # Chains of near copies in every class: groups of 2 to 5 images.
    for label, count in (("a", 40), ("b", 20)):
        for start in range(0, count - 5, 7):
            for step in range(1, 1 + start % 5):
                plant(table, {("target", label, start + step): ("target", label, start, 2 * step)})
    plant(table, {("pretrain", "0", 1): ("pretrain", "0", 0, 8)})
    outcome = split_dataset(table, SETTINGS, seed=1)
    assert outcome.groups["group"].nunique() == 4 + 2 + 1
    spans = outcome.groups.groupby(["role", "group"])["split"].nunique()
    assert (spans == 1).all()
    # Stratified as far as groups allow: every class keeps its splits, near its fractions.
    counts = outcome.splits.groupby(["role", "label", "split"]).size()
    assert abs(counts[("target", "a", "test")] - 10) <= 4
    assert abs(counts[("target", "b", "val")] - 5) <= 4
    assert counts[("pretrain", "0", "val")] >= 9
    assert len(outcome.splits) == len(table)  # nothing dropped
    metrics = split_metrics(outcome)["near_duplicates"]
    assert metrics["pretrain"]["groups"] == 1 and metrics["pretrain"]["images"] == 2
    assert metrics["target"]["largest"] == 5


def test_groups_do_not_depend_on_row_order(table: pd.DataFrame) -> None:
    table = with_hashes(table)
    plant(
        table,
        {("target", "a", 1): ("target", "a", 0, 4), ("target", "a", 2): ("target", "a", 1, 4)},
    )
    first = split_dataset(table, SETTINGS, seed=3)
    second = split_dataset(table.sample(frac=1, random_state=5), SETTINGS, seed=3)
    assert first.splits.equals(second.splits) and first.groups.equals(second.groups)
    assert render_summary(first) == render_summary(second)


def test_a_new_image_in_a_group_moves_few_images(table: pd.DataFrame) -> None:
    table = with_hashes(table)
    before = make_splits(table, SETTINGS, seed=1).set_index("sha256")["split"]
    grown = with_hashes(
        manifest(
            {("pretrain", "0"): 50, ("pretrain", "1"): 30, ("target", "a"): 41, ("target", "b"): 20}
        )
    )
    plant(grown, {("target", "a", 40): ("target", "a", 7, 2)})  # the new image joins a group
    after = make_splits(grown, SETTINGS, seed=1).set_index("sha256")["split"]
    assert (before != after.reindex(before.index)).sum() <= 4


def test_near_duplicates_under_two_labels_are_reported_and_kept(table: pd.DataFrame) -> None:
    table = with_hashes(table)
    plant(table, {("target", "b", 3): ("target", "a", 5, 6)})
    outcome = split_dataset(table, SETTINGS, seed=1)
    metrics = split_metrics(outcome)["near_duplicates"]["target"]
    assert metrics["label_conflicts"] == 1 and metrics["label_conflict_images"] == 2
    assert len(outcome.splits) == len(table)
    pair = outcome.splits[outcome.splits["path"].isin(["a/5.png", "b/3.png"])]
    assert pair["role"].eq("target").all() and pair["split"].nunique() == 1
    conflicts = render_summary(outcome).split("### Under two or more labels")[1]
    assert "`a/5.png` (a), `b/3.png` (b)" in conflicts


def pretrain_overlap_table(table: pd.DataFrame) -> pd.DataFrame:
    table = with_hashes(table)
    # a/0 is near pretrain 0/4, and a/1 near a/0 only; b/2 is pretrain 1/0's very content.
    plant(table, {("target", "a", 0): ("pretrain", "0", 4, 6)})
    plant(table, {("target", "a", 1): ("target", "a", 0, 4)}, first=8)  # 10 bits from 0/4
    same = position(table, "target", "b", 2)
    source = position(table, "pretrain", "1", 0)
    table.loc[same, ["sha256", "phash"]] = table.loc[source, ["sha256", "phash"]].to_numpy()
    table.loc[same, "phash"] = None  # identical content is found without any hash too
    return table


def test_target_images_also_in_pretraining_are_reported(table: pd.DataFrame) -> None:
    table = pretrain_overlap_table(table)
    outcome = split_dataset(table, SETTINGS, seed=1)
    assert sorted(outcome.overlap["path"]) == ["a/0.png", "a/1.png", "b/2.png"]
    assert not outcome.overlap["excluded"].any()
    assert len(outcome.splits) == len(table)
    metrics = split_metrics(outcome)["near_duplicates"]["pretrain_overlap"]
    assert metrics == {"images": 3, "excluded": 0}
    section = render_summary(outcome).split("## Target images also in the pretraining corpus")[1]
    assert "3 target images" in section and "kept in the target splits" in section
    assert "- `a/0.png` (a) ~ pretrain `0/4.png` (6 bits apart)" in section
    assert "- `a/1.png` (a) ~ pretrain `0/4.png` (10 bits apart)" in section  # via a/0
    assert "- `b/2.png` (b) ~ pretrain `1/0.png` (same content)" in section


def test_target_images_also_in_pretraining_can_be_excluded(table: pd.DataFrame) -> None:
    table = pretrain_overlap_table(table)
    settings = SETTINGS.model_copy(
        update={"near_duplicates": NearDuplicates(pretrain_overlap="exclude")}
    )
    outcome = split_dataset(table, settings, seed=1)
    target = outcome.splits[outcome.splits["role"] == "target"]
    assert not target["path"].isin(["a/0.png", "a/1.png", "b/2.png"]).any()
    assert len(target) == 60 - 3
    assert len(outcome.splits[outcome.splits["role"] == "pretrain"]) == 80  # pretraining keeps all
    assert split_metrics(outcome)["near_duplicates"]["pretrain_overlap"] == {
        "images": 3,
        "excluded": 3,
    }
    assert "left out of the target splits" in render_summary(outcome)


def test_images_under_32_px_join_only_identical_hashes(table: pd.DataFrame) -> None:
    table = with_hashes(table)
    plant(
        table,
        {("target", "a", 1): ("target", "a", 0, 2), ("target", "a", 3): ("target", "a", 2, 0)},
    )
    table["width"] = table["height"] = pd.array([8] * len(table), dtype="Int64")
    groups = split_dataset(table, SETTINGS, seed=1).groups
    assert sorted(groups["path"]) == ["a/2.png", "a/3.png"]  # identical hashes still group


def test_a_group_too_large_for_its_class_is_a_clear_error() -> None:
    table = with_hashes(manifest({("pretrain", "0"): 10, ("target", "a"): 10, ("target", "b"): 4}))
    for index in (1, 2, 3):
        plant(table, {("target", "b", index): ("target", "b", 0, 2)})
    with pytest.raises(SplitError, match=r"class 'b' of source 'target'.*largest has 4 images"):
        split_dataset(table, SETTINGS, seed=1)
