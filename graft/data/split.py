"""Stage ``split``: stratified, seeded, leakage-free train/val/test assignment.

Within each role and class, images are ordered by a seeded hash of their content and cut at
the requested fractions. That makes the split exactly stratified, identical on every machine
(no RNG implementation involved) and stable as data grows: a new image moves at most one
existing image across each cut, so yesterday's test images do not drift into today's training
set. Ingest already keeps each content once per role, so no image can land in two splits.
"""

from __future__ import annotations

import pandas as pd

from graft import atomic
from graft.data import schemas
from graft.config.params import ROLES, Fractions, Params, Split, load_params
from graft.errors import GraftError, run_main
from graft.hashing import sha256_hex
from graft.data.layout import read_manifest
from graft.markdown import markdown_table


class SplitError(GraftError):
    """A class has too few images for the requested fractions."""


def _order_key(seed: int, sha256: str) -> str:
    return sha256_hex(f"{seed}:{sha256}".encode())


def split_counts(total: int, fractions: Fractions) -> tuple[int, int, int]:
    """(train, val, test) sizes for a class of ``total`` images; every split asked for gets one."""
    val = max(1, round(fractions.val * total))
    test = max(1, round(fractions.test * total)) if fractions.test > 0 else 0
    return total - val - test, val, test


def split_role(accepted: pd.DataFrame, fractions: Fractions, seed: int, role: str) -> pd.DataFrame:
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
    """Assign every accepted image of every role to train, val or test."""
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
    """Images per role, split and class, for the metrics file."""
    counts: dict[str, dict[str, dict[str, object]]] = {}
    for (role, split), group in splits.groupby(["role", "split"], sort=True):
        per_class = {str(k): int(v) for k, v in group["label"].value_counts().sort_index().items()}
        counts.setdefault(str(role), {})[str(split)] = {"total": len(group), "classes": per_class}
    return counts


def render_summary(splits: pd.DataFrame) -> str:
    """The Markdown report: images per class in each split, for each role."""
    lines = ["# Split summary", ""]
    for role, rows in splits.groupby("role", sort=True):
        table = pd.crosstab(rows["label"], rows["split"], margins=True, margins_name="total")
        table = table.reindex(columns=[c for c in (*schemas.SPLITS, "total") if c in table])
        lines += [f"## {role}", "", *markdown_table(table, "class"), ""]
    return "\n".join(lines)
