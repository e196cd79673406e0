"""Following a job from SQL (issue 24): the NOTICE every submission raises (job id, CALL pgml.wait, the dashboard's
link), one INFO line per log row (pgml._log_line, PostgresML's style) in CALL pgml.wait and pgml.tune(..., wait =>
true), and tune(..., wait => true) itself: it submits through the loopback (the job commits while the statement
runs), streams the log rows, returns the final status, raises a failed job's error and cancels the job with the
statement. Jobs that must run use the diagnostic `noop` task (an administrator's); the relation path is checked on a
job no worker takes."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import psycopg
import pytest

from tests.conftest import END_LINE, TRAIN_LINE, USER, as_login, connect, job_row, printed_step, wait_for

Conn = psycopg.Connection[dict[str, Any]]
GUIDE_ROWS = [  # tests/data/fine-tuning-guide.md section 5.3, as the worker logs them
    {
        "loss": 0.3453,
        "grad_norm": 5.230295181274414,
        "learning_rate": 1.9e-05,
        "epoch": 0.25,
        "step": 500,
        "max_steps": 10000,
        "timestamp": "2024-03-07 01:59:15.090612",
    },
    {"loss": 0.223, "learning_rate": 1.6000000000000003e-05, "epoch": 1.0, "step": 2000, "max_steps": 10000},
    {
        "train_runtime": 2359.5335,
        "train_samples_per_second": 67.81,
        "train_steps_per_second": 4.238,
        "train_loss": 0.11267969808578492,
        "epoch": 5.0,
        "step": 10000,
        "max_steps": 10000,
    },
    {
        "eval_loss": 0.3691485524177551,
        "eval_f1": 0.9343711842996372,
        "eval_accuracy": 0.934375,
        "eval_runtime": 41.6167,
        "eval_samples_per_second": 192.23,
        "eval_steps_per_second": 12.014,
        "epoch": 5.0,
        "step": 10000,
        "max_steps": 10000,
    },
]
GUIDE_LINES = [
    "step 500/10000  epoch 0.25  loss 0.3453  grad_norm 5.23  lr 1.9e-05",
    "step 2000/10000  epoch 1.0  loss 0.223  lr 1.6e-05",
    "train  step 10000/10000  epoch 5.0  train_loss 0.1127  train_runtime 2360  train_samples_per_second 67.81  "
    "train_steps_per_second 4.238",
    "eval  step 10000/10000  epoch 5.0  eval_loss 0.3691  eval_accuracy 0.9344  eval_f1 0.9344  eval_runtime 41.62  "
    "eval_samples_per_second 192.23  eval_steps_per_second 12.014",
]


def collect(conn: Conn) -> list[tuple[float, str, str]]:
    seen: list[tuple[float, str, str]] = []
    conn.add_notice_handler(lambda d: seen.append((time.monotonic(), d.severity or "", d.message_primary or "")))
    return seen


def submit_reviews(conn: Conn, **kw: Any) -> dict[str, Any]:
    row = conn.execute(
        "SELECT * FROM pgml.tune('p', task => 'text-classification', relation_name => 'reviews', "
        'model_name => \'some/model\', hyperparams => \'{"dataset_args": {"text_column": "text", '
        '"class_column": "class"}}\'' + "".join(f", {k} => {v}" for k, v in kw.items()) + ")"
    ).fetchone()
    assert row is not None
    return row


def test_log_rows_print_as_one_line_each(conn: Conn) -> None:
    got = [
        conn.execute("SELECT pgml._log_line(%s::jsonb, 'train') AS l", (json.dumps(r),)).fetchone()["l"]
        for r in GUIDE_ROWS
    ]
    assert got == GUIDE_LINES
    assert conn.execute("SELECT pgml._log_line('{\"message\": \"w1 lost\"}', 'warning') AS l").fetchone()["l"] == (
        "warning: w1 lost"
    )
    end = conn.execute(
        'SELECT pgml._job_end_line(3, \'succeeded\', \'{"eval_accuracy": 0.934375, "eval_f1": 0.9343711842996372, '
        '"eval_loss": 0.3691485524177551}\', NULL) AS l'
    ).fetchone()["l"]
    assert end == "job 3 succeeded: eval_loss 0.3691, eval_accuracy 0.9344, eval_f1 0.9344"


def test_submit_notice_names_the_job_and_the_dashboard(conn: Conn, reviews: str) -> None:
    seen = collect(conn)
    job = submit_reviews(conn)["job_id"]
    assert [(s, m) for _, s, m in seen] == [("NOTICE", f"job {job} queued: follow it with CALL pgml.wait({job})")]
    conn.execute("SET pgml.dashboard_url = 'http://db-host:8765/'")  # as ALTER DATABASE ... SET would
    job = submit_reviews(conn)["job_id"]
    assert seen[-1][2] == (
        f"job {job} queued: follow it with CALL pgml.wait({job}), or on the dashboard: http://db-host:8765/#job={job}"
    )
    load = conn.execute("SELECT pgml.load_dataset_async('imdb') AS id").fetchone()["id"]
    assert seen[-1][2].startswith(f"job {load} queued: follow it with CALL pgml.wait({load})")


def test_wait_prints_one_line_per_log_row(conn: Conn, su: Conn, reviews: str) -> None:
    job = submit_reviews(conn)
    conn.execute("SELECT pgml.cancel(%s)", (job["job_id"],))  # ended: pgml.wait prints what is there and returns
    for r in GUIDE_ROWS:
        su.execute(
            "INSERT INTO pgml.logs (model_id, project_id, job_id, attempt, kind, logs) "
            "VALUES (%s, %s, %s, 1, 'train', %s)",
            (job["model_id"], job["project_id"], job["job_id"], json.dumps(r)),
        )
    seen = collect(conn)
    conn.execute("CALL pgml.wait(%s)", (job["job_id"],))
    printed = [m for _, _, m in seen]
    assert printed == [
        f"cancelled before it started (cancelled by {USER})",
        *GUIDE_LINES,
        f"job {job['job_id']} cancelled (cancelled by {USER})",
    ]


def test_wait_true_streams_the_log_and_returns_the_final_status(ops: Conn, daemon: Any) -> None:
    daemon()
    seen = collect(ops)
    row = ops.execute(
        "SELECT * FROM pgml.tune('w', task => 'noop', model_name => 'none', "
        'hyperparams => \'{"seconds": 1.5, "steps": 5}\', wait => true)'
    ).fetchone()
    returned = time.monotonic()
    assert row["status"] == "succeeded" and row["job_id"] > 0
    assert job_row(ops, row["job_id"])["status"] == "succeeded"
    printed = [m for _, _, m in seen]
    job = row["job_id"]
    assert printed[0] == f"job {job} queued: waiting for it (cancelling this statement cancels the job)"
    assert [printed_step(m) for m in printed if TRAIN_LINE.match(m)] == [1, 2, 3, 4, 5], printed
    assert printed[-1] == f"job {job} succeeded: slept 1.5" and END_LINE.match(printed[-1])
    assert {s for _, s, m in seen[1:]} == {"INFO"}
    first_step = next(t for t, _, m in seen if printed_step(m) == 1)
    assert returned - first_step > 0.5, "the lines arrive while the job runs, not all at the end"


def test_wait_true_raises_a_failed_jobs_error(ops: Conn, daemon: Any) -> None:
    daemon()
    with pytest.raises(psycopg.errors.ExternalRoutineException) as e:
        ops.execute(
            "SELECT * FROM pgml.tune('w', task => 'noop', model_name => 'none', "
            'hyperparams => \'{"fail": "the data was wrong"}\', wait => true)'
        )
    job = ops.execute("SELECT max(id) AS id FROM pgml.jobs").fetchone()["id"]
    assert e.value.diag.message_primary == f"job {job} failed: the data was wrong"
    assert e.value.diag.message_hint == f"SELECT errors FROM pgml.jobs WHERE id = {job} shows every attempt"
    assert job_row(ops, job)["status"] == "failed"


def test_wait_true_ships_the_rows_the_caller_reads_and_cancels_with_the_statement(
    conn: Conn, su: Conn, su_dsn: str, reviews: str
) -> None:
    # the caller's rights decide the rows: row-level security on its own table keeps the odd ids out
    conn.execute("ALTER TABLE reviews ENABLE ROW LEVEL SECURITY")
    conn.execute("ALTER TABLE reviews FORCE ROW LEVEL SECURITY")
    conn.execute("CREATE POLICY evens ON reviews USING (id % 2 = 0)")
    caller = connect(as_login(su_dsn, USER))
    caller.autocommit = True
    seen = collect(caller)
    errors: list[BaseException] = []

    def call() -> None:
        try:  # no worker: it waits until the statement is cancelled
            submit_reviews(caller, wait="true")
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=call)
    t.start()
    try:
        # the job is committed and queued while the statement still runs, its rows those the caller may read
        job = wait_for(lambda: su.execute("SELECT * FROM pgml.jobs WHERE status = 'queued'").fetchone(), 30)
        rows = su.execute(f"SELECT c1 FROM pgml_rows.job_{job['id']} ORDER BY n").fetchall()
        assert [r["c1"] for r in rows] == [f"text {i}" for i in range(2, 11, 2)]
        assert job["submitted_by"] == USER and job["snapshot_rows"] == 5
        wait_for(lambda: any("waiting for it" in m for _, _, m in seen), 10)
        caller.cancel()
        t.join(30)
    finally:
        caller.close()
    assert errors and isinstance(errors[0], psycopg.errors.QueryCanceled), errors
    assert job_row(su, job["id"])["status"] == "cancelled"


def test_wait_true_names_an_uncommitted_relation(conn: Conn) -> None:
    conn.execute("BEGIN")
    conn.execute("CREATE TABLE fresh (text text, class text)")
    conn.execute("INSERT INTO fresh VALUES ('a', 'x'), ('b', 'y')")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as e:
        conn.execute(
            "SELECT * FROM pgml.tune('p', task => 'text-classification', relation_name => 'fresh', "
            'model_name => \'m\', hyperparams => \'{"dataset_args": {"text_column": "text", '
            '"class_column": "class"}}\', wait => true)'
        )
    assert e.value.diag.message_primary == (
        "relation 'fresh' is not committed yet: pgml.tune(..., wait => true) submits in a session of its own, "
        "which sees only committed relations"
    )
    assert "COMMIT the transaction that created it first" in (e.value.diag.message_hint or "")
    conn.execute("ROLLBACK")
    assert conn.execute("SELECT count(*) AS n FROM pgml.jobs").fetchone()["n"] == 0, "nothing is left queued"


def test_wait_true_refuses_a_repeatable_read_transaction(conn: Conn, reviews: str) -> None:
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    with pytest.raises(psycopg.errors.InvalidTransactionState) as e:
        submit_reviews(conn, wait="true")
    assert "READ COMMITTED" in (e.value.diag.message_hint or "")
    conn.execute("ROLLBACK")


def test_positional_calls_keep_working(conn: Conn, reviews: str) -> None:
    row = conn.execute(
        "SELECT * FROM pgml.tune('p', 'text-classification', 'reviews', 'class', 'some/model', "
        '\'{"dataset_args": {"text_column": "text"}}\', 0.25, \'stratified\', true, false, 3, 0)'
    ).fetchone()
    assert row["status"] == "queued"
