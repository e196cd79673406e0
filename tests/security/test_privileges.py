"""Every role's privileges on every object of pgml-tuned, against one table: tests/security/privileges.tsv.

The table has a line per schema, function, procedure, table, view and sequence of schemas pgml and pgml_rows, and
a column per role: PUBLIC, every NOLOGIN role named pgml_*, and any role holding a grant of its own on one of
them (the database's loopback login as `loopback_login`); pgml_owner owns them all and is left out. Each cell is
what that role may do, as PostgreSQL answers has_*_privilege (so inherited rights count: pgml_admin is a member
of pgml_user, pgml_worker of pgml_child):

    functions, procedures  X execute
    tables, views          r select, a insert, w update, d delete, D truncate, x references, t trigger
    sequences              U usage, r select, w update
    schemas                U usage, C create
    .                      nothing (default deny: written out, like every other decision)

The test compares both ways: an object or role of the database without a line or column in the table fails (the
message gives the line as the database has it now, to check and paste), as does a line of the table for an object
that no longer exists, and every cell that differs. `python -m tests.security.test_privileges DSN` prints the
whole table as DSN's database has it (to review as a diff, never to paste unread).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import psycopg

TABLE = Path(__file__).with_name("privileges.tsv")
OWNER = "pgml_owner"

# one row per (object, role): the object's kind, its name (schema-qualified, functions with their argument types)
# and the privileges of the role on it, in the letters above
QUERY = """
WITH roles AS (
    SELECT 'public'::text AS role  -- as has_*_privilege spells PUBLIC
    UNION ALL
    SELECT r.rolname::text FROM pg_catalog.pg_roles r
    WHERE r.rolname LIKE 'pgml\\_%%' AND NOT r.rolcanlogin AND r.rolname <> %(owner)s
    UNION  -- and any role, login or not, that holds a grant of its own on an object here
    SELECT a.grantee::regrole::text
    FROM (SELECT c.relacl AS acl FROM pg_catalog.pg_class c
          WHERE c.relnamespace::regnamespace::text IN ('pgml', 'pgml_rows')
          UNION ALL
          SELECT p.proacl FROM pg_catalog.pg_proc p WHERE p.pronamespace::regnamespace::text IN ('pgml', 'pgml_rows')
          UNION ALL
          SELECT n.nspacl FROM pg_catalog.pg_namespace n WHERE n.nspname IN ('pgml', 'pgml_rows')) o,
         LATERAL pg_catalog.aclexplode(o.acl) a
    WHERE a.grantee <> 0 AND a.grantee::regrole::text <> %(owner)s
), objects AS (
    SELECT 'schema' AS kind, n.oid, n.nspname::text AS name FROM pg_catalog.pg_namespace n
    WHERE n.nspname IN ('pgml', 'pgml_rows')
    UNION ALL
    SELECT CASE p.prokind WHEN 'p' THEN 'procedure' ELSE 'function' END, p.oid, p.oid::regprocedure::text
    FROM pg_catalog.pg_proc p WHERE p.pronamespace::regnamespace::text IN ('pgml', 'pgml_rows')
    UNION ALL
    SELECT CASE c.relkind WHEN 'S' THEN 'sequence' WHEN 'v' THEN 'view' WHEN 'm' THEN 'view' ELSE 'table' END,
           c.oid, c.oid::regclass::text
    FROM pg_catalog.pg_class c
    WHERE c.relnamespace::regnamespace::text IN ('pgml', 'pgml_rows') AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
)
SELECT o.kind, o.name,
       CASE WHEN r.role = 'public' THEN 'PUBLIC'
            -- the database's own loopback login (its name differs from one database to the next)
            WHEN r.role = (SELECT l.login::text FROM pgml.loopback_login l) THEN 'loopback_login'
            ELSE r.role END,
       CASE o.kind
           WHEN 'schema' THEN
               CASE WHEN pg_catalog.has_schema_privilege(r.role, o.oid, 'USAGE') THEN 'U' ELSE '' END
               || CASE WHEN pg_catalog.has_schema_privilege(r.role, o.oid, 'CREATE') THEN 'C' ELSE '' END
           WHEN 'sequence' THEN
               CASE WHEN pg_catalog.has_sequence_privilege(r.role, o.oid, 'USAGE') THEN 'U' ELSE '' END
               || CASE WHEN pg_catalog.has_sequence_privilege(r.role, o.oid, 'SELECT') THEN 'r' ELSE '' END
               || CASE WHEN pg_catalog.has_sequence_privilege(r.role, o.oid, 'UPDATE') THEN 'w' ELSE '' END
           WHEN 'table' THEN
               (SELECT pg_catalog.string_agg(CASE WHEN pg_catalog.has_table_privilege(r.role, o.oid, p.name)
                                                  THEN p.letter ELSE '' END, '' ORDER BY p.i)
                FROM (VALUES (1, 'SELECT', 'r'), (2, 'INSERT', 'a'), (3, 'UPDATE', 'w'), (4, 'DELETE', 'd'),
                             (5, 'TRUNCATE', 'D'), (6, 'REFERENCES', 'x'), (7, 'TRIGGER', 't')) AS p (i, name, letter))
           WHEN 'view' THEN
               (SELECT pg_catalog.string_agg(CASE WHEN pg_catalog.has_table_privilege(r.role, o.oid, p.name)
                                                  THEN p.letter ELSE '' END, '' ORDER BY p.i)
                FROM (VALUES (1, 'SELECT', 'r'), (2, 'INSERT', 'a'), (3, 'UPDATE', 'w'), (4, 'DELETE', 'd'),
                             (5, 'TRUNCATE', 'D'), (6, 'REFERENCES', 'x'), (7, 'TRIGGER', 't')) AS p (i, name, letter))
           ELSE CASE WHEN pg_catalog.has_function_privilege(r.role, o.oid, 'EXECUTE') THEN 'X' ELSE '' END
       END AS privileges
FROM objects o CROSS JOIN roles r
ORDER BY o.kind, o.name, r.role
"""


def actual(conn: psycopg.Connection[Any]) -> tuple[list[str], dict[tuple[str, str], dict[str, str]]]:
    """The roles, and per (kind, object) the privileges of each role, as the database has them."""
    conn.execute("SET search_path = pg_catalog")  # every name printed schema-qualified
    rows = conn.execute(QUERY, {"owner": OWNER}).fetchall()
    roles = sorted({r[2] for r in rows}, key=lambda r: (r != "PUBLIC", r))
    table: dict[tuple[str, str], dict[str, str]] = {}
    for kind, name, role, privileges in rows:
        table.setdefault((kind, name), {})[role] = privileges or "."
    return roles, table


def expected() -> tuple[list[str], dict[tuple[str, str], dict[str, str]]]:
    lines = [ln for ln in TABLE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    header = lines[0].split("\t")
    assert header[:2] == ["kind", "object"], f"{TABLE}: the first line names the columns: kind, object, roles..."
    roles = header[2:]
    table: dict[tuple[str, str], dict[str, str]] = {}
    for line in lines[1:]:
        cells = line.split("\t")
        assert len(cells) == len(header), f"{TABLE}: {line!r} has {len(cells)} cells, not {len(header)}"
        assert (cells[0], cells[1]) not in table, f"{TABLE}: {cells[1]} is listed twice"
        table[(cells[0], cells[1])] = dict(zip(roles, cells[2:], strict=True))
    return roles, table


def line(kind: str, name: str, roles: list[str], privileges: dict[str, str]) -> str:
    return "\t".join([kind, name, *(privileges.get(r, "?") for r in roles)])


def render(roles: list[str], table: dict[tuple[str, str], dict[str, str]]) -> str:
    rows = [line(k, n, roles, p) for (k, n), p in sorted(table.items())]
    return "\n".join(["\t".join(["kind", "object", *roles]), *rows]) + "\n"


def differences(conn: psycopg.Connection[Any]) -> list[str]:
    """What the database and the table disagree on, each with where to fix it."""
    roles, have = actual(conn)
    want_roles, want = expected()
    problems = []
    if missing := [r for r in roles if r not in want_roles]:
        problems.append(f"roles with no column in {TABLE.name}: {missing} (add a column: what may each do?)")
    if stale := [r for r in want_roles if r not in roles]:
        problems.append(f"columns of {TABLE.name} for roles that do not exist: {stale}")
    for key in sorted(have.keys() - want.keys()):
        problems.append(
            f"no decision in {TABLE.name} for {key[0]} {key[1]}; the database has:\n"
            f"    {line(*key, want_roles, have[key])}"
        )
    for key in sorted(want.keys() - have.keys()):
        problems.append(f"{TABLE.name} lists {key[0]} {key[1]}, which does not exist (remove its line)")
    for key in sorted(have.keys() & want.keys()):
        diff = {r: (want[key][r], have[key].get(r)) for r in want_roles if r in roles and want[key][r] != have[key][r]}
        if diff:
            problems.append(
                f"{key[0]} {key[1]}: " + ", ".join(f"{r} should have {w!r}, has {h!r}" for r, (w, h) in diff.items())
            )
    return problems


def test_every_role_on_every_object_is_as_the_table_says(su: psycopg.Connection[Any]) -> None:
    with psycopg.connect(su.info.dsn, autocommit=True) as conn:  # plain tuples
        problems = differences(conn)
    assert not problems, f"{len(problems)} privileges differ from {TABLE}:\n" + "\n".join(problems)


def test_a_new_role_or_object_without_a_decision_fails(su: psycopg.Connection[Any]) -> None:
    with psycopg.connect(su.info.dsn) as conn, conn.transaction(force_rollback=True):
        conn.execute("CREATE ROLE pgml_zz_new NOLOGIN")
        conn.execute("CREATE ROLE zz_login LOGIN")
        conn.execute("GRANT SELECT ON pgml.tasks TO zz_login")
        conn.execute("CREATE FUNCTION pgml.zz_new() RETURNS int LANGUAGE sql AS 'SELECT 1'")
        conn.execute("CREATE TABLE pgml_rows.job_0 (c1 text)")
        problems = differences(conn)
    assert problems[0].startswith(f"roles with no column in {TABLE.name}: ['pgml_zz_new', 'zz_login']"), problems
    assert any(p.startswith(f"no decision in {TABLE.name} for function pgml.zz_new()") for p in problems), problems
    assert any(p.startswith(f"no decision in {TABLE.name} for table pgml_rows.job_0") for p in problems), problems


# pgml_user executes no internal function but these; each has its reason in sql/functions/90_grants.sql
USER_INTERNAL = [
    "pgml._dataset_kwargs()",
    "pgml._dataset_result(bigint)",
    "pgml._job_end_line(bigint,text,jsonb,text)",
    "pgml._job_follow(bigint,bigint,text)",
    "pgml._job_queued_notice(bigint,boolean)",
    "pgml._log_line(jsonb,text)",
    "pgml._log_pairs(jsonb,text[],text[],text)",
    "pgml._log_value(text,jsonb)",
    "pgml._own_project_ref(text,name)",
    "pgml._request_abandon(bigint)",
    "pgml._request_answer(bigint)",
    "pgml._request_chunks(bigint,integer)",
    "pgml._retrieval_call(text,text,jsonb)",
    "pgml._submit(text,text,text,text,text,jsonb,double precision,text,boolean,boolean,integer,integer,text,oid,text)",
    "pgml._submitted(bigint,bigint)",
    "pgml._tune_loopback(text,bigint,jsonb)",
    "pgml._wait_advice(bigint)",
]


def test_pgml_user_calls_no_internal_function_but_those_with_a_reason(su: psycopg.Connection[Any]) -> None:
    su.execute("SET search_path = pg_catalog")
    rows = su.execute(
        "SELECT p.oid::regprocedure::text AS f FROM pg_proc p WHERE p.pronamespace = 'pgml'::regnamespace "
        "AND p.proname LIKE '\\_%' AND has_function_privilege('pgml_user', p.oid, 'EXECUTE') ORDER BY 1"
    ).fetchall()
    assert [r["f"] for r in rows] == USER_INTERNAL
    _, want = expected()  # and the table says the same
    assert USER_INTERNAL == sorted(
        n for (k, n), p in want.items() if n.startswith("pgml._") and k == "function" and p["pgml_user"] == "X"
    )


if __name__ == "__main__":
    with psycopg.connect(sys.argv[1]) as c:
        sys.stdout.write(render(*actual(c)))
