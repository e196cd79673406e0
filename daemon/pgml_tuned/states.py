"""The job state machine's vocabulary and its one decision: how an attempt ends.

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
| submit     | pgml.tune() (SQL, the caller)     | projects, models (in_progress), jobs (queued)              |
| claim      | worker claimer                    | attempt+1, worker, lease, started_at  (claim_job)          |
| heartbeat  | worker, one statement for all its | lease_expires_at, heartbeat_at; reads cancel_requested     |
|            | running jobs                      | (renew_leases)                                             |
| log        | training child                    | pgml.logs rows + jobs.progress (child_log)                 |
| succeed    | training child, one transaction   | pgml.files, metrics on job + model, status (child_succeed) |
| fail       | worker, when the child errs/dies  | error, errors[] (fail_job)                                 |
| cancel     | pgml.cancel() for queued jobs;    | status cancelled (pgml.cancel / cancel_running)            |
|            | worker for running ones           |                                                            |
| requeue    | worker on SIGTERM (after the      | status queued, worker/lease cleared (requeue_job)          |
|            | child checkpointed)               |                                                            |
| reap       | any worker, every poll            | failed_attempts+1, errors[], queued or failed (reap_expired)|
| gang: open | the claimer of a job with         | rendezvous, gang_needed = nodes - 1 (gang_open)            |
|            | resources.nodes > 1 (its leader)  |                                                            |
| gang: join | an idle worker, before it claims  | gang_needed - 1, a pgml.gang_members row (gang_join)       |
| gang: give | the leader, the gang not formed   | status queued, untouched (gang_give_back: no failed        |
|   back     | in gang_seconds (or stopping)     | attempt counted)                                           |
| gang: lost | the leader, a member went silent  | as reap, for its attempt (gang_lost)                       |

The worker's statements are sent by worker/pg.py (the PostgreSQL Backend), the training child's by child/store.py
and child/writes.py.

A job across several workers (worker/gang.py) is one attempt for the whole gang: its leader holds the lease and
alone writes the job's transitions; the members only renew and report on their pgml.gang_members rows.

Every worker-side write after the claim is fenced on (id, attempt, status = 'running'): a worker whose lease
was reaped (and maybe re-claimed) matches no row and stops; it can never overwrite the new owner's results.
A trigger on pgml.jobs records each status/attempt change in pgml.job_events, NOTIFYs `pgml_job_status`
(and `pgml_jobs` when a job becomes queued), and moves the model row to successful/failed/cancelled.

How an attempt ends is decided once, here, by the pure `settle()`; the worker then carries out the
transition it returns (worker/attempt.py). Nothing in this module does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any


class Status(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ExitCode(enum.IntEnum):
    """Exit codes of a job's child process, read by the worker."""

    OK = 0  # the child committed the job's results (succeed)
    ERROR = 1  # the child reported an error event, then exited
    REQUEUE = 75  # interrupted by SIGTERM after saving what it could: put the job back in the queue
    LEASE_LOST = 76  # a fenced write matched nothing: another worker owns the job now


class StopReason(enum.StrEnum):
    """Why the worker stopped a child (signals sent by the worker, not by the child's own exit)."""

    CANCELLED = "cancelled"  # pgml.cancel() set cancel_requested
    LEASE_LOST = "lease_lost"  # the heartbeat found the job no longer ours
    SHUTDOWN = "shutdown"  # the worker is stopping (SIGTERM/SIGINT)
    OVERTIME = "overtime"  # the job ran past its max_runtime (pgml.role_limits of its submitter)
    GANG = "gang"  # a job across several workers: another member of its gang failed or died (worker/gang.py)


class Action(enum.StrEnum):
    DONE = "done"  # the child committed succeeded itself: nothing to write
    FAIL = "fail"
    CANCEL = "cancel"
    REQUEUE = "requeue"
    ABANDON = "abandon"  # the job is no longer this attempt's: write nothing


OVERTIME_ERROR = (
    "the job ran longer than the max_runtime its submitter may use (pgml.role_limits); ask an administrator to "
    "raise it, or train for fewer steps"
)


@dataclass(frozen=True)
class Renewal:
    """What one lease renewal says of a job this worker still owns."""

    cancel_requested: bool = False
    overtime: bool = False


@dataclass(frozen=True)
class Transition:
    action: Action
    error: str | None = None  # for FAIL: the job's error message


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
    credential: str | None = None  # the name of the job's named credential (pgml.credentials), never a token
    submitted_by: str = ""  # the login that submitted it: whose models it may start from
    snapshot_columns: list[str] | None = None  # the columns pgml.tune() copied into pgml.job_rows, in order
    hub_refusal: str | None = None  # why the hub allow-list refuses its model now (checked at every claim)
    queued_seconds: float | None = None  # from its submission to this claim (the pickup latency of a first attempt)
    node: int = 0  # in a job across several workers (resources.nodes): this worker's node; 0 is the leader
    rendezvous: str | None = None  # and the leader's host:port, where the ranks meet (worker/gang.py)
    # and the attempt's rendezvous secret (child/rendezvous.py), read by a member from pgml.gang_secrets
    rendezvous_secret: str | None = field(default=None, repr=False)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Claim:
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})

    def spec(self) -> dict[str, Any]:
        """What the job's child needs (sent on its stdin, never on its command line); secrets travel apart."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name
            not in ("secrets", "credential", "hub_refusal", "queued_seconds", "node", "rendezvous", "rendezvous_secret")
        }


def requested_gpus(hyperparams: dict[str, Any] | None) -> int:
    """The GPUs a job asks for: hyperparams.resources.gpus, else 0 (as the claim query reads it)."""
    return int(((hyperparams or {}).get("resources") or {}).get("gpus") or 0)


def requested_nodes(hyperparams: dict[str, Any] | None) -> int:
    """The workers a job runs on at once: hyperparams.resources.nodes, else 1 (worker/gang.py forms the gang)."""
    return int(((hyperparams or {}).get("resources") or {}).get("nodes") or 1)


def gpus_of(hyperparams: dict[str, Any] | None) -> int:
    """The job slots (one per GPU of a worker started with --gpus) a job takes: its requested GPUs, at least 1."""
    return max(1, requested_gpus(hyperparams))


def settle(
    exit_code: int,
    stop_reason: StopReason | None,
    status: Status | None,
    *,
    error_reported: bool = False,
    lease_lost_reported: bool = False,
    description: str = "",
) -> Transition:
    """How an attempt ends, from what is known once its child has exited.

    exit_code      the child's exit code (-N: killed by signal N)
    stop_reason    why the worker signalled the child, if it did
    status         the job's status if it still belongs to this attempt, None if another attempt owns it
    error_reported the child sent an error event before exiting (a failure of the job itself)
    lease_lost_reported  the child found its fenced writes matched nothing
    description    the readable error for a failed exit (the child's error, or how it died)
    """
    if status == Status.SUCCEEDED:
        return Transition(Action.DONE)  # the child's final transaction committed: nothing can undo it
    if status != Status.RUNNING:
        return Transition(Action.ABANDON)  # reaped, re-claimed or already final: not ours to write
    if stop_reason == StopReason.LEASE_LOST or lease_lost_reported or exit_code == ExitCode.LEASE_LOST:
        return Transition(Action.ABANDON)  # the lease will expire and the reaper decides
    if stop_reason == StopReason.CANCELLED:
        return Transition(Action.CANCEL)
    if stop_reason == StopReason.OVERTIME:
        return Transition(Action.FAIL, OVERTIME_ERROR)
    if exit_code == ExitCode.OK:
        return Transition(Action.FAIL, "the training process exited without storing results")
    if exit_code == ExitCode.ERROR and error_reported:
        # a failure of the job itself fails it, even while the worker shuts down: requeued, it would fail again
        return Transition(Action.FAIL, description)
    if exit_code == ExitCode.REQUEUE or stop_reason == StopReason.SHUTDOWN:
        return Transition(Action.REQUEUE)
    return Transition(Action.FAIL, description)
