"""The queue as users and ops see it: NOTIFY pickup, exactly-once under two daemons, failures, drain."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import psycopg
import pytest

from tests.conftest import job_children, job_row, wait_for, wait_job


@pytest.fixture
def conn(ops: psycopg.Connection[dict[str, Any]]) -> psycopg.Connection[dict[str, Any]]:
    """These tests drive the queue with the diagnostic `noop` task: an administrator's (pgml_admin)."""
    return ops


def submit_noop(conn: psycopg.Connection[dict[str, Any]], project: str = "ops", **hp: Any) -> int:
    row = conn.execute(
        "SELECT job_id FROM pgml.tune(%s, task => 'noop', model_name => 'none', hyperparams => %s::jsonb)",
        (project, json.dumps(hp)),
    ).fetchone()
    return int(row["job_id"])


@pytest.mark.serial  # pickup within 2 s
def test_notify_wakes_an_idle_daemon(conn: psycopg.Connection[dict[str, Any]], daemon: Any) -> None:
    d = daemon("--poll-seconds", "60")  # the fallback poll cannot be what picks the job up
    wait_for(lambda: "daemon.start" in d.output(), 30, what="daemon start")
    time.sleep(1.0)  # idle
    t0 = time.monotonic()
    job = submit_noop(conn)
    wait_for(lambda: job_row(conn, job)["status"] != "queued", 10, interval=0.005)
    assert time.monotonic() - t0 < 2.0
    assert wait_job(conn, job, 30)["status"] == "succeeded"


def test_lost_notify_is_picked_up_by_the_poll(conn: psycopg.Connection[dict[str, Any]], daemon: Any) -> None:
    d = daemon("--poll-seconds", "0.5")
    wait_for(lambda: "daemon.start" in d.output(), 30)
    # queue a job without NOTIFY, as if the notification was lost
    conn.execute("BEGIN")
    job = submit_noop(conn)
    conn.execute("COMMIT")
    conn.execute("SELECT pg_notify('unrelated', '')")
    assert wait_job(conn, job, 20)["status"] == "succeeded"


def test_two_daemons_fifty_jobs_each_exactly_once(conn: psycopg.Connection[dict[str, Any]], daemon: Any) -> None:
    ids = [submit_noop(conn, seconds=0) for _ in range(50)]
    daemons = [daemon("--concurrency", "4", "--worker-id", f"w{i}") for i in range(2)]
    wait_for(lambda: all(job_row(conn, j)["status"] == "succeeded" for j in ids), 180, interval=0.2, what="all 50 jobs")
    claims = conn.execute(
        "SELECT job_id, count(*) AS n, array_agg(DISTINCT worker) AS workers FROM pgml.job_events "
        "WHERE new_status = 'running' GROUP BY job_id"
    ).fetchall()
    assert len(claims) == 50 and all(c["n"] == 1 for c in claims)
    assert {w for c in claims for w in c["workers"]} == {"w0", "w1"}, "both daemons took work"
    assert all(job_row(conn, j)["attempt"] == 1 for j in ids)
    for d in daemons:
        assert "Traceback" not in d.output()


def test_drain_runs_the_queue_then_exits(conn: psycopg.Connection[dict[str, Any]], daemon: Any) -> None:
    ids = [submit_noop(conn) for _ in range(3)]
    d = daemon("--drain")
    assert d.wait(60) == 0, d.output()
    assert [job_row(conn, j)["status"] for j in ids] == ["succeeded"] * 3


def test_failing_job_is_recorded_and_the_daemon_keeps_serving(
    conn: psycopg.Connection[dict[str, Any]], daemon: Any
) -> None:
    daemon()
    bad = submit_noop(conn, fail="the data was wrong")
    good = submit_noop(conn)
    failed = wait_job(conn, bad)
    assert failed["status"] == "failed" and failed["error"] == "the data was wrong"
    assert failed["errors"][0]["error"] == "the data was wrong"
    assert wait_job(conn, good)["status"] == "succeeded"
    model = conn.execute("SELECT status FROM pgml.models WHERE id = %s", (failed["model_id"],)).fetchone()
    assert model["status"] == "failed"


def child_pids(daemon_pid: int) -> list[int]:
    return [p.pid for p in job_children(daemon_pid)]


def test_killed_child_fails_the_job_daemon_survives(conn: psycopg.Connection[dict[str, Any]], daemon: Any) -> None:
    d = daemon()
    job = submit_noop(conn, seconds=30)
    wait_for(lambda: job_row(conn, job)["status"] == "running", 30)
    for pid in wait_for(lambda: child_pids(d.proc.pid), 10, what="the training child"):
        os.kill(pid, signal.SIGKILL)  # what the OOM killer does
    failed = wait_job(conn, job, 30)
    assert failed["status"] == "failed"
    assert "killed by SIGKILL" in failed["error"] and "OOM" in failed["error"]
    after = submit_noop(conn)
    assert wait_job(conn, after, 30)["status"] == "succeeded"
    assert d.proc.poll() is None
