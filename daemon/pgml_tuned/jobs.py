"""The job state machine — the one place that moves a job between states.

States (pgml.jobs.status):

    queued ──claim──▶ running ──succeed──▶ succeeded
      ▲  │              │ │ │
      │  │              │ │ └──fail──────▶ failed
      │  │              │ └────cancel────▶ cancelled
      │  └──cancel──────┼────────────────▶ cancelled
      └────requeue──────┤
      └────reap─────────┘ (lease expired; ──▶ failed after max_attempts lost leases)

| transition | who                               | what it writes (sql/queries.sql)                           |
|------------|-----------------------------------|------------------------------------------------------------|
| submit     | pgml.tune() (SQL, the caller)     | projects, models (in_progress), jobs (queued); NOTIFY      |
| claim      | daemon claimer                    | attempt+1, worker, lease, started_at  (claim_job)          |
| heartbeat  | daemon, per running job           | lease_expires_at, heartbeat_at; reads cancel_requested     |
| log        | training child                    | pgml.logs rows + jobs.progress (append_logs)               |
| succeed    | training child, one transaction   | pgml.files, metrics on job + model, status (succeed_job)   |
| fail       | daemon, when the child errs/dies  | error, errors[] (fail_job)                                 |
| cancel     | pgml.cancel() for queued jobs;    | status cancelled (pgml.cancel / cancel_running)            |
|            | daemon for running ones           |                                                            |
| requeue    | daemon on SIGTERM (after the      | status queued, worker/lease cleared (requeue_job)          |
|            | child checkpointed)               |                                                            |
| reap       | any daemon, every poll            | failed_attempts+1, errors[], queued or failed (reap_expired)|

Every worker-side write after the claim is fenced on (id, attempt, status = 'running'): a worker whose lease
was reaped (and maybe re-claimed) matches no row and stops; it can never overwrite the new owner's results.
A trigger on pgml.jobs (sql/migrations/0001_schema.sql) records each status/attempt change in
pgml.job_events, NOTIFYs `pgml_job_status`, and moves the model row to successful/failed/cancelled.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from .db import Db
from .sql import q

# Exit codes of a training child, read by the daemon.
EXIT_OK = 0  # the child committed the job's results (succeed)
EXIT_ERROR = 1  # the child reported an error event, then exited
EXIT_REQUEUE = 75  # interrupted by SIGTERM after saving what it could: put the job back in the queue
EXIT_LEASE_LOST = 76  # a fenced write matched nothing: another worker owns the job now


class Status(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})


@dataclass(frozen=True)
class Claim:
    """A job this worker owns for one attempt."""

    id: int
    attempt: int
    project_id: int
    project_name: str
    model_id: int
    task: str
    relation_schema: str | None
    relation_table: str | None
    model_name: str
    test_size: float
    test_sampling: str
    hyperparams: dict[str, Any]
    secrets: str | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Claim:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})

    def spec(self) -> dict[str, Any]:
        """What the training child needs (sent on its stdin, never on its command line)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "secrets"}
        return d


async def claim(db: Db, worker: str, lease_seconds: float) -> Claim | None:
    """Claim the next queued job. Not retried: a claim whose reply was lost may have committed (the
    caller then runs release_orphans)."""
    rows = await db.fetch(q("claim_job"), {"worker": worker, "lease_seconds": lease_seconds}, retry=False)
    return Claim.from_row(rows[0]) if rows else None


async def renew(db: Db, job: Claim, lease_seconds: float) -> bool | None:
    """Renew the lease. None: the lease is lost. Otherwise whether a cancel was requested."""
    row = await db.one(q("renew_lease"), {"id": job.id, "attempt": job.attempt, "lease_seconds": lease_seconds})
    return None if row is None else bool(row["cancel_requested"])


async def fail(db: Db, job: Claim, error: str) -> bool:
    return bool(await db.named("fail_job", id=job.id, attempt=job.attempt, error=error))


async def cancel_running(db: Db, job: Claim, by: str) -> bool:
    return bool(await db.named("cancel_running", id=job.id, attempt=job.attempt, by=by))


async def requeue(db: Db, job: Claim) -> bool:
    return bool(await db.named("requeue_job", id=job.id, attempt=job.attempt))


async def reap_expired(db: Db) -> list[dict[str, Any]]:
    return await db.named("reap_expired")


async def release_orphans(db: Db, worker: str, running: list[int]) -> list[int]:
    """Requeue jobs claimed by `worker` that it does not run (a claim whose reply was lost)."""
    return [r["id"] for r in await db.named("release_orphans", worker=worker, running=running)]


async def status(db: Db, job_id: int) -> Status | None:
    row = await db.one(q("job_status"), {"id": job_id})
    return Status(row["status"]) if row else None


# ---- child side (synchronous: the training child is a plain blocking process) ----


class LeaseLost(RuntimeError):
    """A fenced write matched no row: this attempt no longer owns the job."""


def append_logs(conn: Any, job_id: int, attempt: int, entries: list[tuple[int, dict[str, Any]]],
                extra_progress: dict[str, Any] | None = None) -> None:
    """Store (seq, entry) log events of this attempt; raise LeaseLost if the attempt no longer owns the job."""
    progress = _progress([e for _, e in entries], extra_progress)
    with conn.transaction():
        row = conn.execute(q("append_logs"), {
            "id": job_id, "attempt": attempt, "progress": Jsonb(progress),
            "logs": json.dumps([{"seq": seq, "entry": e} for seq, e in entries])}).fetchone()
        owned = row["owned"] if isinstance(row, dict) else row[0]
        if not owned:
            raise LeaseLost(f"job {job_id} attempt {attempt} is no longer owned by this worker")


def _progress(entries: list[dict[str, Any]], extra_progress: dict[str, Any] | None) -> dict[str, Any]:
    progress = {k: v for k, v in entries[-1].items() if k in ("step", "max_steps", "epoch", "loss", "eval_loss")}
    for e in entries:
        if "loss" in e:
            progress["loss"] = e["loss"]
    progress.update(extra_progress or {})
    return progress
