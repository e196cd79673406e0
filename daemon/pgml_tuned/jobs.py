"""Every statement that changes a job's state, by name (sql/queries.sql); the state machine is in states.py.

The worker side is async over the worker's pool; the child side (logs, checkpoints, the final commit) is
synchronous over the child's own connection. Each function is one short transaction, fenced on the attempt.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from . import files, secrets
from .db import Pool, Row, fetch_one, q
from .errors import JobError, LeaseLost
from .states import Claim, Renewal, Status

# ---- worker side ----


async def claim(pool: Pool, worker: str, lease_seconds: float, free_gpus: int = 0) -> Claim | None:
    """Claim the next queued job that asks for at most `free_gpus` GPUs. Not retried: a claim whose reply was
    lost may have committed (the caller then runs release_orphans)."""
    rows = await pool.named("claim_job", retry=False, worker=worker, lease_seconds=lease_seconds, free_gpus=free_gpus)
    return Claim.from_row(rows[0]) if rows else None


async def job_credential(pool: Pool, claim: Claim) -> str | None:
    """The name of the job's credential, asked again at every attempt: raises secrets.SecretError (the
    database's reason, e.g. the credential was revoked) if the submitter may no longer use it."""
    try:
        rows = await pool.named("job_credential", id=claim.id, attempt=claim.attempt)
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.NoDataFound) as e:
        message, hint = e.diag.message_primary or str(e), e.diag.message_hint
        raise secrets.SecretError(f"{message}: {hint}" if hint else message) from None
    return rows[0]["credential"] if rows else None


async def renew_leases(pool: Pool, attempts: dict[int, int], lease_seconds: float) -> dict[int, Renewal]:
    """Renew the leases of every running attempt ({job id: attempt}) in one statement.

    Returns what it found of the jobs still owned (cancel requested, over its runtime); a job missing from it
    has lost its lease."""
    ids = list(attempts)
    rows = await pool.named("renew_leases", ids=ids, attempts=[attempts[i] for i in ids], lease_seconds=lease_seconds)
    return {r["id"]: Renewal(bool(r["cancel_requested"]), bool(r["overtime"])) for r in rows}


async def status(pool: Pool, job_id: int, attempt: int) -> Status | None:
    """The job's status if it still belongs to `attempt`; None when another attempt owns it (or it is gone)."""
    row = await pool.one(q("job_status"), {"id": job_id})
    return Status(row["status"]) if row and row["attempt"] == attempt else None


async def fail(pool: Pool, job: Claim, error: str) -> bool:
    return bool(await pool.named("fail_job", id=job.id, attempt=job.attempt, error=error))


async def cancel_running(pool: Pool, job: Claim, by: str) -> bool:
    return bool(await pool.named("cancel_running", id=job.id, attempt=job.attempt, by=by))


async def requeue(pool: Pool, job: Claim) -> bool:
    return bool(await pool.named("requeue_job", id=job.id, attempt=job.attempt))


async def reap_expired(pool: Pool) -> list[dict[str, Any]]:
    return await pool.named("reap_expired")


async def release_orphans(pool: Pool, worker: str, running: list[int]) -> list[int]:
    """Requeue jobs claimed by `worker` that it does not run (a claim whose reply was lost)."""
    return [r["id"] for r in await pool.named("release_orphans", worker=worker, running=running)]


async def queue_empty(pool: Pool, worker: str, gpus: int = 0) -> bool:
    """Nothing left for a draining worker with `gpus` GPUs: no job it could run is queued, and no job is held by a
    worker that stopped heartbeating (that one is waited for, reaped and taken over)."""
    row = await pool.one(q("queue_empty"), {"worker": worker, "gpus": gpus})
    return bool(row and row["empty"])


async def idle_workers(pool: Pool) -> tuple[int, int]:
    """(live workers with a free slot, live workers) in the fleet registry, as of their last heartbeats."""
    row = await pool.one(q("idle_workers"))
    return (int(row["idle"]), int(row["live"])) if row else (0, 0)


async def set_child_ticket(pool: Pool, job: Claim, ticket_hash: bytes) -> bool:
    """Record the sha256 of the attempt's child ticket; False when the attempt no longer owns the job."""
    return bool(await pool.named("set_child_ticket", id=job.id, attempt=job.attempt, hash=ticket_hash))


# ---- gangs: jobs across several workers (worker/gang.py tells the story) ----


async def gang_open(pool: Pool, job: Claim, rendezvous: str, nodes: int) -> bool:
    """The leader opens its attempt's gang (and wakes idle workers); False when the attempt lost the job."""
    return bool(await pool.named("gang_open", id=job.id, attempt=job.attempt, rendezvous=rendezvous, nodes=nodes))


async def gang_join(pool: Pool, worker: str, free_gpus: int) -> Claim | None:
    """Join the next forming gang this worker can take a node of; None when there is none. Not retried (as claim)."""
    try:
        rows = await pool.named("gang_join", retry=False, worker=worker, free_gpus=free_gpus)
    except psycopg.errors.UniqueViolation:
        return None  # another worker took that node number in the same instant: the next wake-up looks again
    if not rows:
        return None
    row = rows[0]
    if int(row["gang_needed_after"]) > 0:
        await pool.named("gang_notify", id=row["id"])  # more members wanted: wake the next one
    return Claim.from_row(row)


async def gang_state(pool: Pool, job_id: int) -> Row | None:
    return await pool.one(q("gang_state"), {"id": job_id})


async def gang_give_back(pool: Pool, job: Claim) -> bool:
    """Put a job whose gang did not form back in the queue, untouched; False when the gang completed first."""
    return bool(await pool.named("gang_give_back", id=job.id, attempt=job.attempt))


async def gang_able(pool: Pool, gpus: int) -> int:
    """Live workers that could each run a node of a job asking for `gpus` GPUs per node."""
    row = await pool.one(q("gang_live_workers"), {"gpus": gpus})
    return int(row["able"]) if row else 0


async def gang_set_ticket(pool: Pool, job: Claim, ticket_hash: bytes) -> bool:
    rows = await pool.named("gang_set_ticket", id=job.id, attempt=job.attempt, node=job.node, hash=ticket_hash)
    return bool(rows)


async def gang_member_beat(pool: Pool, worker: str, attempts: dict[int, int]) -> set[int]:
    """Renew this worker's gang memberships ({job id: attempt}); returns the jobs that still run those attempts."""
    ids = list(attempts)
    rows = await pool.named("gang_member_beat", worker=worker, ids=ids, attempts=[attempts[i] for i in ids])
    return {int(r["id"]) for r in rows}


async def gang_member_end(
    pool: Pool, job: Claim, outcome: str, error: str | None = None, error_at: float | None = None
) -> None:
    params: dict[str, Any] = {"outcome": outcome, "error": error, "error_at": error_at}
    await pool.named("gang_member_end", id=job.id, attempt=job.attempt, node=job.node, **params)


async def gang_members(pool: Pool, job: Claim) -> list[Row]:
    return await pool.named("gang_members", id=job.id, attempt=job.attempt)


async def gang_lost(pool: Pool, job: Claim, error: str) -> None:
    await pool.named("gang_lost", id=job.id, attempt=job.attempt, error=error)


# ---- child side (synchronous: a job's child is a plain blocking process) ----
# Every statement is a pgml._child_* function taking (job id, ticket): the child's login may run nothing else, and
# each refuses with SQLSTATE TICKET_REFUSED unless the ticket is the job's running attempt's (LeaseLost here).

Conn = psycopg.Connection[Any]
TICKET_REFUSED = "PGT01"


@contextlib.contextmanager
def fenced(job_id: int) -> Iterator[None]:
    """A refused ticket is a lost lease: the attempt no longer owns the job (requeued, ended, taken over)."""
    try:
        yield
    except psycopg.Error as e:
        if e.sqlstate == TICKET_REFUSED:
            raise LeaseLost(f"job {job_id}: this attempt no longer owns the job ({e.diag.message_primary})") from e
        raise


LogRow = tuple[int, str, dict[str, Any]]  # (seq, kind, entry): kind "train" (a Trainer event), "info" or "warning"


def _log_params(job_id: int, ticket: str, rows: list[LogRow], progress: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": job_id,
        "ticket": ticket,
        "progress": Jsonb(progress),
        "logs": json.dumps([{"seq": seq, "kind": kind, "entry": e} for seq, kind, e in rows], default=str),
    }


def append_logs(conn: Conn, job_id: int, ticket: str, rows: list[LogRow], progress: dict[str, Any]) -> None:
    """Store (seq, kind, entry) log rows of this attempt and its progress; LeaseLost if it no longer owns the job."""
    with fenced(job_id):
        conn.execute(q("child_log"), _log_params(job_id, ticket, rows, progress))


def resume(conn: Conn, job_id: int, ticket: str, step: int, seq: int, entry: dict[str, Any]) -> int:
    """Record that this attempt trains on from `step` (0: from the start): in one statement, the training rows of
    earlier attempts past it move to pgml.superseded_logs and `entry` becomes this attempt's info row `seq`.
    Returns how many rows moved."""
    with fenced(job_id):
        row = fetch_one(
            conn, q("child_resume"), {"id": job_id, "ticket": ticket, "step": step, "seq": seq, "entry": Jsonb(entry)}
        )
    return int(row["moved"])


def store_checkpoint(conn: Conn, job_id: int, ticket: str, step: int, src: Path, keep: int) -> tuple[int, int]:
    """Checkpoint directory `src` of `step` into pgml.checkpoints in one fenced transaction, keeping the
    newest `keep`. Returns (files, bytes)."""
    params = {"id": job_id, "ticket": ticket, "step": step, "keep": max(1, keep)}
    with fenced(job_id), conn.transaction():
        checkpoint_id = fetch_one(conn, q("child_checkpoint_begin"), params)["id"]
        stored = files.copy_dir_in(conn, q("copy_checkpoint_files"), checkpoint_id, src)
        budget = fetch_one(conn, q("child_checkpoint_end"), {**params, "checkpoint_id": checkpoint_id})
        if budget["max_bytes"] is not None and budget["bytes"] > budget["max_bytes"]:
            raise JobError(
                f"the job's checkpoints would hold {budget['bytes'] / 1e6:.0f} MB in PostgreSQL; its submitter may "
                f"keep {budget['max_bytes'] / 1e6:.0f} MB (pgml.role_limits): save fewer (save_total_limit) or "
                "smaller (a LoRA adapter) checkpoints"
            )
    return stored


def succeed(
    conn: Conn,
    job_id: int,
    ticket: str,
    model_dir: Path,
    metrics: dict[str, Any],
    base_model: str | None,
    report: Callable[[int, int], LogRow] | None = None,
) -> tuple[int, int]:
    """The job's final transaction: every file under model_dir into pgml.files, metrics, status succeeded; and
    the log row report(files, bytes) says what was stored, in the same transaction."""
    params = {"id": job_id, "ticket": ticket}
    with fenced(job_id), conn.transaction():
        model_id = fetch_one(conn, q("child_files_begin"), params)["model_id"]
        stored = files.copy_dir_in(conn, q("copy_files"), model_id, model_dir)
        if report is not None:
            conn.execute(q("child_log"), _log_params(job_id, ticket, [report(*stored)], {}))
        conn.execute(q("child_succeed"), {**params, "metrics": Jsonb(metrics), "base_model": base_model})
    return stored


def write_predictions(conn: Conn, job_id: int, ticket: str, rows: list[tuple[str, str, float]], restart: bool) -> str:
    """One transaction of a predict_batch child: its output table (emptied first when `restart`), then a COPY of
    (key, label, score) rows into it. Returns the table's name (in schema pgml)."""
    with fenced(job_id), conn.transaction():
        params = {"id": job_id, "ticket": ticket, "restart": restart}
        name = str(fetch_one(conn, q("child_predictions_begin"), params)["output"])
        stmt = sql.SQL("COPY {} (key, label, score) FROM STDIN").format(sql.Identifier("pgml", name))
        with conn.cursor() as cur, cur.copy(stmt) as cp:
            for row in rows:
                cp.write_row(row)
    return name


def begin_dataset(conn: Conn, job_id: int, ticket: str, names: list[str], types: list[str]) -> str:
    """A load_dataset attempt's staging table in schema pgml, empty, with these columns; the child's login may
    INSERT (COPY) into it and nothing else."""
    with fenced(job_id), conn.transaction():
        row = fetch_one(conn, q("dataset_begin"), {"id": job_id, "ticket": ticket, "names": names, "types": types})
    return str(row["staging"])


def finish_dataset(
    conn: Conn,
    job_id: int,
    ticket: str,
    rows: int,
    metrics: dict[str, Any],
    report: Callable[[dict[str, Any]], LogRow] | None = None,
) -> dict[str, Any]:
    """A load_dataset job's final transaction: its staging table becomes pgml."<source>" and the job succeeds
    with the result (table_name, rows, columns) in its metrics — both or neither; and the log row report(result)
    says so, in the same transaction."""
    params = {"id": job_id, "ticket": ticket}
    with fenced(job_id), conn.transaction():
        result = fetch_one(conn, q("dataset_commit"), {**params, "rows": rows})["result"]
        if report is not None:
            conn.execute(q("child_log"), _log_params(job_id, ticket, [report(result)], {}))
        metrics = {**metrics, **result}
        conn.execute(q("child_succeed"), {**params, "metrics": Jsonb(metrics), "base_model": None})
    return metrics
