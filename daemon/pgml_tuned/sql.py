"""Loads SQL from sql/: migrations (files) and queries.sql (named blocks: `-- name: claim_job`)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

SQL_DIR = Path(__file__).resolve().parent / "sql"
_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.M)


@cache
def queries() -> dict[str, str]:
    text = (SQL_DIR / "queries.sql").read_text()
    parts = _NAME.split(text)
    named = {parts[i]: parts[i + 1].strip().rstrip(";") for i in range(1, len(parts), 2)}
    return named


def q(name: str) -> str:
    """The named query `name` from sql/queries.sql."""
    try:
        return queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in {SQL_DIR / 'queries.sql'}") from None


def migrations() -> list[tuple[str, str]]:
    """(version, sql) of every migration, in order."""
    files = sorted((SQL_DIR / "migrations").glob("[0-9][0-9][0-9][0-9]_*.sql"))
    return [(f.stem, f.read_text()) for f in files]
