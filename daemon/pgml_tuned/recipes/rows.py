"""Checks every recipe makes of the rows it read, before anything is trained: enough rows, and no NULL or
empty value where the task needs one. A bad row fails the job naming the row, the column and the fix."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import JobError


def check_rows(
    rows: Sequence[tuple[str | None, ...]],
    columns: Sequence[str],
    relation: str,
    *,
    nullable: Sequence[str] = (),
    non_empty: Sequence[str] = (),
) -> None:
    """At least 2 rows (one to train, one to test); a value in every column but `nullable`; text that is not
    blank in the `non_empty` columns."""
    if len(rows) < 2:
        raise JobError(f"{relation} has {len(rows)} rows; at least 2 are needed (one to train, one to test)")
    for i, row in enumerate(rows, start=1):
        for column, value in zip(columns, row, strict=True):
            if value is None and column not in nullable:
                fix = f"WHERE {column} IS NOT NULL" + (f" AND {column} <> ''" if column in non_empty else "")
                raise JobError(
                    f"row {i} of {relation} has NULL in column {column!r}; filter such rows out in a view ({fix})"
                )
            if value is not None and column in non_empty and not value.strip():
                raise JobError(
                    f"row {i} of {relation} has empty text in column {column!r}; filter such rows out "
                    f"in a view (WHERE {column} IS NOT NULL AND {column} <> '')"
                )
