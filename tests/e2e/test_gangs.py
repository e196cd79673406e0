"""Jobs across several workers (hyperparams.resources.nodes, worker/gang.py): two real `pgml-tuned serve` processes
on this machine, one gloo rank each, form a gang and train one job; a gang that cannot form, a crashing rank on the
member's host, and a member killed at the rendezvous each end with a clear job error and nothing half written."""

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
from tests.e2e.test_distributed import loss_steps, submit
from tests.support import models as testing


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.build_tiny_classifier_base(tmp_path_factory.mktemp("models") / "gang-bert", hidden=32, layers=1)


GANG = ("--gang-seconds", "20", "--gang-address", "127.0.0.1")


def live(ops: psycopg.Connection[dict[str, Any]], *workers: str) -> None:
    wait_for(
        lambda: (
            ops.execute(
                "SELECT count(*) AS n FROM pgml.worker_status WHERE state = 'live' AND id = ANY(%s)", (list(workers),)
            ).fetchone()["n"]
            == len(workers)
        ),
        30,
        what=f"workers {workers} to register",
    )


def noop_gang(ops: psycopg.Connection[dict[str, Any]], **hyperparams: Any) -> int:
    return int(
        ops.execute(
            "SELECT job_id FROM pgml.tune('gang', task => 'noop', model_name => 'none', hyperparams => %s::jsonb)",
            (json.dumps({"resources": {"procs": 1, "nodes": 2}, **hyperparams}),),
        ).fetchone()["job_id"]
    )


def test_two_workers_train_one_job_as_a_gang(
    conn: psycopg.Connection[dict[str, Any]],
    ops: psycopg.Connection[dict[str, Any]],
    daemon: Any,
    tiny_classifier: Path,
    tmp_path: Path,
) -> None:
    daemon("--worker-id", "gang-a", *GANG)
    daemon("--worker-id", "gang-b", *GANG)
    live(ops, "gang-a", "gang-b")
    job = submit(conn, tiny_classifier, procs=None, resources={"procs": 1, "nodes": 2}, save_steps=4)
    done = wait_job(conn, job, 240)
    assert done["status"] == "succeeded", done["error"]
    assert done["metrics"]["world_size"] == 2
    assert done["errors"] == [], "the gang formed at its first attempt"
    members = wait_for(
        lambda: (
            (
                rows := ops.execute(
                    "SELECT node, worker, outcome FROM pgml.gang_members WHERE job_id = %s", (job,)
                ).fetchall()
            )
            and all(r["outcome"] for r in rows)
            and rows
        ),
        30,
        what="the member to report how its ranks ended",
    )
    leader = done["worker"] or job_row(ops, job)["worker"]
    assert len(members) == 1 and members[0]["node"] == 1 and members[0]["outcome"] in ("ok", "stopped"), members
    assert {members[0]["worker"], leader} == {"gang-a", "gang-b"}, (members, leader)
    steps = [e["step"] for e in loss_steps(conn, job)]
    assert steps == list(range(1, 9)), f"one log row per step from the leader's rank 0 alone, got {steps}"
    assert {e["world_size"] for e in loss_steps(conn, job)} == {2}
    # one set of files, one checkpoint per save, written by rank 0 alone
    checkpoints = ops.execute("SELECT step FROM pgml.checkpoints WHERE job_id = %s ORDER BY step", (job,)).fetchall()
    assert [c["step"] for c in checkpoints] in ([4, 8], [8], []), checkpoints
    out = download_model(conn, done["model_id"], tmp_path / "model")
    assert (out / "config.json").is_file()


def test_a_gang_bigger_than_the_fleet_fails_clearly(ops: psycopg.Connection[dict[str, Any]], daemon: Any) -> None:
    daemon("--worker-id", "alone", "--gang-seconds", "2", "--gang-address", "127.0.0.1")
    live(ops, "alone")
    notices: list[str] = []
    ops.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    job = noop_gang(ops)
    assert any("asks for 2 workers at once" in n for n in notices), notices
    done = wait_job(ops, job, 60)
    assert done["status"] == "failed"
    assert "hyperparams.resources.nodes = 2: the job needs 2 workers at once and 1 live worker" in done["error"]
    assert "pgml-tuned serve on 1 more host" in done["error"], done["error"]
    assert not ops.execute("SELECT 1 FROM pgml.gang_members WHERE job_id = %s", (job,)).fetchone()


def test_a_rank_crashing_on_the_members_host_fails_the_job_naming_it(
    ops: psycopg.Connection[dict[str, Any]], daemon: Any
) -> None:
    daemon("--worker-id", "lead", *GANG)
    live(ops, "lead")
    job = noop_gang(ops, fail_rank=1, fail="boom", seconds=60, steps=60)
    # the leader claims it and opens the gang; then a second worker joins as node 1, where rank 1 runs
    wait_for(lambda: job_row(ops, job)["gang_needed"] == 1, 30, what="the gang to open")
    daemon("--worker-id", "member", *GANG)
    t0 = time.monotonic()
    done = wait_job(ops, job, 90)
    assert time.monotonic() - t0 < 45, "the leader's rank was not stopped: it would have run its 60 s"
    assert done["status"] == "failed"
    assert "rank 1 of 2 failed: RuntimeError: boom (node 1 of 2, worker member)" in done["error"], done["error"]
    assert done["worker"] == "lead"
    assert not ops.execute("SELECT 1 FROM pgml.files WHERE model_id = %s", (done["model_id"],)).fetchone()


def test_a_member_killed_at_the_rendezvous_loses_the_attempt_then_the_job_fails_clearly(
    ops: psycopg.Connection[dict[str, Any]], daemon: Any
) -> None:
    daemon("--worker-id", "lead2", *GANG)
    live(ops, "lead2")
    job = noop_gang(ops, seconds=30, steps=30)
    wait_for(lambda: job_row(ops, job)["gang_needed"] == 1, 30, what="the gang to open")
    member = daemon("--worker-id", "doomed", *GANG)
    wait_for(
        lambda: ops.execute("SELECT 1 FROM pgml.gang_members WHERE job_id = %s", (job,)).fetchone(),
        30,
        interval=0.01,
        what="the member to join",
    )
    member.signal(signal.SIGKILL)  # its ranks die with it (PR_SET_PDEATHSIG): the rendezvous never completes
    done = wait_job(ops, job, 120)
    assert done["status"] == "failed", done
    lost = [e["error"] for e in done["errors"] if "node 1" in e["error"]]
    assert lost and "worker doomed" in lost[0] and "stopped renewing its part" in lost[0], done["errors"]
    # the next attempt found the fleet too small for the gang: a clear error, not a wait forever
    assert "needs 2 workers at once" in done["error"], done["error"]
    assert not ops.execute("SELECT 1 FROM pgml.files WHERE model_id = %s", (done["model_id"],)).fetchone()


def test_a_member_killed_mid_job_then_a_new_gang_resumes_from_the_stored_checkpoint(
    conn: psycopg.Connection[dict[str, Any]],
    ops: psycopg.Connection[dict[str, Any]],
    daemon: Any,
    tiny_classifier: Path,
) -> None:
    daemon("--worker-id", "keep", *GANG)
    live(ops, "keep")
    job = submit(
        conn,
        tiny_classifier,
        procs=None,
        resources={"procs": 1, "nodes": 2},
        max_steps=16,
        save_steps=4,
        save_total_limit=2,
    )
    wait_for(lambda: job_row(ops, job)["gang_needed"] == 1, 30, what="the gang to open")
    dies = daemon("--worker-id", "dies", *GANG)
    checkpoints = "SELECT step FROM pgml.checkpoints WHERE job_id = %s ORDER BY step"
    wait_for(lambda: conn.execute(checkpoints, (job,)).fetchone(), 180, interval=0.02, what="a stored checkpoint")
    dies.signal(signal.SIGKILL)  # the member's worker dies, its rank with it: the leader's rank loses its peer
    dies.wait(10)
    stored = [r["step"] for r in conn.execute(checkpoints, (job,))][-1]
    # the attempt is lost for the whole gang (as for a dead worker), the job queued again and led anew
    wait_for(lambda: job_row(ops, job)["failed_attempts"] == 1, 60, what="the attempt to be lost")
    daemon("--worker-id", "joins", *GANG)
    done = wait_job(conn, job, 240)
    assert done["status"] == "succeeded", done["error"]
    assert done["metrics"]["world_size"] == 2
    assert "node 1" in done["errors"][0]["error"] and "worker dies" in done["errors"][0]["error"], done["errors"]
    last = [e["step"] for e in loss_steps(conn, job, done["attempt"])]
    assert last[0] >= stored + 1, (
        f"attempt {done['attempt']} restarted at step {last[0]}, the checkpoint was at {stored}"
    )
    assert last == list(range(last[0], 17)), "one log row per step, the leader's rank 0 only"
    members = ops.execute(
        "SELECT worker FROM pgml.gang_members WHERE job_id = %s AND attempt = %s", (job, done["attempt"])
    ).fetchall()
    assert len(members) == 1 and {members[0]["worker"], done["worker"]} == {"keep", "joins"}, (members, done["worker"])
