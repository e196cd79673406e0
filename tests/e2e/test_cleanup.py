"""Nothing of a job is left behind: its scratch directory goes however it ends (succeeded, failed, cancelled, its
daemon killed), its checkpoints go when it succeeds (unless materialize_snapshot keeps them), and checkpoints
upload while training goes on without ever leaving a half checkpoint for a resume to pick."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import job_row, wait_for, wait_job
from tests.e2e.test_resilience import checkpoint_steps, logged_steps
from tests.support import models as testing


@pytest.fixture
def conn(ops: psycopg.Connection[dict[str, Any]]) -> psycopg.Connection[dict[str, Any]]:
    """An administrator's session: the diagnostic `noop` task is theirs."""
    return ops


@pytest.fixture(scope="module")
def small_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.build_tiny_classifier_base(tmp_path_factory.mktemp("models") / "small-bert", hidden=64, layers=2)


def attempt_dirs(work: Path) -> list[str]:
    return sorted(p.name for p in work.glob("*job*")) if work.is_dir() else []


def tune(conn: psycopg.Connection[dict[str, Any]], model: Path, *, keep: bool = False, **training_args: Any) -> int:
    conn.execute("CREATE TABLE IF NOT EXISTS texts (text text, class text)")
    if not conn.execute("SELECT 1 FROM texts LIMIT 1").fetchone():
        conn.execute(
            "INSERT INTO texts SELECT 'sample text number ' || i || ' is ' || "
            "CASE WHEN i % 2 = 0 THEN 'good' ELSE 'bad' END, CASE WHEN i % 2 = 0 THEN 'pos' ELSE 'neg' END "
            "FROM generate_series(1, 64) i"
        )
    args = {"per_device_train_batch_size": 16, "logging_steps": 1, "learning_rate": 1e-3, **training_args}
    row = conn.execute(
        "SELECT job_id FROM pgml.tune('cleanup', task => 'text-classification', relation_name => 'texts', "
        "model_name => %s, test_size => 0.25, hyperparams => %s::jsonb, materialize_snapshot => %s)",
        (
            str(model),
            json.dumps({"dataset_args": {"text_column": "text", "class_column": "class"}, "training_args": args}),
            keep,
        ),
    ).fetchone()
    return int(row["job_id"])


def noop(conn: psycopg.Connection[dict[str, Any]], hyperparams: dict[str, Any]) -> int:
    return int(
        conn.execute(
            "SELECT job_id FROM pgml.tune('cleanup-noop', task => 'noop', model_name => 'none', hyperparams => %s)",
            (json.dumps(hyperparams),),
        ).fetchone()["job_id"]
    )


def test_success_drops_scratch_and_checkpoints_unless_kept(
    conn: psycopg.Connection[dict[str, Any]],
    daemon: Any,
    small_bert: Path,
    tmp_path: Path,
) -> None:
    plain = tune(conn, small_bert, max_steps=30, save_steps=10)
    kept = tune(conn, small_bert, keep=True, max_steps=30, save_steps=10, save_total_limit=3)
    assert daemon("--drain").wait(240) == 0
    for job in (plain, kept):
        assert wait_job(conn, job, 10)["status"] == "succeeded", job_row(conn, job)["error"]
    assert attempt_dirs(tmp_path / "work") == []
    assert checkpoint_steps(conn, plain) == []  # dropped with the job's success
    assert checkpoint_steps(conn, kept) == [10, 20, 30]  # materialize_snapshot keeps them (and the rows)
    # the job's own table of rows (pgml_rows.job_<id>): dropped with the job, unless kept
    assert conn.execute("SELECT to_regclass(%s) AS t", (f"pgml_rows.job_{plain}",)).fetchone()["t"] is None
    assert conn.execute(f"SELECT count(*) AS n FROM pgml_rows.job_{kept}").fetchone()["n"] == 64


def test_failure_and_cancel_leave_no_scratch(
    conn: psycopg.Connection[dict[str, Any]], daemon: Any, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    failing = noop(conn, {"fail": "boom"})
    running = noop(conn, {"seconds": 60, "steps": 600})
    daemon("--concurrency", "2")
    assert wait_job(conn, failing, 60)["status"] == "failed"
    wait_for(lambda: conn.execute("SELECT 1 FROM pgml.logs WHERE job_id = %s", (running,)).fetchone(), 30)
    (held,) = attempt_dirs(work)  # the running job's, while it runs
    assert held.startswith(f"job{running}-a1-")
    assert conn.execute("SELECT pgml.cancel(%s) AS s", (running,)).fetchone()["s"] == "cancelling"
    assert wait_job(conn, running, 20)["status"] == "cancelled"  # its child was killed (SIGKILL)
    wait_for(lambda: attempt_dirs(work) == [], 10, what="the cancelled job's scratch to go")


def test_the_next_start_removes_what_a_killed_daemon_left(
    conn: psycopg.Connection[dict[str, Any]],
    daemon: Any,
    small_bert: Path,
    tmp_path: Path,
) -> None:
    work = tmp_path / "work"
    job = tune(conn, small_bert, max_steps=80, save_steps=20, save_total_limit=2)
    first = daemon("--worker-id", "first")
    wait_for(lambda: checkpoint_steps(conn, job), 120, interval=0.02, what="a stored checkpoint")
    (left,) = attempt_dirs(work)
    first.signal(signal.SIGKILL)  # no cleanup runs; its child dies with it (PR_SET_PDEATHSIG)
    first.wait(10)
    assert (work / left).is_dir()

    second = daemon("--worker-id", "second")
    wait_for(lambda: not (work / left).exists(), 30, what="the stale scratch directory to be swept")
    swept = wait_for(
        lambda: [e for e in map(json.loads, second.output().splitlines()) if e["event"] == "daemon.scratch_removed"],
        10,
        what="the daemon to say what it removed",
    )
    assert swept[0]["directories"] == [left]
    done = wait_job(conn, job, 240)  # taken over once the killed daemon's lease expired
    assert done["status"] == "succeeded" and done["attempt"] == 2, done["error"]
    assert logged_steps(conn, job, 2)[0] > 1  # resumed from the stored checkpoint
    wait_for(lambda: attempt_dirs(work) == [], 10, what="the second attempt's scratch to go")


def uploading(su: psycopg.Connection[dict[str, Any]]) -> bool:
    return bool(
        su.execute(
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' "
            "AND query LIKE 'COPY pgml.checkpoint_files%'"
        ).fetchone()
    )


def test_a_kill_during_an_upload_leaves_no_half_checkpoint(
    conn: psycopg.Connection[dict[str, Any]],
    su: psycopg.Connection[dict[str, Any]],
    daemon: Any,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # checkpoints of ~15 MB: each upload takes a while, and training goes on meanwhile (the model outside the
    # daemon's home, tmp_path: a worker never loads a model from its own state)
    model = testing.build_tiny_classifier_base(
        tmp_path_factory.mktemp("models") / "bert-192", hidden=192, layers=2, heads=4, verify=False
    )
    job = tune(conn, model, max_steps=24, save_steps=3, save_total_limit=2)
    first = daemon("--worker-id", "first")
    wait_for(lambda: checkpoint_steps(conn, job), 180, interval=0.05, what="a first stored checkpoint")
    wait_for(lambda: uploading(su), 60, interval=0.002, what="an upload in flight")
    first.signal(signal.SIGKILL)
    first.wait(10)
    wait_for(lambda: not uploading(su), 10, what="the killed upload's transaction to end")
    stored = su.execute(
        "SELECT c.step, c.files, c.bytes, count(DISTINCT f.path) AS paths, coalesce(sum(length(f.data)), 0) AS sum "
        "FROM pgml.checkpoints c LEFT JOIN pgml.checkpoint_files f ON f.checkpoint_id = c.id "
        "WHERE c.job_id = %s GROUP BY c.id ORDER BY c.step",
        (job,),
    ).fetchall()
    assert stored, "the checkpoint stored before the kill is still there"
    for c in stored:  # every visible checkpoint is whole: what it says it holds is all there
        assert c["files"] > 0 and c["files"] == c["paths"] and c["bytes"] == c["sum"] > 10_000_000, c
        names = {
            r["path"]
            for r in su.execute(
                "SELECT DISTINCT f.path FROM pgml.checkpoint_files f JOIN pgml.checkpoints k ON k.id = f.checkpoint_id "
                "WHERE k.job_id = %s AND k.step = %s",
                (job, c["step"]),
            )
        }
        assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= names, names
    latest = stored[-1]["step"]

    daemon("--worker-id", "second")
    done = wait_job(conn, job, 300)
    assert done["status"] == "succeeded" and done["attempt"] == 2, done["error"]
    assert logged_steps(conn, job, 2)[0] == latest + 1  # resumed from the newest whole checkpoint
    wait_for(lambda: attempt_dirs(tmp_path / "work") == [], 10, what="the second attempt's scratch to go")
