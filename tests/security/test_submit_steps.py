"""pgml.tune's internal steps called on their own (issue 20, class 5).

pgml.tune runs as its caller (it reads the caller's relation with the caller's rights), so the definer steps it
calls around its INSERT ... SELECT, pgml._submit and pgml._submitted, stay callable by pgml_user. Called directly,
they must not queue more than the queue limit allows, put more than the size limit into a job's table, or leave
a job in 'submitting' (never queued, never dropped); gc removes whatever an older version left so.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from tests.conftest import USER

HP = json.dumps({"dataset_args": {"text_column": "text", "class_column": "class"}})
SUBMIT = (
    "SELECT * FROM pgml._submit('p', 'text-classification', 'public.reviews', NULL, 'm', %s::jsonb, 0.25, 'random', "
    "true, false, 3, 0, 'public', 'public.reviews'::regclass, NULL)"
)
# 3.2 kB of text that does not compress, per row i
BIG = "(SELECT string_agg(md5(i::text || '.' || j::text), '') FROM generate_series(1, 100) j)"


@pytest.fixture
def reviews(conn: psycopg.Connection[dict[str, Any]]) -> str:
    conn.execute("CREATE TABLE reviews (text text, class text)")
    conn.execute("INSERT INTO reviews SELECT 'review ' || i, (i % 2)::text FROM generate_series(1, 8) i")
    return "public.reviews"


def limit(su: psycopg.Connection[dict[str, Any]], **values: Any) -> None:
    """A row of the user's own in pgml.role_limits: these limits, no others."""
    su.execute("INSERT INTO pgml.role_limits (role) VALUES (%s) ON CONFLICT DO NOTHING", (USER,))
    for key, value in values.items():
        su.execute(f"UPDATE pgml.role_limits SET {key} = %s WHERE role = %s", (value, USER))


def job_table(conn: psycopg.Connection[dict[str, Any]], job: int) -> str:
    """The job's table, as the version under test makes it: by pgml._submit, or (older) pgml._job_table_begin."""
    name = f"pgml_rows.job_{job}"
    if conn.execute("SELECT to_regclass(%s) AS t", (name,)).fetchone() == {"t": None}:
        conn.execute("SELECT pgml._job_table_begin(%s)", (job,))
    return name


def one(conn: psycopg.Connection[dict[str, Any]], query: str, params: tuple[Any, ...] = ()) -> dict[str, Any]:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row


def submitting(su: psycopg.Connection[dict[str, Any]]) -> int:
    return int(one(su, "SELECT count(*) AS n FROM pgml.jobs WHERE status = 'submitting'")["n"])


def test_a_job_is_never_committed_while_submitting(
    conn: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]], reviews: str
) -> None:
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="still being submitted"):
        with conn.transaction():
            conn.execute(SUBMIT, (HP,))
    # nor by forcing the check early and swallowing its error
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="still being submitted"):
        with conn.transaction():
            conn.execute(SUBMIT, (HP,))
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState), conn.transaction():
                conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
    assert submitting(su) == 0
    assert su.execute(
        "SELECT count(*) AS n FROM pg_class WHERE relnamespace = 'pgml_rows'::regnamespace"
    ).fetchone() == {"n": 0}
    # pgml.tune itself commits, whatever the caller set before
    conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
    with conn.transaction():
        conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
        row = conn.execute(
            "SELECT * FROM pgml.tune('p', task => 'text-classification', relation_name => 'public.reviews', "
            "model_name => 'm', hyperparams => %s::jsonb)",
            (HP,),
        ).fetchone()
    assert row is not None and row["status"] == "queued"
    # and its table takes no more rows once the job is queued
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(f"INSERT INTO pgml_rows.job_{row['job_id']} (c1, c2) VALUES ('x', '1')")


def test_the_queue_limit_counts_jobs_being_submitted(
    conn: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]], reviews: str
) -> None:
    limit(su, max_queued=3)
    with pytest.raises(
        psycopg.errors.ProgramLimitExceeded, match=f"{USER} has 3 jobs being submitted; the limit for {USER} is 3"
    ):
        with conn.transaction():
            for _ in range(4):
                conn.execute(SUBMIT, (HP,))
    assert submitting(su) == 0


def test_a_job_table_takes_no_more_than_the_size_limit(
    conn: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]], reviews: str
) -> None:
    limit(su, max_snapshot_bytes=200_000)
    # rows put into the job's table directly: not committed without pgml._submitted's check...
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="still being submitted"):
        with conn.transaction():
            job = one(conn, SUBMIT, (HP,))["job_id"]
            conn.execute(
                f"INSERT INTO {job_table(conn, job)} (c1, c2) SELECT {BIG}, '1' FROM generate_series(1, 1000) i"
            )
    assert submitting(su) == 0
    assert one(su, "SELECT count(*) AS n FROM pg_class WHERE relnamespace = 'pgml_rows'::regnamespace") == {"n": 0}
    # ...which refuses them, naming the limit and the fix
    with pytest.raises(psycopg.errors.ProgramLimitExceeded, match=r"the limit for .* is 0\.2 MB \(max_snapshot") as e:
        with conn.transaction():
            job = one(conn, SUBMIT, (HP,))["job_id"]
            conn.execute(
                f"INSERT INTO {job_table(conn, job)} (c1, c2) SELECT {BIG}, '1' FROM generate_series(1, 1000) i"
            )
            conn.execute("SELECT pgml._submitted(%s, 1000)", (job,))
    assert "raise max_snapshot_bytes" in (e.value.diag.message_hint or "")
    # through pgml.tune: the same limit, the same message
    conn.execute(f"INSERT INTO reviews SELECT {BIG}, '1' FROM generate_series(1, 1000) i")
    with pytest.raises(psycopg.errors.ProgramLimitExceeded, match=r"the limit for .* is 0\.2 MB \(max_snapshot"):
        conn.execute(
            "SELECT * FROM pgml.tune('p', task => 'text-classification', relation_name => 'public.reviews', "
            "model_name => 'm', hyperparams => %s::jsonb)",
            (HP,),
        )
    assert submitting(su) == 0


def test_gc_removes_jobs_left_submitting_and_tables_without_a_job(
    su: psycopg.Connection[dict[str, Any]], ops: psycopg.Connection[dict[str, Any]]
) -> None:
    # what an older version let a user leave behind: a committed 'submitting' job with a table full of rows, and a
    # job table whose job is gone
    su.execute("CREATE TABLE public.reviews (text text, class text)")
    su.execute("INSERT INTO public.reviews SELECT 'review ' || i, (i % 2)::text FROM generate_series(1, 8) i")
    with su.transaction():
        su.execute("SET LOCAL session_replication_role = replica")  # no triggers: as before the constraint trigger
        job = one(su, SUBMIT, (HP,))["job_id"]
        table = job_table(su, job)
        su.execute(f"INSERT INTO {table} (c1, c2) SELECT text, class FROM public.reviews")
    su.execute("CREATE TABLE pgml_rows.job_987654 (c1 text)")
    su.execute("ALTER TABLE pgml_rows.job_987654 OWNER TO pgml_owner")
    assert submitting(su) == 1
    listed = ops.execute("SELECT kind, job_id FROM pgml.gc()").fetchall()
    assert {"kind": "submitting", "job_id": job} in listed, listed
    ops.execute("SELECT * FROM pgml.gc(apply => true)").fetchall()
    assert submitting(su) == 0
    assert su.execute("SELECT count(*) AS n FROM pgml.jobs WHERE id = %s", (job,)).fetchone() == {"n": 0}
    assert su.execute("SELECT to_regclass(%s) AS a, to_regclass('pgml_rows.job_987654') AS b", (table,)).fetchone() == {
        "a": None,
        "b": None,
    }
