"""Each job's rows live in a table of its own, pgml_rows.job_<id>: written only by its pgml.tune() call, readable
by its submitter, dropped when the job ends (unless materialize_snapshot) or is deleted, never waited on."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.conftest import OTHER_USER, as_login, connect
from tests.integration.test_tune_validation import tune

Conn = psycopg.Connection[dict[str, Any]]


def tables(su: Conn) -> list[str]:
    rows = su.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'pgml_rows' ORDER BY 1").fetchall()
    return [r["tablename"] for r in rows]


def test_the_job_table_holds_the_rows_and_only_its_submitter_reads_it(
    conn: Conn,
    su: Conn,
    conn_dsn: str,
    reviews: str,
) -> None:
    job = tune(conn)["job_id"]
    assert tables(su) == [f"job_{job}"]
    assert conn.execute("SELECT snapshot_rows FROM pgml.jobs WHERE id = %s", (job,)).fetchone() == {"snapshot_rows": 10}
    rows = conn.execute(f"SELECT c1, c2 FROM pgml_rows.job_{job} ORDER BY c1").fetchall()
    assert len(rows) == 10 and rows[0] == {"c1": "text 1", "c2": "b"}
    # written once: not even its submitter adds or changes rows after pgml.tune() returned
    for statement in (f"INSERT INTO pgml_rows.job_{job} VALUES ('x', 'a')", f"UPDATE pgml_rows.job_{job} SET c2 = 'a'"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("CREATE TABLE pgml_rows.job_999999 (c1 text)")  # nobody takes a future job's name
    with connect(as_login(conn_dsn, OTHER_USER)) as other, pytest.raises(psycopg.errors.InsufficientPrivilege):
        other.execute(f"SELECT * FROM pgml_rows.job_{job}")


def test_a_failed_submission_leaves_no_table(conn: Conn, su: Conn, reviews: str) -> None:
    conn.execute("DELETE FROM public.reviews WHERE id > 1")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="at least 2 are needed"):
        tune(conn)
    assert tables(su) == []


def test_the_table_goes_with_the_job_and_never_makes_its_end_wait(
    conn: Conn,
    su: Conn,
    conn_dsn: str,
    reviews: str,
) -> None:
    first, kept = tune(conn)["job_id"], tune(conn, materialize_snapshot=True)["job_id"]
    assert conn.execute("SELECT pgml.cancel(%s) AS s", (kept,)).fetchone() == {"s": "cancelled"}
    assert tables(su) == [f"job_{first}", f"job_{kept}"]  # materialize_snapshot keeps it
    # the submitter reads the first job's rows in an open transaction: its end does not wait for that lock
    with connect(conn_dsn) as reader:
        reader.execute("BEGIN")
        reader.execute(f"SELECT count(*) FROM pgml_rows.job_{first}")
        assert conn.execute("SELECT pgml.cancel(%s) AS s", (first,)).fetchone() == {"s": "cancelled"}
        assert tables(su) == [f"job_{first}", f"job_{kept}"]  # left for later
        reader.execute("COMMIT")
    third = tune(conn)["job_id"]
    assert conn.execute("SELECT pgml.cancel(%s) AS s", (third,)).fetchone() == {"s": "cancelled"}
    assert tables(su) == [f"job_{first}", f"job_{kept}"]  # a job's end drops its own table, nothing more
    assert su.execute("SELECT pgml._job_tables_sweep() AS n").fetchone() == {"n": 1}  # the workers' pass does
    assert tables(su) == [f"job_{kept}"]
    su.execute("DELETE FROM pgml.jobs WHERE id = %s", (kept,))
    assert tables(su) == []


def test_the_child_reads_the_rows_in_the_order_tune_copied_them(
    conn: Conn, su: Conn, worker_dsn: str, child_dsn: str
) -> None:
    """test_sampling 'last' splits by the copy's order. Rows of very different sizes, copied without two of their
    columns, make the free space map put some later rows on earlier pages of the job table (its physical order
    differs: checked, so this test can fail), and the child still reads them in the order the copy's SELECT
    produced them (migration 0030)."""
    from tests.security.test_child_access import rows, start

    conn.execute("CREATE TABLE public.sized (id bigint, text text, class text, pad bigint)")
    conn.execute(
        "INSERT INTO public.sized SELECT i, i || ' ' || repeat('x', (i * 7919) % 1800), (i % 2)::text, i "
        "FROM generate_series(1, 2000) i"
    )
    conn.execute("SET synchronize_seqscans = off")
    source = [r["text"] for r in conn.execute("SELECT text FROM public.sized")]  # the order the copy's scan saw
    job = tune(conn, relation_name="public.sized")["job_id"]
    physical = [r["c1"] for r in su.execute(f"SELECT c1 FROM pgml_rows.job_{job}")]
    assert sorted(physical) == sorted(source) and physical != source
    with connect(worker_dsn) as worker, connect(child_dsn) as child:
        assert start(worker, "ticket")["id"] == job
        assert [v[0] for v in rows(child, job, "ticket")] == source


def test_only_the_end_of_a_job_with_rows_looks_for_job_tables(su: Conn, conn: Conn, reviews: str) -> None:
    """0031: the search through pgml_rows (~170 us) runs at the end of a job that had rows, not of one without."""

    def searches_at_cancel(job: int) -> int:
        with su.transaction():
            su.execute("SET LOCAL track_functions = 'all'")  # this transaction's calls: pg_stat_xact_user_functions
            assert su.execute("SELECT pgml.cancel(%s) AS s", (job,)).fetchone() == {"s": "cancelled"}
            row = su.execute(
                "SELECT coalesce(sum(calls), 0)::int AS n FROM pg_stat_xact_user_functions "
                "WHERE schemaname = 'pgml' AND funcname = '_job_tables_drop'"
            ).fetchone()
        assert row is not None
        return int(row["n"])

    without_rows = su.execute(
        "SELECT job_id FROM pgml.tune('no rows', task => 'noop', model_name => 'none')"
    ).fetchone()
    assert without_rows is not None
    assert searches_at_cancel(without_rows["job_id"]) == 0
    with_rows = tune(conn)["job_id"]
    assert tables(su) == [f"job_{with_rows}"]
    assert searches_at_cancel(with_rows) == 1
    assert tables(su) == []
