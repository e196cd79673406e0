"""The SQL half in one place: sql/install.sql names every file, no migration defines what sql/functions defines,
each function has one definition, and sql/schema.sql is what `migrate` makes of a new database (on every major)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

from pgml_tuned import catalog, db
from pgml_tuned.db import SQL_DIR

# statements that belong in sql/functions (re-applied by every migrate), never in a one-time migration
DEFINITIONS = re.compile(
    r"^\s*(CREATE\s+(OR\s+REPLACE\s+)?(FUNCTION|PROCEDURE|VIEW|TRIGGER|EVENT\s+TRIGGER)|GRANT\s+\w+(,\s*\w+)*\s+ON|"
    r"REVOKE\s|COMMENT\s+ON\s+(FUNCTION|PROCEDURE)|ALTER\s+(FUNCTION|PROCEDURE)|ALTER\s+DEFAULT\s+PRIVILEGES)",
    re.I | re.M,
)
ROUTINE = re.compile(r"^\s*CREATE\s+OR\s+REPLACE\s+(?:FUNCTION|PROCEDURE)\s+([\w.]+)\s*\(([^)]*)\)", re.I | re.M)


def code(text: str) -> str:
    """SQL without its comments (-- to the end of a line)."""
    return re.sub(r"--[^\n]*", "", text)


def test_install_sql_names_every_file_in_order() -> None:
    files = db.install_files()
    named = [f.relative_to(SQL_DIR).as_posix() for f in files]
    migrations = sorted(p.relative_to(SQL_DIR).as_posix() for p in (SQL_DIR / "migrations").glob("*.sql"))
    functions = sorted(p.relative_to(SQL_DIR).as_posix() for p in (SQL_DIR / "functions").glob("*.sql"))
    assert [n for n in named if n.startswith("migrations/")] == migrations  # all of them, in version order
    assert sorted(n for n in named if n.startswith("functions/")) == functions
    assert named[-1] == "functions/90_grants.sql"  # grants last
    before = [n for n in named[: named.index(migrations[0])] if n.startswith("functions/")]
    assert before == ["functions/00_table_checks.sql"]  # only what tables' constraints call comes first
    for m in migrations:  # each migration records itself, for psql -f sql/install.sql
        version = Path(m).stem
        assert f"VALUES ('{version}')" in (SQL_DIR / m).read_text(), m


def test_no_migration_defines_a_function_view_trigger_or_grant() -> None:
    for f in sorted((SQL_DIR / "migrations").glob("*.sql")):
        found = [m.group(0).strip() for m in DEFINITIONS.finditer(code(f.read_text()))]
        # role memberships are one-time changes of roles (GRANT role TO role has no ON): not matched
        assert not found, f"{f.name} defines {found[:3]}: that belongs in sql/functions (one home per function)"


def test_every_function_has_one_definition() -> None:
    seen: Counter[tuple[str, str]] = Counter()
    for f in sorted((SQL_DIR / "functions").glob("*.sql")):
        for m in ROUTINE.finditer(code(f.read_text())):
            args = re.sub(r"\s+", " ", m.group(2)).strip()
            seen[(m.group(1).lower(), args)] += 1
    assert len(seen) > 100
    assert [k for k, n in seen.items() if n > 1] == []


def test_the_schema_snapshot_is_what_migrate_makes(su: psycopg.Connection[dict[str, Any]]) -> None:
    """su's database is a copy of the session's template: `migrate` on a new database. A change to sql/migrations
    or sql/functions without `scripts/schema_dump` fails here, with the diff."""
    got = catalog.dump(su)
    want = (SQL_DIR / "schema.sql").read_text()
    if got != want:
        import difflib

        diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True), "sql/schema.sql", "migrate"))
        raise AssertionError(f"sql/schema.sql is out of date (run scripts/schema_dump):\n{diff[:6000]}")


def test_migrate_again_changes_nothing(su_dsn: str, su: psycopg.Connection[dict[str, Any]]) -> None:
    import anyio

    before = catalog.dump(su)
    assert anyio.run(db.migrate, su_dsn) == []
    assert catalog.dump(su) == before
