"""Jobs with several ranks (hyperparams.resources): two CPU ranks (gloo) train one text-classification job through a
real `pgml-tuned serve`; rank 0 alone writes the logs, checkpoints, files and the final commit; a crashing rank fails
the job naming it; a job killed mid-way resumes with its two ranks from the stored checkpoint."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgml_tuned.files import download_model
from tests.conftest import job_row, wait_for, wait_job
from tests.support import models as testing


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.build_tiny_classifier_base(tmp_path_factory.mktemp("models") / "dist-bert", hidden=32, layers=1)


def submit(
    conn: psycopg.Connection[dict[str, Any]],
    model: Path,
    *,
    procs: int | None,
    resources: dict[str, int] | None = None,
    **training_args: Any,
) -> int:
    conn.execute("CREATE TABLE IF NOT EXISTS texts (text text, class text)")
    if not conn.execute("SELECT 1 FROM texts LIMIT 1").fetchone():
        conn.execute(
            "INSERT INTO texts SELECT 'sample text number ' || i || ' is ' || "
            "CASE WHEN i % 2 = 0 THEN 'good' ELSE 'bad' END, CASE WHEN i % 2 = 0 THEN 'pos' ELSE 'neg' END "
            "FROM generate_series(1, 48) i"
        )
    hyperparams: dict[str, Any] = {
        "dataset_args": {"text_column": "text", "class_column": "class"},
        "training_args": {
            "max_steps": 8,
            "per_device_train_batch_size": 4,
            "logging_steps": 1,
            "learning_rate": 1e-3,
            **training_args,
        },
    }
    if procs or resources:
        hyperparams["resources"] = resources or {"procs": procs}
    row = conn.execute(
        "SELECT job_id FROM pgml.tune('dist', task => 'text-classification', relation_name => 'texts', "
        "model_name => %s, test_size => 0.25, hyperparams => %s::jsonb)",
        (str(model), json.dumps(hyperparams)),
    ).fetchone()
    return int(row["job_id"])


def loss_steps(conn: psycopg.Connection[dict[str, Any]], job: int, attempt: int | None = None) -> list[dict[str, Any]]:
    return [
        r["logs"]
        for r in conn.execute(
            "SELECT logs FROM pgml.logs WHERE job_id = %s AND (%s::int IS NULL OR attempt = %s) AND logs ? 'loss' "
            "ORDER BY id",
            (job, attempt, attempt),
        )
    ]


def test_two_ranks_train_one_job_with_one_set_of_logs_and_files(
    conn: psycopg.Connection[dict[str, Any]], daemon: Any, tiny_classifier: Path, tmp_path: Path
) -> None:
    job = submit(conn, tiny_classifier, procs=2, fsdp="full_shard")  # on CPU ranks accelerate runs DDP: said so
    d = daemon("--drain")
    done = wait_job(conn, job, 240)
    assert done["status"] == "succeeded", done["error"]
    assert d.wait(60) == 0
    assert done["metrics"]["world_size"] == 2
    warning = conn.execute("SELECT logs->>'warning' AS w FROM pgml.logs WHERE job_id = %s AND logs ? 'warning'", (job,))
    assert "training_args.fsdp applies to GPU ranks" in warning.fetchone()["w"]
    logs = loss_steps(conn, job)
    steps = [e["step"] for e in logs]
    assert steps == list(range(1, 9)), f"one log row per step from rank 0 alone, got steps {steps}"
    assert {e["world_size"] for e in logs} == {2}
    # a fresh two-class head starts near chance, ln 2 = 0.69, as in one process (not scaled by the 2 ranks)
    assert 0.5 < logs[0]["loss"] < 0.9, logs[0]
    # one set of files: each (path, part) once
    files = conn.execute(
        "SELECT path, part, count(*) AS n FROM pgml.files WHERE model_id = %s GROUP BY path, part",
        (done["model_id"],),
    ).fetchall()
    assert files and all(f["n"] == 1 for f in files)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f["path"] for f in files}
    assert "starting 2 ranks" in d.output()

    from transformers import AutoModelForSequenceClassification

    with psycopg.connect(conn.info.dsn, row_factory=psycopg.rows.dict_row) as c2:
        out = download_model(c2, done["model_id"], tmp_path / "reloaded")
    assert AutoModelForSequenceClassification.from_pretrained(out).config.id2label == {0: "neg", 1: "pos"}


def test_a_crashing_rank_fails_the_job_and_stops_the_others(
    ops: psycopg.Connection[dict[str, Any]], daemon: Any
) -> None:
    job = ops.execute(
        "SELECT job_id FROM pgml.tune('crash', task => 'noop', model_name => 'none', hyperparams => %s::jsonb)",
        (json.dumps({"resources": {"procs": 2}, "fail_rank": 1, "fail": "boom", "seconds": 60, "steps": 60}),),
    ).fetchone()["job_id"]
    d = daemon()
    t0 = time.monotonic()
    done = wait_job(ops, job, 60)
    assert time.monotonic() - t0 < 40, "rank 0 was not stopped: it would have run its 60 s"
    assert done["status"] == "failed"
    assert "rank 1 of 2 failed: RuntimeError: boom" in done["error"], done["error"]
    model = ops.execute("SELECT status FROM pgml.models WHERE id = %s", (done["model_id"],)).fetchone()
    assert model["status"] == "failed"
    assert not ops.execute("SELECT 1 FROM pgml.files WHERE model_id = %s", (done["model_id"],)).fetchone()
    assert d.proc.poll() is None


def test_sigkill_mid_job_then_two_ranks_resume_from_the_stored_checkpoint(
    conn: psycopg.Connection[dict[str, Any]], daemon: Any, tiny_classifier: Path
) -> None:
    job = submit(conn, tiny_classifier, procs=2, max_steps=16, save_steps=4, save_total_limit=2)
    first = daemon("--worker-id", "first")
    checkpoints = "SELECT step FROM pgml.checkpoints WHERE job_id = %s ORDER BY step"
    wait_for(lambda: conn.execute(checkpoints, (job,)).fetchone(), 180, interval=0.02, what="a stored checkpoint")
    first.signal(signal.SIGKILL)  # the daemon dies; the launcher and both ranks follow (PR_SET_PDEATHSIG)
    first.wait(10)
    stored = [r["step"] for r in conn.execute(checkpoints, (job,))][-1]
    assert job_row(conn, job)["status"] == "running"

    daemon("--worker-id", "second")
    done = wait_job(conn, job, 240)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempt"] == 2 and done["metrics"]["world_size"] == 2
    second = [e["step"] for e in loss_steps(conn, job, 2)]
    assert second[0] >= stored + 1, f"attempt 2 restarted at step {second[0]}, the checkpoint was at {stored}"
    assert second == list(range(second[0], 17)), "one log row per step, rank 0's only"


def test_sigterm_stops_both_ranks_at_one_step_checkpoints_and_requeues(
    conn: psycopg.Connection[dict[str, Any]], daemon: Any, tiny_classifier: Path
) -> None:
    job = submit(conn, tiny_classifier, procs=2, max_steps=500, save_steps=100000)  # no checkpoint but SIGTERM's
    d = daemon()
    wait_for(lambda: len(loss_steps(conn, job)) >= 3, 180, interval=0.02, what="both ranks training")
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.output()[-3000:]
    row = job_row(conn, job)
    assert row["status"] == "queued" and row["failed_attempts"] == 0, row["error"]
    steps = [r["step"] for r in conn.execute("SELECT step FROM pgml.checkpoints WHERE job_id = %s", (job,))]
    assert len(steps) == 1 and steps[0] == loss_steps(conn, job)[-1]["step"]


def test_fsdp_options_transformers_rejects_fail_the_job_clearly(
    conn: psycopg.Connection[dict[str, Any]], daemon: Any, tiny_classifier: Path
) -> None:
    job = submit(conn, tiny_classifier, procs=2, fsdp="bogus_option")
    daemon("--drain")
    done = wait_job(conn, job, 240)
    assert done["status"] == "failed"
    assert "of 2 failed: training_args rejected by transformers: Unknown `fsdp` option: bogus_option" in done["error"]
    assert not conn.execute("SELECT 1 FROM pgml.logs WHERE job_id = %s AND logs ? 'loss'", (job,)).fetchone()
