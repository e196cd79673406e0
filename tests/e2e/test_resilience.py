"""Crash safety: checkpoints in PostgreSQL, resume after SIGKILL, SIGTERM requeue, cancel, wait."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import ADMIN, END_LINE, TRAIN_LINE, as_login, job_row, printed_step, wait_for, wait_job
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


def guide_loss_steps(conn: psycopg.Connection[dict[str, Any]], model_id: int) -> list[int]:
    """The steps of the guide's loss query, verbatim but for the model id."""
    query = (
        "SELECT logs->>'epoch' AS epoch, logs->>'step' AS step, logs->>'loss' AS loss FROM pgml.logs "
        f"WHERE model_id = {int(model_id)} AND jsonb_exists(logs, 'loss');"
    )
    return sorted(int(r["step"]) for r in conn.execute(query))


def wait_messages(dsn: str, job: int) -> list[str]:
    """What CALL pgml.wait prints for the job (its INFO messages, in order)."""
    seen: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as waiter:
        waiter.add_notice_handler(lambda d: seen.append(d.message_primary or ""))
        with contextlib.suppress(psycopg.errors.RaiseException):  # a failed job's wait raises its error
            waiter.execute("CALL pgml.wait(%s, 0.1)", (job,))
    return seen


def info_lines(conn: psycopg.Connection[dict[str, Any]], job: int, *, prefixed: bool = False) -> list[str]:
    """The job's lines in pgml.logs (kind info, warning, error), in order; `prefixed`: as CALL pgml.wait prints
    them ("warning: ..." for a warning)."""
    rows = conn.execute(
        "SELECT kind, logs->>'message' AS m FROM pgml.logs WHERE job_id = %s AND kind <> 'train' ORDER BY id", (job,)
    )
    return [f"{r['kind']}: {r['m']}" if prefixed and r["kind"] != "info" else r["m"] for r in rows]


def logged_steps(conn: psycopg.Connection[dict[str, Any]], job: int, attempt: int) -> list[int]:
    return [
        int(r["s"])
        for r in conn.execute(
            "SELECT logs->>'step' AS s FROM pgml.logs WHERE job_id = %s AND attempt = %s AND logs ? 'loss' ORDER BY id",
            (job, attempt),
        )
    ]


@pytest.mark.serial  # the takeover within 15 s of the kill: a 3 s lease, and the second daemon's start
def test_sigkill_daemon_then_another_resumes_from_the_stored_checkpoint(
    su_dsn: str, conn: psycopg.Connection[dict[str, Any]], daemon: Any, small_bert: Path
) -> None:
    job = submit_long(conn, small_bert)
    first = daemon("--worker-id", "first")

    def past_a_checkpoint() -> bool:  # a few steps logged after the latest checkpoint: the resume repeats them
        stored, logged = checkpoint_steps(conn, job), logged_steps(conn, job, 1)
        return bool(stored and logged and logged[-1] >= stored[-1] + 3)

    wait_for(past_a_checkpoint, 120, interval=0.02, what="steps after a stored checkpoint")
    first.signal(signal.SIGKILL)  # the daemon dies; its child follows (PR_SET_PDEATHSIG)
    first.wait(10)
    killed_at = time.monotonic()
    ckpt = checkpoint_steps(conn, job)[-1]
    assert job_row(conn, job)["status"] == "running"  # nobody knows yet: the lease has not expired
    repeated = [
        r["id"]
        for r in conn.execute(
            "SELECT id FROM pgml.logs WHERE job_id = %s AND attempt = 1 AND kind = 'train' "
            "AND (logs->>'step')::int > %s ORDER BY id",
            (job, ckpt),
        )
    ]
    assert repeated, "attempt 1 logged steps after its last checkpoint"

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

    # The guide's loss query sees each step once: attempt 1's steps past the checkpoint were moved apart when
    # attempt 2 recorded its resume (the rows themselves, kept in pgml.superseded_logs), its earlier ones stay.
    assert guide_loss_steps(conn, done["model_id"]) == list(range(1, STEPS + 1))
    superseded = conn.execute(
        "SELECT id, attempt, superseded_by, resumed_from_step, (logs->>'step')::int AS step "
        "FROM pgml.superseded_logs WHERE job_id = %s ORDER BY id",
        (job,),
    ).fetchall()
    assert [r["id"] for r in superseded] == repeated
    assert {(r["attempt"], r["superseded_by"], r["resumed_from_step"]) for r in superseded} == {(1, 2, ckpt)}
    assert all(r["step"] > ckpt for r in superseded)
    assert logged_steps(conn, job, 1) == list(range(1, ckpt + 1))
    # what the worker knew about the job is in pgml.logs, and CALL pgml.wait prints it in order
    lines = info_lines(conn, job)
    claimed = lines.index("claimed by worker first (attempt 1)")
    expired = next(i for i, m in enumerate(lines) if m.startswith("worker first stopped renewing its lease"))
    taken = lines.index("taken over by worker second (attempt 2) after worker first stopped renewing its lease")
    resumed = next(i for i, m in enumerate(lines) if m.startswith(f"resuming from the checkpoint at step {ckpt} "))
    assert claimed < expired < taken < resumed, lines
    assert (
        f"the {len(repeated)} log rows of earlier attempts past step {ckpt} are now in pgml.superseded_logs"
        in (lines[resumed])
    )
    assert any(m.startswith("read 64 rows") for m in lines[:expired]) and any(
        m.startswith("read 64 rows") for m in lines[taken:]
    ), lines
    assert any(m.startswith("48 training rows, 16 test rows, 2 classes") for m in lines), lines
    assert lines[-2].startswith("stored ") and lines[-1] == "succeeded (attempt 2, worker second)", lines
    printed = wait_messages(as_login(su_dsn, ADMIN), job)
    texts = [m for m in printed if not TRAIN_LINE.match(m) and not END_LINE.match(m)]
    assert texts == info_lines(conn, job, prefixed=True)
    assert texts[0] == "claimed by worker first (attempt 1)" and f"warning: {lines[expired]}" in texts
    steps = [s for m in printed if (s := printed_step(m)) is not None and "  loss " in m]
    assert steps == list(range(1, STEPS + 1)), "pgml.wait prints each step once"
    assert END_LINE.match(printed[-1]) and printed[-1].startswith(f"job {job} succeeded"), printed[-1]


@pytest.mark.serial  # the exit within 20 s of SIGTERM, a checkpoint uploaded meanwhile
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
    # the interrupted attempt's summary (train_runtime) is a line saying so, not a training row that looks final
    assert not conn.execute(
        "SELECT 1 FROM pgml.logs WHERE job_id = %s AND kind = 'train' AND logs ? 'train_runtime'", (job,)
    ).fetchone()
    lines = info_lines(conn, job)
    assert any(m.startswith(f"attempt 1 stopped at step {steps[-1]} of {STEPS} after ") for m in lines), lines
    assert f"stopped by SIGTERM at step {steps[-1]} of {STEPS}" in lines
    assert lines[-1].startswith("requeued by worker "), lines
    daemon("--drain")
    done = wait_job(conn, job, 180)
    assert done["status"] == "succeeded" and done["attempt"] == 2
    assert logged_steps(conn, job, 2)[0] == steps[-1] + 1
    assert guide_loss_steps(conn, done["model_id"]) == list(range(1, STEPS + 1))
    summaries = conn.execute(
        "SELECT attempt, (logs->>'step')::int AS step FROM pgml.logs WHERE job_id = %s AND kind = 'train' "
        "AND logs ? 'train_runtime'",
        (job,),
    ).fetchall()
    assert summaries == [{"attempt": 2, "step": STEPS}]


@pytest.mark.serial  # cancelled within 5 s
def test_cancel_queued_and_running(conn: psycopg.Connection[dict[str, Any]], daemon: Any) -> None:
    q = conn.execute("SELECT job_id FROM pgml.tune('c', task => 'noop', model_name => 'none')").fetchone()["job_id"]
    assert conn.execute("SELECT pgml.cancel(%s) AS s", (q,)).fetchone()["s"] == "cancelled"
    r = conn.execute(
        "SELECT job_id FROM pgml.tune('c', task => 'noop', model_name => 'none', "
        'hyperparams => \'{"seconds": 60, "steps": 600}\')'
    ).fetchone()["job_id"]
    daemon()
    wait_for(lambda: conn.execute("SELECT 1 FROM pgml.logs WHERE job_id = %s AND kind = 'train'", (r,)).fetchone(), 30)
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
    printed = [m for _, m in seen]
    # one line per log row (pgml._log_line), in order with the lines about the job, then the end once
    assert printed[0].startswith("claimed by worker ") and "(attempt 1)" in printed[0], printed
    assert [printed_step(m) for m in printed[1:6]] == [1, 2, 3, 4, 5], printed
    assert printed[1].startswith("step 1/5  loss 1") and printed[3].startswith("step 3/5  loss 0.3333"), printed
    assert printed[6] == "stored 1 files (0.0 MB) in pgml.files for model " + str(job_row(conn, job)["model_id"])
    assert printed[7].startswith("succeeded (attempt 1, worker ") and printed[8] == f"job {job} succeeded: slept 1.0"
    assert len(printed) == 9, printed
    assert seen[-1][0] - seen[0][0] > 0.5, "log rows arrive as they happen, not all at the end"

    bad = conn.execute(
        "SELECT job_id FROM pgml.tune('w', task => 'noop', model_name => 'none', hyperparams => '{\"fail\": \"boom\"}')"
    ).fetchone()["job_id"]
    failures: list[str] = []
    with psycopg.connect(conn_dsn, autocommit=True) as waiter, pytest.raises(psycopg.errors.RaiseException) as e:
        waiter.add_notice_handler(lambda d: failures.append(d.message_primary or ""))
        waiter.execute("CALL pgml.wait(%s, 0.1)", (bad,))
    assert f"job {bad} failed: boom" in str(e.value)
    assert failures[-1] == "error: failed: boom", failures


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
    conn: psycopg.Connection[dict[str, Any]],
    daemon: Any,
    tmp_path_factory: pytest.TempPathFactory,
    su: psycopg.Connection[dict[str, Any]],
) -> None:
    llama = testing.build_tiny_llama(tmp_path_factory.mktemp("models") / "llama")  # outside the daemon's home
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
