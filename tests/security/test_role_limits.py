"""Per-role limits (pgml.role_limits): what one user may make the queue hold, run and store."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgml_tuned.child import writes
from pgml_tuned.db import q
from pgml_tuned.errors import JobError
from tests.conftest import USER, connect

HP = json.dumps({"dataset_args": {"text_column": "text", "class_column": "class"}})


@pytest.fixture
def reviews(conn: psycopg.Connection[dict[str, Any]]) -> str:
    conn.execute("CREATE TABLE reviews (text text, class text)")
    conn.execute("INSERT INTO reviews SELECT repeat('word ', 20) || i, (i % 2)::text FROM generate_series(1, 50) i")
    return "public.reviews"


def tune(conn: psycopg.Connection[dict[str, Any]], project: str = "p") -> int:
    row = conn.execute(
        "SELECT job_id FROM pgml.tune(%s, task => 'text-classification', relation_name => 'public.reviews', "
        "model_name => 'm', hyperparams => %s::jsonb)",
        (project, HP),
    ).fetchone()
    assert row is not None
    return int(row["job_id"])


def limit(su: psycopg.Connection[dict[str, Any]], **values: Any) -> None:
    su.execute("INSERT INTO pgml.role_limits (role) VALUES (%s) ON CONFLICT DO NOTHING", (USER,))
    for column, value in values.items():
        su.execute(f"UPDATE pgml.role_limits SET {column} = %s WHERE role = %s", (value, USER))


def test_users_have_limits_by_default(conn: psycopg.Connection[dict[str, Any]]) -> None:
    row = conn.execute("SELECT * FROM pgml.role_limits WHERE role = 'pgml_user'").fetchone()
    assert row is not None and all(row[k] is not None for k in row)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("UPDATE pgml.role_limits SET max_queued = 1000000")


def test_queued_jobs_and_snapshot_bytes(
    conn: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]], reviews: str
) -> None:
    limit(su, max_queued=2)
    tune(conn, "a"), tune(conn, "b")
    with pytest.raises(psycopg.errors.ProgramLimitExceeded, match=r"has 2 jobs in the queue; the limit for \S+ is 2"):
        tune(conn, "c")
    conn.execute("SELECT pgml.cancel(j.id) FROM pgml.jobs j")
    limit(su, max_snapshot_bytes=1000)
    with pytest.raises(psycopg.errors.ProgramLimitExceeded, match=r"rows are [\d.]+ MB; the limit for .* is 0.0 MB"):
        tune(conn, "d")
    assert su.execute("SELECT count(*) AS n FROM pgml.jobs WHERE status NOT IN ('cancelled')").fetchone() == {"n": 0}


def test_running_jobs_runtime_and_checkpoints(
    conn: psycopg.Connection[dict[str, Any]],
    worker_dsn: str,
    child_dsn: str,
    reviews: str,
    tmp_path: Path,
    su: psycopg.Connection[dict[str, Any]],
) -> None:
    limit(su, max_running=1, max_runtime="1 second", max_checkpoint_bytes=1000)
    first, second = tune(conn, "a"), tune(conn, "b")
    with connect(worker_dsn) as worker:
        claim = {"worker": "w", "lease_seconds": 30, "free_gpus": 0}
        got = worker.execute(q("claim_job"), claim).fetchone()
        assert got is not None and got["id"] == first
        assert worker.execute(q("claim_job"), claim).fetchone() is None  # the submitter is at its max_running
        time.sleep(1.2)
        renewal = worker.execute(q("renew_leases"), {"ids": [first], "attempts": [1], "lease_seconds": 30}).fetchone()
        assert renewal is not None and renewal["overtime"] is True
        (tmp_path / "big.bin").write_bytes(b"x" * 5000)
        worker.execute(q("set_child_ticket"), {"id": first, "attempt": 1, "hash": hashlib.sha256(b"t").digest()})
        with (
            connect(child_dsn) as child,
            pytest.raises(JobError, match="checkpoints would hold 0 MB in PostgreSQL; its submitter may keep 0 MB"),
        ):
            writes.store_checkpoint(child, first, "t", 10, tmp_path, keep=2)
        assert su.execute("SELECT count(*) AS n FROM pgml.checkpoints").fetchone() == {"n": 0}
    assert su.execute("SELECT status FROM pgml.jobs WHERE id = %s", (second,)).fetchone() == {"status": "queued"}
