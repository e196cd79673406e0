"""Limits the worker enforces on what a job may make it do."""

from __future__ import annotations

from typing import Any

import psycopg

from tests.conftest import wait_job


def test_a_read_that_never_ends_fails_the_job(conn: psycopg.Connection[dict[str, Any]], daemon: Any) -> None:
    conn.execute(
        "CREATE VIEW slow_reviews AS SELECT 'review ' || i AS text, (i % 2)::text AS class "
        "FROM generate_series(1, 20) i, LATERAL pg_sleep(0.5) s"
    )
    row = conn.execute(
        "SELECT job_id FROM pgml.tune('slow', task => 'text-classification', relation_name => 'public.slow_reviews',"
        " model_name => 'distilbert-base-uncased', hyperparams => "
        '\'{"dataset_args": {"text_column": "text", "class_column": "class"}}\')'
    ).fetchone()
    assert row is not None
    daemon("--drain", env={"PGML_READ_TIMEOUT_SECONDS": "1"}).wait(60)
    job = wait_job(conn, row["job_id"], 10)
    assert job["status"] == "failed" and "took longer than 1 s" in job["error"], job["error"]
    assert "PGML_READ_TIMEOUT_SECONDS" in job["error"]
