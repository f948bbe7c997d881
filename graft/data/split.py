"""The ``split`` stage's work: stratified, seeded, leakage-free train/val/test assignment.

Within each role, accepted images whose perceptual hashes are near (graft.data.near_duplicates,
``split.near_duplicates.max_distance``) form groups, and a group is assigned as one unit, so
near-identical images never land in two splits; a lone image is a group of one. Units are
taken in the order of a seeded hash of their content (a group's smallest member key) and each
goes to the first split whose share of its class is not yet full. With no groups this is
exactly the class-by-class cut at the requested fractions: exactly stratified, identical on
every machine (no RNG implementation involved) and stable as data grows, since a new image
moves at most one unit across each cut. Groups keep the counts as close as their sizes allow.

Two more findings come from the hashes. A group holding images of two labels is reported (the
images stay, under their labels). A target image that is identical or near to a pretraining
image, directly or through its group, is cross-role leakage: reported, and left out of the
target splits when ``split.near_duplicates.pretrain_overlap`` is ``exclude``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from graft.config.params import ROLES, Fractions, NearDuplicates, Split
from graft.data import schemas
from graft.data.near_duplicates import (
    distance_limits,
    group_near_duplicates,
    hamming,
    hash_values,
)
from graft.data.reports import class_counts_markdown
from graft.errors import GraftError
from graft.hashing import sha256_hex

LISTED = 20  # groups listed by name in the summary, per section; the counts cover them all


class SplitError(GraftError):
    """A class has too few images, or too large near-duplicate groups, for the fractions."""


@dataclass(frozen=True)
class SplitOutcome:
    """What the split stage decided and found.

    ``splits`` is the splits table (schemas.SPLITS_TABLE). ``groups`` holds the accepted
    images in near-duplicate groups of two or more: role, group (the sha256 of its first
    member by sha256), label, path, sha256 and split. ``overlap`` holds the target images
    identical or near to a pretraining image: group, label, path, sha256, ``pretrain`` (the
    path of the nearest pretraining image), its ``distance`` in bits (0: the same content) and
    ``excluded``. ``settings`` is the rule applied.
    """

    splits: pd.DataFrame
    groups: pd.DataFrame
    overlap: pd.DataFrame
    settings: NearDuplicates


def _order_key(seed: int, sha256: str) -> str:
    return sha256_hex(f"{seed}:{sha256}".encode())


def split_counts(total: int, fractions: Fractions) -> tuple[int, int, int]:
    """(train, val, test) sizes for a class of ``total`` images; every split asked for gets one.

    Val and test are rounded from their fractions (at least 1 each when asked for); train takes
    the rest, which is below 1 when the class is too small.
    """
    val = max(1, round(fractions.val * total))
    test = max(1, round(fractions.test * total)) if fractions.test > 0 else 0
    return total - val - test, val, test


def near_groups(rows: pd.DataFrame, max_distance: int) -> np.ndarray:
    """For each of ``rows`` (manifest rows of accepted images), the position in ``rows`` of the
    first member of its near-duplicate group (graft.data.near_duplicates.group_near_duplicates,
    with :func:`~graft.data.near_duplicates.distance_limits` from each image's size). A row
    without a perceptual hash is a group of its own."""
    groups = np.arange(len(rows))
    hashed = np.flatnonzero(rows["phash"].notna().to_numpy())
    if len(hashed):
        part = rows.iloc[hashed]
        limits = distance_limits(
            part["width"].to_numpy(dtype=np.int64),
            part["height"].to_numpy(dtype=np.int64),
            max_distance,
        )
        groups[hashed] = hashed[group_near_duplicates(part["phash"].tolist(), limits)]
    return groups


def _dominant_labels(rows: pd.DataFrame) -> pd.Series:
    """The label with the most images in each group of ``rows`` (ties: the smallest label)."""
    sizes = rows.groupby(["group", "label"]).size().rename("n").reset_index()
    sizes = sizes.sort_values(["group", "n", "label"], ascending=[True, False, True])
    return sizes.drop_duplicates("group").set_index("group")["label"]


def split_role(rows: pd.DataFrame, fractions: Fractions, seed: int, role: str) -> pd.DataFrame:
    """``rows`` (accepted manifest rows of one role, with a ``group`` column) with a ``split``
    column; a group's images all get the same split.

    Each class's split sizes come from :func:`split_counts`. Units (groups) are taken in the
    order of their smallest ``seed``-ed content key; a unit goes to the first split (train,
    val, test) whose size for the unit's main label (its most frequent) is not yet reached,
    or, when all are, to the one least over. Raises SplitError naming the class when it is too
    small for a train image, or when its groups leave a split it asks for without an image.
    """
    quotas = {}
    for label, total in rows["label"].value_counts().sort_index().items():
        cuts = split_counts(int(total), fractions)
        if cuts[0] < 1:
            raise SplitError(
                f"class {label!r} of source {role!r} has {total} images: too few for "
                f"split.{role} (train {fractions.train}, val {fractions.val}, "
                f"test {fractions.test}); it needs at least {total - cuts[0] + 1}"
            )
        quotas[label] = dict(zip(schemas.SPLITS, cuts, strict=True))
    keyed = rows.assign(_key=[_order_key(seed, sha) for sha in rows["sha256"]])
    # Each group's place is its smallest key: its first row once rows are sorted by key.
    units = pd.Index(keyed.sort_values("_key", kind="stable").drop_duplicates("group")["group"])
    mains = _dominant_labels(keyed).reindex(units).to_numpy()
    sizes = keyed["group"].value_counts()
    # Plain dicts: the loop below runs once per unit, up to hundreds of thousands of times.
    mixes: dict[str, list[tuple[str, int]]] = {}
    grouped = keyed[keyed["group"].map(sizes).to_numpy() > 1]
    mixed = grouped.groupby(["group", "label"]).size()
    for (group, label), count in zip(mixed.index.tolist(), mixed.tolist(), strict=True):
        mixes.setdefault(group, []).append((label, count))
    filled = {label: dict.fromkeys(schemas.SPLITS, 0) for label in quotas}
    chosen = {}
    for group, main in zip(units, mains, strict=True):
        quota, fill = quotas[main], filled[main]
        asked = [name for name in schemas.SPLITS if quota[name] > 0]
        room = [name for name in asked if fill[name] < quota[name]]
        split = room[0] if room else max(asked, key=lambda name: quota[name] - fill[name])
        chosen[group] = split
        for label, count in mixes.get(group, [(main, 1)]):
            filled[label][split] += int(count)
    for label, fill in filled.items():
        empty = [name for name in schemas.SPLITS if quotas[label][name] > 0 and not fill[name]]
        if empty:
            largest = int(sizes[keyed.loc[keyed["label"] == label, "group"]].max())
            raise SplitError(
                f"class {label!r} of source {role!r}: its near-duplicate groups (the largest "
                f"has {largest} images) leave {', '.join(empty)} without an image; lower "
                "split.near_duplicates.max_distance or add images to the class"
            )
    return keyed.drop(columns="_key").assign(split=keyed["group"].map(chosen))


def split_dataset(manifest: pd.DataFrame, settings: Split, seed: int) -> SplitOutcome:
    """Assign every accepted image of every role to train, val or test, keeping near-duplicate
    groups whole; report groups, label conflicts and target images found in pretraining.

    The splits table is sorted by role, label and sha256, so the same manifest and seed give
    the same bytes whatever the row order. Raises SplitError when a role has no accepted images
    (none left, after exclusion), or a class is too small or split apart by its groups.
    """
    rule = settings.near_duplicates
    accepted = manifest[manifest["verdict"] == "accepted"]
    accepted = accepted.sort_values(["role", "sha256"], kind="stable", ignore_index=True)
    # Groups over both roles at once: a target image whose group holds a pretraining image is
    # near one, directly or through near-identical target images.
    joint = near_groups(accepted, rule.max_distance)
    in_pretrain = pd.Series(accepted["role"] == "pretrain").groupby(joint).any()
    known = set(accepted.loc[accepted["role"] == "pretrain", "sha256"])
    tables, listed, overlaps = [], [], []
    for role in ROLES:
        where = np.flatnonzero(accepted["role"] == role)
        rows = accepted.iloc[where].reset_index(drop=True)
        if rows.empty:
            raise SplitError(f"source {role!r} has no accepted images")
        rows["group"] = rows["sha256"].to_numpy()[near_groups(rows, rule.max_distance)]
        if role == "target":
            shared = in_pretrain.reindex(joint[where]).to_numpy() | rows["sha256"].isin(known)
            # The whole group goes: its other images are near-copies of the shared one.
            overlapping = rows["group"].isin(set(rows.loc[shared, "group"])).to_numpy()
            overlap = _overlap_table(rows[overlapping], accepted, joint, where[overlapping])
            overlaps.append(overlap.assign(excluded=rule.pretrain_overlap == "exclude"))
            if rule.pretrain_overlap == "exclude":
                rows = rows[~overlapping].reset_index(drop=True)
                if rows.empty:
                    raise SplitError(
                        "source 'target' has no accepted images left: all are also in the "
                        "pretraining corpus (split.near_duplicates.pretrain_overlap: exclude)"
                    )
        split = split_role(rows, settings.for_role(role), seed, role)
        tables.append(split)
        sizes = split["group"].map(split["group"].value_counts())
        listed.append(split[sizes > 1].assign(role=role))
    splits = pd.concat(tables, ignore_index=True)
    splits = splits[list(schemas.SPLITS_TABLE.columns)]
    splits = splits.sort_values(["role", "label", "sha256"], kind="stable", ignore_index=True)
    groups = pd.concat(listed, ignore_index=True)[
        ["role", "group", "label", "path", "sha256", "split"]
    ].sort_values(["role", "group", "label", "path"], kind="stable", ignore_index=True)
    return SplitOutcome(
        splits=schemas.validate(splits, schemas.SPLITS_TABLE, where="split"),
        groups=groups,
        overlap=pd.concat(overlaps, ignore_index=True),
        settings=rule,
    )


def _overlap_table(
    rows: pd.DataFrame, accepted: pd.DataFrame, joint: np.ndarray, where: np.ndarray
) -> pd.DataFrame:
    """The overlap report of the target ``rows`` (at positions ``where`` of ``accepted``),
    sorted by group and path. Each names its nearest pretraining image: the one with the same
    content, else the pretraining image of its group over both roles whose hash is nearest,
    with the ``distance`` in bits (0 for the same content; above the limit for an image that
    overlaps only through its group; missing when there is no hash to compare)."""
    pretrain = np.flatnonzero(accepted["role"].to_numpy() == "pretrain")
    paths, digests = accepted["path"].to_numpy(), accepted["phash"].to_numpy()
    members = {key: list(group) for key, group in pd.Series(pretrain).groupby(joint[pretrain])}
    by_sha = dict(zip(accepted["sha256"].to_numpy()[pretrain], paths[pretrain], strict=True))
    matches: list[str | None] = []
    distances: list[int | None] = []
    for position, sha, digest in zip(where, rows["sha256"], rows["phash"], strict=True):
        hashed = [m for m in members.get(joint[position], []) if isinstance(digests[m], str)]
        if sha in by_sha:
            matches.append(by_sha[sha])
            distances.append(0)
        elif isinstance(digest, str) and hashed:
            apart = hamming(hash_values([digest]), hash_values(list(digests[hashed])))
            nearest = int(np.argmin(apart))
            matches.append(paths[hashed[nearest]])
            distances.append(int(apart[nearest]))
        else:
            matches.append(None)
            distances.append(None)
    table = rows[["group", "label", "path", "sha256"]].assign(
        pretrain=pd.array(matches, dtype="str"), distance=pd.array(distances, dtype="Int64")
    )
    return table.sort_values(["group", "path"], kind="stable", ignore_index=True)


def make_splits(manifest: pd.DataFrame, settings: Split, seed: int) -> pd.DataFrame:
    """The splits table of :func:`split_dataset` alone (schemas.SPLITS_TABLE)."""
    return split_dataset(manifest, settings, seed).splits


def count_table(splits: pd.DataFrame) -> dict[str, dict[str, dict[str, object]]]:
    """Images per role, split and class, for the metrics file.

    Returns ``{role: {split: {"total": images, "classes": {class: images}}}}``.
    """
    counts: dict[str, dict[str, dict[str, object]]] = {}
    for (role, split), group in splits.groupby(["role", "split"], sort=True):
        per_class = {str(k): int(v) for k, v in group["label"].value_counts().sort_index().items()}
        counts.setdefault(str(role), {})[str(split)] = {"total": len(group), "classes": per_class}
    return counts


def near_duplicate_counts(outcome: SplitOutcome) -> dict[str, dict[str, int]]:
    """The near-duplicate findings as counts: per role, ``groups`` (of two or more images),
    ``images`` in them, the ``largest``, and ``label_conflicts`` (groups under two or more
    labels) with their ``label_conflict_images``; and ``pretrain_overlap``: target
    ``images`` identical or near to pretraining images, and how many were ``excluded``."""
    found: dict[str, dict[str, int]] = {}
    for role in ROLES:
        rows = outcome.groups[outcome.groups["role"] == role]
        sizes = rows.groupby("group").size()
        mixed = rows.groupby("group")["label"].nunique() > 1
        found[role] = {
            "groups": len(sizes),
            "images": int(sizes.sum()),
            "largest": int(sizes.max()) if len(sizes) else 0,
            "label_conflicts": int(mixed.sum()),
            "label_conflict_images": int(sizes[mixed].sum()),
        }
    found["pretrain_overlap"] = {
        "images": len(outcome.overlap),
        "excluded": int(outcome.overlap["excluded"].sum()),
    }
    return found


def split_metrics(outcome: SplitOutcome) -> dict[str, Any]:
    """The metrics file: :func:`count_table`'s counts under each role, and
    :func:`near_duplicate_counts` under ``near_duplicates``."""
    return {**count_table(outcome.splits), "near_duplicates": near_duplicate_counts(outcome)}


def _paths(rows: pd.DataFrame, with_labels: bool) -> str:
    shown = [
        f"`{path}`" + (f" ({label})" if with_labels else "")
        for path, label in zip(rows["path"], rows["label"], strict=True)
    ]
    return ", ".join(shown)


def _group_lines(groups: pd.DataFrame, with_labels: bool) -> list[str]:
    """One bullet per group of ``groups`` (role, split and paths), the first LISTED only."""
    names = list(dict.fromkeys(zip(groups["role"], groups["group"], strict=True)))
    lines = []
    for role, name in names[:LISTED]:
        rows = groups[(groups["role"] == role) & (groups["group"] == name)]
        lines.append(f"- {role}, {rows['split'].iloc[0]}: {_paths(rows, with_labels)}")
    if len(names) > LISTED:
        lines.append(f"- ... and {len(names) - LISTED} more")
    return lines


def render_summary(outcome: SplitOutcome) -> str:
    """The Markdown report: images per class in each split, for each role, with totals; then
    the near-duplicate groups, those under two labels and the target images also in the
    pretraining corpus (counts of all, paths of the first few)."""
    splits, rule = outcome.splits, outcome.settings
    lines = ["# Split summary", ""]
    for role, rows in splits.groupby("role", sort=True):
        table = pd.crosstab(rows["label"], rows["split"], margins=True, margins_name="total")
        table = table.reindex(columns=[c for c in (*schemas.SPLITS, "total") if c in table])
        lines += [f"## {role}", "", class_counts_markdown(table), ""]
    counts = near_duplicate_counts(outcome)
    lines += [
        "## Near-duplicates",
        "",
        f"Images whose perceptual hashes differ in at most {rule.max_distance} of 64 bits "
        "(`split.near_duplicates.max_distance`) form a group, and a group is in one split. "
        "Images under 32 px on a side join only identical hashes.",
        "",
    ]
    for role in ROLES:
        found = counts[role]
        lines.append(
            f"- {role}: {found['groups']} groups, {found['images']} images (largest "
            f"{found['largest']}); {found['label_conflicts']} under two or more labels "
            f"({found['label_conflict_images']} images)"
        )
    groups = outcome.groups
    if len(groups):
        lines += ["", f"### Groups (first {LISTED})", "", *_group_lines(groups, False)]
    mixed = groups.groupby(["role", "group"])["label"].transform("nunique") > 1
    if mixed.any():
        lines += [
            "",
            "### Under two or more labels",
            "",
            "Near-identical images with different labels: one label is probably wrong. They "
            "are kept, each under its own label, in one split.",
            "",
            *_group_lines(groups[mixed], True),
        ]
    overlap = outcome.overlap
    excluded = rule.pretrain_overlap == "exclude"
    fate = (
        "left out of the target splits (`split.near_duplicates.pretrain_overlap: exclude`)"
        if excluded
        else "kept in the target splits (`split.near_duplicates.pretrain_overlap: report`; "
        "`exclude` leaves them out)"
    )
    lines += [
        "",
        "## Target images also in the pretraining corpus",
        "",
        f"{len(overlap)} target images are identical or near to pretraining images, directly "
        f"or through their group: {fate}.",
    ]
    if len(overlap):
        lines.append("")
        for row in overlap.head(LISTED).itertuples():
            match = ""
            if isinstance(row.pretrain, str):
                apart = "same content" if row.distance == 0 else f"{row.distance} bits apart"
                match = f" ~ pretrain `{row.pretrain}` ({apart})"
            lines.append(f"- `{row.path}` ({row.label}){match}")
        if len(overlap) > LISTED:
            lines.append(f"- ... and {len(overlap) - LISTED} more")
    return "\n".join(lines) + "\n"
