"""Crash safety: checkpoints in PostgreSQL, resume after SIGKILL, SIGTERM requeue, cancel, wait."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import ADMIN, as_login, job_row, wait_for, wait_job
from tests.support import models as testing


@pytest.fixture
def conn(ops: psycopg.Connection[dict[str, Any]]) -> psycopg.Connection[dict[str, Any]]:
    """These tests drive the queue with the diagnostic `noop` task: an administrator's (pgml_admin)."""
    return ops


STEPS = 100


@pytest.fixture(scope="session")
def small_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # big enough that a few hundred steps take seconds, small enough to build instantly
    return testing.build_tiny_classifier_base(tmp_path_factory.mktemp("models") / "small-bert", hidden=64, layers=2)


def submit_long(conn: psycopg.Connection[dict[str, Any]], model: Path, **training_args: Any) -> int:
    conn.execute("CREATE TABLE IF NOT EXISTS texts (text text, class text)")
    conn.execute(
        "INSERT INTO texts SELECT 'sample text number ' || i || ' is ' || "
        "CASE WHEN i % 2 = 0 THEN 'good' ELSE 'bad' END, CASE WHEN i % 2 = 0 THEN 'pos' ELSE 'neg' END "
        "FROM generate_series(1, 64) i"
    )
    args = {
        "max_steps": STEPS,
        "per_device_train_batch_size": 16,
        "logging_steps": 1,
        "save_steps": 20,
        "save_total_limit": 2,
        "learning_rate": 1e-3,
        **training_args,
    }
    row = conn.execute(
        "SELECT job_id FROM pgml.tune('long', task => 'text-classification', relation_name => 'texts', "
        "model_name => %s, test_size => 0.25, hyperparams => %s::jsonb)",
        (
            str(model),
            json.dumps({"dataset_args": {"text_column": "text", "class_column": "class"}, "training_args": args}),
        ),
    ).fetchone()
    return int(row["job_id"])


def checkpoint_steps(conn: psycopg.Connection[dict[str, Any]], job: int) -> list[int]:
    return [
        r["step"] for r in conn.execute("SELECT step FROM pgml.checkpoints WHERE job_id = %s ORDER BY step", (job,))
    ]


def logged_steps(conn: psycopg.Connection[dict[str, Any]], job: int, attempt: int) -> list[int]:
    return [
        int(r["s"])
        for r in conn.execute(
            "SELECT logs->>'step' AS s FROM pgml.logs WHERE job_id = %s AND attempt = %s AND logs ? 'loss' ORDER BY id",
            (job, attempt),
        )
    ]


def test_sigkill_daemon_then_another_resumes_from_the_stored_checkpoint(
    conn: psycopg.Connection[dict[str, Any]], daemon: Any, small_bert: Path
) -> None:
    job = submit_long(conn, small_bert)
    first = daemon("--worker-id", "first")
    wait_for(lambda: checkpoint_steps(conn, job), 120, interval=0.02, what="a stored checkpoint")
    first.signal(signal.SIGKILL)  # the daemon dies; its child follows (PR_SET_PDEATHSIG)
    first.wait(10)
    killed_at = time.monotonic()
    ckpt = checkpoint_steps(conn, job)[-1]
    assert job_row(conn, job)["status"] == "running"  # nobody knows yet: the lease has not expired

    daemon("--worker-id", "second")
    wait_for(lambda: job_row(conn, job)["attempt"] == 2, 60, interval=0.05, what="the takeover")
    takeover = time.monotonic() - killed_at
    done = wait_job(conn, job, 180)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempt"] == 2 and done["failed_attempts"] == 1
    assert "stopped renewing its lease" in done["errors"][0]["error"] and done["errors"][0]["worker"] == "first"
    second = logged_steps(conn, job, 2)
    assert second[0] >= ckpt + 1, f"attempt 2 restarted at step {second[0]}, checkpoint was at {ckpt}"
    assert second[-1] == STEPS
    assert takeover < 15
    # pruned to save_total_limit
    assert len(checkpoint_steps(conn, job)) <= 2


def test_sigterm_checkpoints_requeues_and_exits_in_time(
    conn: psycopg.Connection[dict[str, Any]], daemon: Any, small_bert: Path
) -> None:
    job = submit_long(conn, small_bert, save_steps=100000)  # no periodic checkpoint: SIGTERM makes one
    d = daemon()
    wait_for(lambda: len(logged_steps(conn, job, 1)) >= 5, 120, interval=0.02, what="training to start")
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.output()[-3000:]
    assert time.monotonic() - t0 < 20
    row = job_row(conn, job)
    assert row["status"] == "queued" and row["worker"] is None and row["failed_attempts"] == 0
    steps = checkpoint_steps(conn, job)
    assert steps, "SIGTERM should have stored a checkpoint"
    daemon("--drain")
    done = wait_job(conn, job, 180)
    assert done["status"] == "succeeded" and done["attempt"] == 2
    assert logged_steps(conn, job, 2)[0] == steps[-1] + 1


def test_cancel_queued_and_running(conn: psycopg.Connection[dict[str, Any]], daemon: Any) -> None:
    q = conn.execute("SELECT job_id FROM pgml.tune('c', task => 'noop', model_name => 'none')").fetchone()["job_id"]
    assert conn.execute("SELECT pgml.cancel(%s) AS s", (q,)).fetchone()["s"] == "cancelled"
    r = conn.execute(
        "SELECT job_id FROM pgml.tune('c', task => 'noop', model_name => 'none', "
        'hyperparams => \'{"seconds": 60, "steps": 600}\')'
    ).fetchone()["job_id"]
    daemon()
    wait_for(lambda: conn.execute("SELECT 1 FROM pgml.logs WHERE job_id = %s", (r,)).fetchone(), 30)
    t0 = time.monotonic()
    assert conn.execute("SELECT pgml.cancel(%s) AS s", (r,)).fetchone()["s"] == "cancelling"
    done = wait_job(conn, r, 10)
    assert time.monotonic() - t0 < 5
    assert done["status"] == "cancelled"
    assert conn.execute("SELECT count(*) AS n FROM pgml.logs WHERE job_id = %s", (r,)).fetchone()["n"] > 0
    assert job_row(conn, q)["status"] == "cancelled" and job_row(conn, q)["attempt"] == 0  # never started
    assert conn.execute("SELECT pgml.cancel(%s) AS s", (r,)).fetchone()["s"] == "cancelled"
    with pytest.raises(psycopg.errors.NoDataFound):
        conn.execute("SELECT pgml.cancel(987654)")


def test_wait_streams_logs_then_final_status(
    su_dsn: str, conn: psycopg.Connection[dict[str, Any]], daemon: Any
) -> None:
    conn_dsn = as_login(su_dsn, ADMIN)  # the session that submitted the jobs (noop is an administrator's)
    job = conn.execute(
        "SELECT job_id FROM pgml.tune('w', task => 'noop', model_name => 'none', "
        'hyperparams => \'{"seconds": 1, "steps": 5}\')'
    ).fetchone()["job_id"]
    daemon()
    seen: list[tuple[float, str]] = []
    with psycopg.connect(conn_dsn, autocommit=True) as waiter:
        waiter.add_notice_handler(lambda d: seen.append((time.monotonic(), d.message_primary or "")))
        waiter.execute("CALL pgml.wait(%s, 0.1)", (job,))
    logs = [json.loads(m) for _, m in seen]
    assert [entry["step"] for entry in logs[:-1]] == [1, 2, 3, 4, 5]
    assert logs[-1]["status"] == "succeeded" and logs[-1]["metrics"] == {"slept": 1}
    assert seen[-1][0] - seen[0][0] > 0.5, "log rows arrive as they happen, not all at the end"

    bad = conn.execute(
        "SELECT job_id FROM pgml.tune('w', task => 'noop', model_name => 'none', hyperparams => '{\"fail\": \"boom\"}')"
    ).fetchone()["job_id"]
    with psycopg.connect(conn_dsn, autocommit=True) as waiter, pytest.raises(psycopg.errors.RaiseException) as e:
        waiter.execute("CALL pgml.wait(%s, 0.1)", (bad,))
    assert f"job {bad} failed: boom" in str(e.value)


def test_status_view_and_queue_summary(conn: psycopg.Connection[dict[str, Any]], daemon: Any) -> None:
    job = conn.execute(
        "SELECT job_id FROM pgml.tune('v', task => 'noop', model_name => 'none', "
        'hyperparams => \'{"seconds": 3, "steps": 30}\')'
    ).fetchone()["job_id"]
    daemon("--worker-id", "viewer")
    row = wait_for(
        lambda: (
            (r := conn.execute("SELECT * FROM pgml.job_status WHERE id = %s", (job,)).fetchone())
            and r["step"]
            and r["step"] >= 5
            and r
        ),
        30,
    )
    assert row["status"] == "running" and row["worker"] == "viewer" and row["max_steps"] == 30
    assert 0 < row["progress_pct"] < 100 and row["heartbeat_age"] < 3 and row["last_loss"] > 0
    assert row["eta"] is not None
    summary = {r["status"]: r for r in conn.execute("SELECT * FROM pgml.queue_summary")}
    assert summary["running"]["jobs"] == 1 and summary["running"]["workers"] == 1
    wait_job(conn, job)


def test_lora_adapter_checkpoint_resumes_after_sigterm(
    conn: psycopg.Connection[dict[str, Any]], daemon: Any, tmp_path: Path, su: psycopg.Connection[dict[str, Any]]
) -> None:
    llama = testing.build_tiny_llama(tmp_path / "llama")
    conn.execute("CREATE TABLE chats (q text, a text)")
    conn.execute(
        "INSERT INTO chats SELECT 'what is ' || i || ' plus one?', (i + 1)::text FROM generate_series(1, 48) i"
    )
    hp = {
        "dataset_args": {"user_column": "q", "assistant_column": "a"},
        "lora_config": {"r": 4, "lora_alpha": 8},
        "training_args": {
            "max_steps": 60,
            "per_device_train_batch_size": 4,
            "logging_steps": 1,
            "save_steps": 5,
            "learning_rate": 1e-3,
        },
    }
    job = conn.execute(
        "SELECT job_id FROM pgml.tune('chat', task => 'conversation', relation_name => 'chats', "
        "model_name => %s, test_size => 0.25, hyperparams => %s::jsonb)",
        (str(llama), json.dumps(hp)),
    ).fetchone()["job_id"]
    d = daemon()
    wait_for(lambda: checkpoint_steps(conn, job), 120, interval=0.02, what="a stored adapter checkpoint")
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0
    files = {
        r["path"]
        for r in su.execute(  # checkpoint files are the workers' business, not the users'
            "SELECT DISTINCT f.path FROM pgml.checkpoint_files f JOIN pgml.checkpoints c ON c.id = f.checkpoint_id "
            "WHERE c.job_id = %s",
            (job,),
        )
    }
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert "model.safetensors" not in files  # the adapter, not the base weights
    last = checkpoint_steps(conn, job)[-1]
    daemon("--drain")
    done = wait_job(conn, job, 180)
    assert done["status"] == "succeeded", done["error"]
    assert logged_steps(conn, job, 2)[0] == last + 1 and logged_steps(conn, job, 2)[-1] == 60
