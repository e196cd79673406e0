"""pgml.logs holds the lines about a job (kind info/warning/error) beside its training rows, and a resume moves the
training rows it repeats into pgml.superseded_logs (migration 0018), each as the real roles do it: the user submits,
the worker claims and requeues, the child (its ticket) logs and resumes."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgml_tuned.child import writes
from pgml_tuned.db import q
from pgml_tuned.errors import LeaseLost
from tests.conftest import OTHER_USER, as_login, connect
from tests.security.test_child_access import issue, start, submit

Conn = psycopg.Connection[dict[str, Any]]
GUIDE = (  # the guide's loss query, verbatim but for the model id
    "SELECT logs->>'epoch' AS epoch, logs->>'step' AS step, logs->>'loss' AS loss FROM pgml.logs "
    "WHERE model_id = {} AND jsonb_exists(logs, 'loss');"
)


def train_rows(steps: range, attempt: int, first_seq: int = 1) -> list[writes.LogRow]:
    return [
        (first_seq + i, "train", {"loss": 1.0 / s, "step": s, "max_steps": 10, "epoch": s / 10, "attempt": attempt})
        for i, s in enumerate(steps)
    ]


def lines(conn: Conn, job: int) -> list[tuple[str, str]]:
    rows = conn.execute(
        "SELECT kind, logs->>'message' AS m FROM pgml.logs WHERE job_id = %s AND kind <> 'train' ORDER BY id", (job,)
    )
    return [(r["kind"], r["m"]) for r in rows]


def test_a_resume_moves_the_repeated_steps_apart_atomically(
    conn: Conn, su: Conn, su_dsn: str, worker_dsn: str, child_dsn: str
) -> None:
    job = submit(conn, "reviews_r")
    with connect(worker_dsn) as worker, connect(child_dsn) as child:
        first = start(worker, "first")
        # attempt 1 trains to step 7 (its checkpoint is at step 5), says so, and is interrupted with a summary
        writes.append_logs(child, job["job_id"], "first", train_rows(range(1, 8), 1), {"step": 7})
        summary = {"train_runtime": 1.5, "train_loss": 0.4, "step": 7, "max_steps": 10}
        writes.append_logs(
            child, job["job_id"], "first", [(8, "train", summary), (9, "info", {"message": "read 10 rows"})], {}
        )
        assert worker.execute(q("requeue_job"), {"id": job["job_id"], "attempt": 1}).fetchone() is not None
        second = worker.execute(q("claim_job"), {"worker": "w2", "lease_seconds": 60, "free_gpus": 0}).fetchone()
        assert second is not None and second["attempt"] == 2 and issue(worker, second, "second")
        entry = {"message": "resuming from the checkpoint at step 5 (stored by attempt 1)", "from_step": 5}
        assert writes.resume(child, job["job_id"], "second", 5, 1, entry) == 3  # steps 6, 7 and the summary
        assert writes.resume(child, job["job_id"], "second", 5, 1, entry) == 0  # a retry moves and adds nothing
        with pytest.raises(LeaseLost):  # attempt 1's ticket can neither log nor resume any more
            writes.resume(child, job["job_id"], "first", 0, 99, entry)
        writes.append_logs(child, job["job_id"], "second", train_rows(range(6, 11), 2, first_seq=2), {"step": 10})

    # the guide's query: each step once, steps 1-5 from attempt 1, 6-10 from attempt 2
    steps = conn.execute(GUIDE.format(job["model_id"])).fetchall()
    assert [int(r["step"]) for r in steps] == list(range(1, 11))
    attempts = conn.execute(
        "SELECT (logs->>'attempt')::int AS a FROM pgml.logs WHERE job_id = %s AND kind = 'train' ORDER BY id",
        (job["job_id"],),
    )
    assert [r["a"] for r in attempts] == [1] * 5 + [2] * 5
    # what moved is kept apart, readable by the submitter
    moved = conn.execute(
        "SELECT attempt, seq, superseded_by, resumed_from_step, logs FROM pgml.superseded_logs WHERE job_id = %s "
        "ORDER BY id",
        (job["job_id"],),
    ).fetchall()
    assert [(r["attempt"], r["seq"], r["superseded_by"], r["resumed_from_step"]) for r in moved] == [
        (1, 6, 2, 5),
        (1, 7, 2, 5),
        (1, 8, 2, 5),
    ]
    assert moved[-1]["logs"] == summary
    # the lines about the job, in order: the worker's transitions (trigger) and the child's lines
    assert lines(conn, job["job_id"]) == [
        ("info", "claimed by worker w (attempt 1)"),
        ("info", "read 10 rows"),
        (
            "info",
            "requeued by worker w: attempt 1 stopped before the end; the next attempt resumes from the job's "
            "latest checkpoint",
        ),
        ("info", "claimed by worker w2 (attempt 2)"),
        (
            "info",
            "resuming from the checkpoint at step 5 (stored by attempt 1); the 3 log rows of earlier attempts "
            "past step 5 are now in pgml.superseded_logs",
        ),
    ]
    assert first["attempt"] == 1
    # another user sees neither the job's lines nor what was superseded
    with connect(as_login(su_dsn, OTHER_USER)) as other:
        assert other.execute("SELECT count(*) AS n FROM pgml.logs WHERE job_id = %s", (job["job_id"],)).fetchone() == {
            "n": 0
        }
        assert other.execute("SELECT count(*) AS n FROM pgml.superseded_logs").fetchone() == {"n": 0}
    assert su.execute("SELECT count(*) AS n FROM pgml.superseded_logs").fetchone() == {"n": 3}


def test_a_child_writes_info_and_warning_rows_only(conn: Conn, worker_dsn: str, child_dsn: str) -> None:
    job = submit(conn, "reviews_k")
    with connect(worker_dsn) as worker, connect(child_dsn) as child:
        start(worker, "t")
        for kind in ("error", "debug", ""):  # the job's failure is the worker's to record, never a child's
            with pytest.raises(psycopg.errors.InvalidParameterValue):
                writes.append_logs(child, job["job_id"], "t", [(1, kind, {"message": "failed: forged"})], {})
        writes.append_logs(child, job["job_id"], "t", [(1, "warning", {"message": "careful"})], {})
        assert worker.execute(q("fail_job"), {"id": job["job_id"], "attempt": 1, "error": "it broke"}).fetchone()
    assert lines(conn, job["job_id"]) == [
        ("info", "claimed by worker w (attempt 1)"),
        ("warning", "careful"),
        ("error", "failed: it broke"),
    ]
