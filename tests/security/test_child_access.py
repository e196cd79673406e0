"""A training child's database access is its own attempt's job and nothing else (migration 0010).

Each test acts as the children's login (a member of pgml_child only) with the ticket of one attempt, as a child
running malicious model code would: every function, table and COPY it could reach, tried against another job."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgml_tuned import files
from pgml_tuned.child import writes
from pgml_tuned.db import q
from pgml_tuned.errors import LeaseLost
from tests.conftest import OTHER_USER, as_login, connect

INSERT_PART = "INSERT INTO pgml.file_parts (model_id, path, part, data) VALUES (%s, 'x', 0, 'x')"
HP = json.dumps({"dataset_args": {"text_column": "text", "class_column": "class"}})
Conn = psycopg.Connection[dict[str, Any]]


def submit(conn: Conn, table: str) -> dict[str, Any]:
    conn.execute(f"CREATE TABLE {table} (text text, class text)")
    conn.execute(f"INSERT INTO {table} SELECT '{table} ' || i, (i % 2)::text FROM generate_series(1, 10) i")
    row = conn.execute(
        "SELECT job_id, model_id FROM pgml.tune(%s, task => 'text-classification', relation_name => %s, "
        "model_name => 'm', hyperparams => %s::jsonb)",
        (table, f"public.{table}", HP),
    ).fetchone()
    assert row is not None
    return row


def start(worker: Conn, ticket: str) -> dict[str, Any]:
    """What the worker does: claim the next job, store the hash of its child's ticket."""
    claim = worker.execute(q("claim_job"), {"worker": "w", "lease_seconds": 60, "free_gpus": 0}).fetchone()
    assert claim is not None
    issue(worker, claim, ticket)
    return claim


def issue(worker: Conn, claim: dict[str, Any], ticket: str) -> bool:
    params = {"id": claim["id"], "attempt": claim["attempt"], "hash": hashlib.sha256(ticket.encode()).digest()}
    return worker.execute(q("set_child_ticket"), params).fetchone() is not None


def rows(child: Conn, job_id: int, ticket: str) -> list[Any]:
    return [r["v"] for r in child.execute(q("child_rows"), {"id": job_id, "ticket": ticket}).fetchall()]


def log(child: Conn, job_id: int, ticket: str, seq: int = 1) -> None:
    writes.append_logs(child, job_id, ticket, [(seq, "train", {"loss": 0.5})], {"loss": 0.5})


@pytest.fixture
def two_jobs(conn: Conn, su_dsn: str, worker_dsn: str) -> Iterator[tuple[dict[str, Any], dict[str, Any], Conn]]:
    """Job A (the user's) and job B (another user's), both running, tickets "ticket-a" and "ticket-b"."""
    a = submit(conn, "reviews_a")
    with connect(as_login(su_dsn, OTHER_USER)) as other:
        b = submit(other, "reviews_b")
    with connect(worker_dsn) as worker:
        assert start(worker, "ticket-a")["id"] == a["job_id"]
        assert start(worker, "ticket-b")["id"] == b["job_id"]
        yield a, b, worker


def test_a_child_reads_and_writes_its_own_job(two_jobs: Any, child_dsn: str, su: Conn, tmp_path: Path) -> None:
    a, _, _ = two_jobs
    with connect(child_dsn) as child:
        expected = sorted([f"reviews_a {i}", str(i % 2)] for i in range(1, 11))
        assert sorted(rows(child, a["job_id"], "ticket-a")) == expected
        log(child, a["job_id"], "ticket-a")
        log(child, a["job_id"], "ticket-a")  # a retried batch inserts nothing twice
        (tmp_path / "ckpt").mkdir()
        (tmp_path / "ckpt" / "w.bin").write_bytes(b"w" * 1000)
        assert writes.store_checkpoint(child, a["job_id"], "ticket-a", 5, tmp_path / "ckpt", keep=2) == (1, 1000)
        latest = child.execute(q("child_latest_checkpoint"), {"id": a["job_id"], "ticket": "ticket-a"}).fetchone()
        assert latest is not None and latest["step"] == 5 and latest["bytes"] == 1000
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "config.json").write_text("{}")
        assert writes.succeed(child, a["job_id"], "ticket-a", tmp_path / "model", {"acc": 1}, None) == (1, 2)
        with pytest.raises(LeaseLost):  # a job that succeeded has no running attempt any more
            log(child, a["job_id"], "ticket-a", seq=2)
    assert su.execute(
        "SELECT count(*) AS n FROM pgml.logs WHERE job_id = %s AND kind = 'train'", (a["job_id"],)
    ).fetchone() == {"n": 1}
    job = su.execute("SELECT status, metrics FROM pgml.jobs WHERE id = %s", (a["job_id"],)).fetchone()
    assert job == {"status": "succeeded", "metrics": {"acc": 1}}
    parts = su.execute("SELECT path, data FROM pgml.file_parts WHERE model_id = %s", (a["model_id"],)).fetchall()
    assert parts == [{"path": "config.json", "data": b"{}"}]


def test_a_child_cannot_reach_another_job(two_jobs: Any, child_dsn: str, su: Conn, conn: Conn, tmp_path: Path) -> None:
    a, b, _ = two_jobs
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"mine")
    with connect(child_dsn) as child:
        # B's own child stores B's model: a model A's child must not read
        writes.succeed(child, b["job_id"], "ticket-b", tmp_path / "model", {}, None)
        refused = [
            lambda: rows(child, b["job_id"], "ticket-a"),  # another job's training rows
            lambda: child.execute(  # another job's logs
                q("child_log"), {"id": b["job_id"], "ticket": "ticket-a", "progress": "{}", "logs": "[]"}
            ),
            lambda: child.execute(  # "succeed" another job
                "SELECT pgml._child_succeed(%s, 'ticket-a', '{}', NULL)", (b["job_id"],)
            ),
            lambda: child.execute("SELECT pgml._child_files_begin(%s, 'ticket-a')", (b["job_id"],)),
            lambda: child.execute("SELECT pgml._child_checkpoint_begin(%s, 'ticket-a', 1)", (b["job_id"],)),
            lambda: child.execute("SELECT * FROM pgml._child_latest_checkpoint(%s, 'ticket-a')", (b["job_id"],)),
            lambda: child.execute(  # move another job's logs apart
                q("child_resume"), {"id": b["job_id"], "ticket": "ticket-a", "step": 0, "seq": 1, "entry": "{}"}
            ),
            lambda: rows(child, a["job_id"], "ticket-b"),  # A's job with B's ticket
            lambda: rows(child, a["job_id"], "not-the-ticket"),
            lambda: rows(child, a["job_id"], ""),
        ]
        for attempt in refused:
            with pytest.raises(psycopg.Error) as e:
                attempt()
            assert e.value.sqlstate == writes.TICKET_REFUSED
        # another user's model: neither found nor downloaded, though it exists with files
        ticket_a = {"id": a["job_id"], "ticket": "ticket-a"}
        find = {**ticket_a, "model_id": b["model_id"], "project": None}
        assert child.execute(q("child_find_model"), find).fetchall() == []
        assert child.execute(q("child_model_files"), {**ticket_a, "model_id": b["model_id"]}).fetchall() == []
        with pytest.raises(FileNotFoundError):
            files.download_model(child, b["model_id"], tmp_path / "stolen", "child_model_files", ticket_a)
        # files of another model, or another job's checkpoint, inside A's own storing transaction
        for table, key in (("file_parts (model_id", b["model_id"]), ("checkpoint_files (checkpoint_id", -1)):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), child.transaction():
                child.execute("SELECT pgml._child_files_begin(%s, 'ticket-a')", (a["job_id"],))
                child.execute(f"INSERT INTO pgml.{table}, path, part, data) VALUES (%s, 'x', 0, 'x')", (key,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege), child.transaction():  # the bulk path: COPY
            child.execute("SELECT pgml._child_files_begin(%s, 'ticket-a')", (a["job_id"],))
            files.copy_dir_in(child, q("copy_files"), b["model_id"], tmp_path / "model")
        with pytest.raises(psycopg.Error) as no_ticket:  # outside a storing transaction: nothing at all
            child.execute(INSERT_PART, (a["model_id"],))
        assert no_ticket.value.sqlstate == writes.TICKET_REFUSED
        # a forged transaction setting (the ticket is checked again on every row)
        with pytest.raises(psycopg.Error) as forged, child.transaction():
            child.execute("SELECT set_config('pgml.child_job', %s, true)", (str(b["job_id"]),))
            child.execute("SELECT set_config('pgml.child_ticket', 'guess', true)")
            child.execute(INSERT_PART, (b["model_id"],))
        assert forged.value.sqlstate == writes.TICKET_REFUSED
    assert su.execute("SELECT status FROM pgml.jobs WHERE id = %s", (a["job_id"],)).fetchone() == {"status": "running"}
    # (the rows the jobs' transitions wrote, the claims and B's success, have no seq: a child's rows have one)
    assert su.execute("SELECT count(*) AS n FROM pgml.logs WHERE seq IS NOT NULL").fetchone() == {"n": 0}
    stored = su.execute("SELECT path, data FROM pgml.file_parts WHERE model_id = %s", (b["model_id"],)).fetchall()
    assert stored == [{"path": "weights.bin", "data": b"mine"}]
    mine = su.execute("SELECT count(*) AS n FROM pgml.file_parts WHERE model_id = %s", (a["model_id"],)).fetchone()
    assert mine == {"n": 0}


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM pgml.jobs",
        "SELECT * FROM pgml.job_rows",
        "SELECT * FROM pgml.files",
        "SELECT * FROM pgml.file_parts",
        "SELECT * FROM pgml.checkpoint_files",
        "SELECT * FROM pgml.logs",
        "SELECT * FROM pgml.superseded_logs",
        "DELETE FROM pgml.logs",
        "SELECT * FROM pgml.sealing_keys",
        "UPDATE pgml.jobs SET status = 'succeeded'",
        "DELETE FROM pgml.file_parts",
        "INSERT INTO pgml.logs (model_id, project_id, logs) VALUES (1, 1, '{}')",
        "UPDATE pgml.jobs SET child_ticket = sha256('x') WHERE id = 1 RETURNING id",
        "SELECT pgml._child_job(1, 'ticket-a')",
        "SELECT pgml._child_insert_check()",
        "SELECT pgml.cancel(1)",
        "SELECT * FROM pgml.tune('x', task => 'noop', model_name => 'none')",
        "SELECT pgml._own_everything()",
        "SELECT pgml._seal('{}'::jsonb, 1, 'x')",
    ],
)
def test_a_child_has_no_other_privilege(two_jobs: Any, child_dsn: str, statement: str) -> None:
    with connect(child_dsn) as child, pytest.raises(psycopg.errors.InsufficientPrivilege):
        child.execute(statement)


@pytest.mark.parametrize("name", ["claim_job", "renew_leases", "reap_expired", "requeue_job", "fail_job"])
def test_a_child_cannot_run_the_workers_statements(two_jobs: Any, child_dsn: str, name: str) -> None:
    params = {
        "worker": "x",
        "lease_seconds": 1,
        "free_gpus": 0,
        "ids": [1],
        "attempts": [1],
        "id": 1,
        "attempt": 1,
        "error": "x",
    }
    with connect(child_dsn) as child, pytest.raises(psycopg.errors.InsufficientPrivilege):
        child.execute(q(name), params if "%(" in q(name) else None)


def test_a_stale_ticket_is_refused(conn: Conn, worker_dsn: str, child_dsn: str, su: Conn) -> None:
    job = submit(conn, "reviews_a")["job_id"]
    with connect(worker_dsn) as worker, connect(child_dsn) as child:
        first = start(worker, "first")
        log(child, job, "first")
        assert worker.execute(q("requeue_job"), {"id": job, "attempt": 1}).fetchone() is not None
        with pytest.raises(LeaseLost):  # requeued: no running attempt
            log(child, job, "first", seq=2)
        second = worker.execute(q("claim_job"), {"worker": "w2", "lease_seconds": 60, "free_gpus": 0}).fetchone()
        assert second is not None and second["attempt"] == 2
        with pytest.raises(LeaseLost):  # claimed again: the claim cleared the old ticket before a new one exists
            log(child, job, "first", seq=2)
        assert not issue(worker, first, "first")  # the old attempt cannot issue tickets any more
        assert issue(worker, second, "second")
        with pytest.raises(LeaseLost):
            log(child, job, "first", seq=2)
        log(child, job, "second")
    logs = su.execute(
        "SELECT attempt FROM pgml.logs WHERE job_id = %s AND seq IS NOT NULL ORDER BY id", (job,)
    ).fetchall()
    assert logs == [{"attempt": 1}, {"attempt": 2}]


def test_the_worker_login_can_stand_in_for_a_child_login(two_jobs: Any, worker_dsn: str, su: Conn) -> None:
    """Without a child login configured (child_dsn unset) the worker's own login runs the same ticketed functions."""
    a, _, _ = two_jobs
    with connect(worker_dsn) as worker:
        assert len(rows(worker, a["job_id"], "ticket-a")) == 10
        with pytest.raises(LeaseLost):
            log(worker, a["job_id"], "ticket-b")
        # what only a child needs, the worker no longer has directly
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            worker.execute("SELECT * FROM pgml.job_rows")


def test_a_gang_members_ticket_only_reads_its_own_running_attempt(
    two_jobs: Any, child_dsn: str, tmp_path: Path
) -> None:
    """A job across several workers (0027_gangs): a member's child reads what the leader's reads — the job's rows,
    its checkpoints — and writes nothing; not another job's, not after the attempt."""
    a, b, worker = two_jobs
    attempt = worker.execute("SELECT attempt FROM pgml.jobs WHERE id = %s", (a["job_id"],)).fetchone()["attempt"]
    worker.execute(
        "INSERT INTO pgml.gang_members (job_id, attempt, node, worker, child_ticket) VALUES (%s, %s, 1, 'w2', %s)",
        (a["job_id"], attempt, hashlib.sha256(b"member-a").digest()),
    )
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "w.bin").write_bytes(b"w" * 100)
    with connect(child_dsn) as child:
        assert len(rows(child, a["job_id"], "member-a")) == 10
        writes.store_checkpoint(child, a["job_id"], "ticket-a", 3, tmp_path / "ckpt", keep=2)  # the leader's
        latest = child.execute(q("child_latest_checkpoint"), {"id": a["job_id"], "ticket": "member-a"}).fetchone()
        assert latest is not None and latest["step"] == 3
        with pytest.raises(LeaseLost):
            log(child, a["job_id"], "member-a")
        with pytest.raises(LeaseLost):
            writes.store_checkpoint(child, a["job_id"], "member-a", 4, tmp_path / "ckpt", keep=2)
        with pytest.raises(LeaseLost):
            writes.succeed(child, a["job_id"], "member-a", tmp_path / "ckpt", {}, None)
        with pytest.raises(psycopg.Error) as other:
            rows(child, b["job_id"], "member-a")
        assert other.value.sqlstate == writes.TICKET_REFUSED
    # a later attempt: the member's ticket of the old one reads nothing any more
    worker.execute("UPDATE pgml.jobs SET attempt = attempt + 1 WHERE id = %s", (a["job_id"],))
    with connect(child_dsn) as child, pytest.raises(psycopg.Error) as stale:
        rows(child, a["job_id"], "member-a")
    assert stale.value.sqlstate == writes.TICKET_REFUSED
