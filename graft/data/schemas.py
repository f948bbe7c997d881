"""pandera schemas for every table that crosses a stage boundary.

Stages validate what they write and what they read, so a malformed table is a clear error at
the boundary instead of a silent drop further down.
"""

from __future__ import annotations

import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaError, SchemaErrors

from graft.config.settings import ROLES
from graft.errors import GraftError

# The fixed vocabulary of ingest verdicts (documented in the README).
VERDICTS = (
    "accepted",
    "zero_byte",
    "not_image",
    "corrupt",
    "unsupported",
    "too_small",
    "too_large",
    "timeout",
    "unreadable",
    "duplicate",
    "label_conflict",
)
SPLITS = ("train", "val", "test")

_SHA256 = pa.Check.str_matches(r"^[0-9a-f]{64}$")
_PHASH = pa.Check.str_matches(r"^[0-9a-f]{16}$")  # 64-bit, graft.data.near_duplicates
_NON_EMPTY = pa.Check.str_length(min_value=1)

MANIFEST = pa.DataFrameSchema(
    {
        "role": pa.Column(str, pa.Check.isin(ROLES)),
        "path": pa.Column(str, _NON_EMPTY),
        "sha256": pa.Column(str, _SHA256, nullable=True),
        "label": pa.Column(str, _NON_EMPTY),
        "width": pa.Column("Int64", pa.Check.gt(0), nullable=True),
        "height": pa.Column("Int64", pa.Check.gt(0), nullable=True),
        "mode": pa.Column(str, nullable=True),
        "format": pa.Column(str, nullable=True),
        "bytes": pa.Column("Int64", pa.Check.ge(0), nullable=True),
        "phash": pa.Column(str, _PHASH, nullable=True),
        "verdict": pa.Column(str, pa.Check.isin(VERDICTS)),
        "reason": pa.Column(str, nullable=True),
    },
    checks=[
        pa.Check(
            lambda df: (
                (df["verdict"] != "accepted")
                | (df["sha256"].notna() & df["width"].notna() & df["format"].notna())
            ),
            error="accepted rows need sha256, size and format",
        ),
        pa.Check(
            lambda df: ~df[df["verdict"] == "accepted"].duplicated(["role", "sha256"]).any(),
            error="an accepted image appears twice in one role",
        ),
    ],
    unique=["role", "path"],
    strict=True,
    ordered=True,
    name="manifest",
)

SPLITS_TABLE = pa.DataFrameSchema(
    {
        "role": pa.Column(str, pa.Check.isin(ROLES)),
        "sha256": pa.Column(str, _SHA256),
        "label": pa.Column(str, _NON_EMPTY),
        "split": pa.Column(str, pa.Check.isin(SPLITS)),
        "path": pa.Column(str, _NON_EMPTY),
    },
    unique=["role", "sha256"],
    strict=True,
    ordered=True,
    name="splits",
)

PREDICTIONS = pa.DataFrameSchema(
    {
        "sha256": pa.Column(str, _SHA256),
        "path": pa.Column(str, _NON_EMPTY),
        "actual": pa.Column(str, _NON_EMPTY),
        "predicted": pa.Column(str, _NON_EMPTY),
        "confidence": pa.Column(float, pa.Check.in_range(0.0, 1.0)),
    },
    unique=["sha256"],
    strict=True,
    ordered=True,
    name="predictions",
)


class TableError(GraftError):
    """A table at a stage boundary does not match its schema."""


def validate(frame: pd.DataFrame, schema: pa.DataFrameSchema, where: str) -> pd.DataFrame:
    """``frame`` checked against ``schema`` (coerced to its dtypes), all problems at once.

    Raises TableError naming ``where`` and listing up to ten failing cases.
    """
    try:
        return schema.validate(frame, lazy=True)
    except SchemaErrors as errors:
        cases = errors.failure_cases.head(10).to_string(index=False)
        raise TableError(f"{where}: the {schema.name} table is invalid:\n{cases}") from None
    except SchemaError as error:
        raise TableError(f"{where}: the {schema.name} table is invalid: {error}") from None


def read_table(path: str | object, schema: pa.DataFrameSchema) -> pd.DataFrame:
    """Read a CSV written by a stage and validate it against its schema.

    Empty cells are missing values; every other cell is read as the schema's dtype says.
    Raises TableError when the table does not match, and OSError when it cannot be read.
    """
    dtypes = {name: column.dtype.type for name, column in schema.columns.items()}
    frame = pd.read_csv(path, dtype=dtypes, keep_default_na=False, na_values=[""])  # type: ignore[arg-type]
    return validate(frame, schema, where=str(path))
