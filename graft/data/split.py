"""The ``split`` stage's work: stratified, seeded, leakage-free train/val/test assignment.

Within each role and class, images are ordered by a seeded hash of their content and cut at
the requested fractions. That makes the split exactly stratified, identical on every machine
(no RNG implementation involved) and stable as data grows: a new image moves at most one
existing image across each cut, so yesterday's test images do not drift into today's training
set. Ingest already keeps each content once per role, so no image can land in two splits.
"""

from __future__ import annotations

import pandas as pd

from graft.config.params import ROLES, Fractions, Split
from graft.data import schemas
from graft.data.reports import class_counts_markdown
from graft.errors import GraftError
from graft.hashing import sha256_hex


class SplitError(GraftError):
    """A class has too few images for the requested fractions."""


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


def split_role(accepted: pd.DataFrame, fractions: Fractions, seed: int, role: str) -> pd.DataFrame:
    """``accepted`` (manifest rows of one role) with a ``split`` column, class by class.

    Within each class rows are ordered by a hash of ``seed`` and their sha256 and cut at
    ``fractions``. Raises SplitError naming the class and the images it needs when a class is
    too small for a train image.
    """
    parts = []
    for label, group in accepted.groupby("label", sort=True):
        train, val, test = split_counts(len(group), fractions)
        if train < 1:
            raise SplitError(
                f"class {label!r} of source {role!r} has {len(group)} images: too few for "
                f"split.{role} (train {fractions.train}, val {fractions.val}, "
                f"test {fractions.test}); it needs at least {len(group) - train + 1}"
            )
        ordered = group.assign(_key=[_order_key(seed, sha) for sha in group["sha256"]])
        ordered = ordered.sort_values("_key", kind="stable")
        ordered["split"] = ["train"] * train + ["val"] * val + ["test"] * test
        parts.append(ordered)
    return pd.concat(parts, ignore_index=True)


def make_splits(manifest: pd.DataFrame, settings: Split, seed: int) -> pd.DataFrame:
    """Assign every accepted image of every role to train, val or test.

    Returns the splits table (schemas.SPLITS_TABLE), sorted by role, label and sha256, so the
    same manifest and seed give the same bytes whatever the row order. Raises SplitError when
    a role has no accepted images or a class is too small.
    """
    accepted = manifest[manifest["verdict"] == "accepted"]
    tables = []
    for role in ROLES:
        rows = accepted[accepted["role"] == role]
        if rows.empty:
            raise SplitError(f"source {role!r} has no accepted images")
        tables.append(split_role(rows, settings.for_role(role), seed, role))
    splits = pd.concat(tables, ignore_index=True)
    splits = splits[list(schemas.SPLITS_TABLE.columns)]
    splits = splits.sort_values(["role", "label", "sha256"], kind="stable", ignore_index=True)
    return schemas.validate(splits, schemas.SPLITS_TABLE, where="split")


def count_table(splits: pd.DataFrame) -> dict[str, dict[str, dict[str, object]]]:
    """Images per role, split and class, for the metrics file.

    Returns ``{role: {split: {"total": images, "classes": {class: images}}}}``.
    """
    counts: dict[str, dict[str, dict[str, object]]] = {}
    for (role, split), group in splits.groupby(["role", "split"], sort=True):
        per_class = {str(k): int(v) for k, v in group["label"].value_counts().sort_index().items()}
        counts.setdefault(str(role), {})[str(split)] = {"total": len(group), "classes": per_class}
    return counts


def render_summary(splits: pd.DataFrame) -> str:
    """The Markdown report: images per class in each split, for each role, with totals."""
    lines = ["# Split summary", ""]
    for role, rows in splits.groupby("role", sort=True):
        table = pd.crosstab(rows["label"], rows["split"], margins=True, margins_name="total")
        table = table.reindex(columns=[c for c in (*schemas.SPLITS, "total") if c in table])
        lines += [f"## {role}", "", class_counts_markdown(table), ""]
    return "\n".join(lines)
