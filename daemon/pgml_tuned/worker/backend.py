"""What the worker needs from the queue, as one interface (Backend).

The daemon (daemon.py) and its attempts (attempt.py) talk only to a Backend. PgBackend (pg.py) carries it out in
PostgreSQL, sending the named statements of sql/queries.sql itself; unit tests drive the real daemon against an
in-memory Backend (tests/support/memory.py) in milliseconds.

Notifications are typed (Notice): a NOTIFY only wakes the worker or makes it look at rows sooner; what it
does is decided from the rows it reads (a cancel request is read from pgml.jobs by the lease renewal, never
taken from a payload). A payload names no job either (issue 20): any session may LISTEN on any channel, so only
its type is read.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from ..states import Claim, Renewal, Status

JOBS_CHANNEL = "pgml_jobs"  # {"type": "job_queued", "nonce": ...}: a job became queued; {"type": "gang_forming"}
CONTROL_CHANNEL = "pgml_control"  # {"type": "cancel_requested"}: a job was cancelled: look at the rows now


class RegistryMissing(Exception):
    """The database has no fleet registry (pgml.workers, migration 0022) yet."""


@dataclass(frozen=True)
class Notice:
    """A typed wake-up: "job_queued", "gang_forming" (a job across several workers wants members), "cancel_requested",
    or "listening" (LISTEN (re)established)."""

    type: str


def parse_notice(channel: str, payload: str) -> Notice | None:
    """The Notice a NOTIFY carries (its type; anything else in it is ignored); None for one that is not ours."""
    try:
        data = json.loads(payload) if payload else {}
    except json.JSONDecodeError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    if channel == JOBS_CHANNEL:
        if data.get("type") == "gang_forming":
            return Notice("gang_forming")  # it only makes idle workers look for gangs to join
        return Notice("job_queued")  # any payload: it only wakes the claimer
    if channel == CONTROL_CHANNEL and data.get("type") == "cancel_requested":
        return Notice("cancel_requested")
    return None


class Backend(Protocol):
    """Every write after the claim is fenced on the attempt (claim.id, claim.attempt, running): one the job no
    longer belongs to matches nothing (and says so where it returns a bool)."""

    async def prepare(self) -> None:
        """Connect (waiting for the database) and get ready to claim."""

    def notices(self) -> AsyncIterator[Notice]: ...

    async def claim(self, lease_seconds: float, free_gpus: int = 0) -> Claim | None:
        """The next queued job asking for at most `free_gpus` GPUs, now this worker's; raises a RETRYABLE error
        when the reply was lost (the claim may have committed: release_orphans puts such a job back)."""

    async def release_orphans(self, running: list[int]) -> list[int]:
        """Requeue the jobs claimed by this worker that it does not run (`running`): a claim whose reply was lost."""

    # a job across several workers (gang.py)
    async def gang_open(self, claim: Claim, rendezvous: str, secret: str, nodes: int) -> bool:
        """The leader opens its attempt's gang (and wakes idle workers); False when the attempt lost the job."""

    async def gang_join(self, free_gpus: int) -> Claim | None:
        """Join the next forming gang this worker can take a node of; None when there is none (or another worker
        took that node in the same instant). Raises a RETRYABLE error when the reply was lost, as claim."""

    async def gang_state(self, job_id: int) -> dict[str, Any] | None: ...

    async def gang_give_back(self, claim: Claim) -> bool:
        """Put a job whose gang did not form back in the queue, untouched; False when the gang completed first."""

    async def gang_able(self, gpus: int) -> int:
        """Live workers that could each run a node of a job asking for `gpus` GPUs per node."""

    async def gang_set_ticket(self, claim: Claim, ticket_hash: bytes) -> bool: ...

    async def gang_member_beat(self, attempts: dict[int, int]) -> set[int]:
        """Renew this worker's gang memberships ({job id: attempt}); returns the jobs that still run those attempts."""

    async def gang_member_end(
        self, claim: Claim, outcome: str, error: str | None = None, error_at: float | None = None
    ) -> None: ...

    async def gang_members(self, claim: Claim) -> list[dict[str, Any]]: ...

    async def gang_lost(self, claim: Claim, error: str) -> None: ...

    async def renew(self, attempts: dict[int, int], lease_seconds: float) -> dict[int, Renewal]:
        """Renew the leases of every running attempt ({job id: attempt}) at once. Returns what it found of the
        jobs still owned (cancel requested, over its runtime); a job missing from it has lost its lease."""

    async def status(self, job_id: int, attempt: int) -> Status | None:
        """The job's status if it still belongs to `attempt`; None when another attempt owns it (or it is gone)."""

    async def set_child_ticket(self, claim: Claim, ticket_hash: bytes) -> bool:
        """Record the sha256 of the attempt's child ticket; False when the attempt no longer owns the job."""

    async def fail(self, claim: Claim, error: str) -> None: ...

    async def cancel(self, claim: Claim, by: str) -> None: ...

    async def requeue(self, claim: Claim) -> None: ...

    async def reap(self) -> list[dict[str, Any]]:
        """Settle the jobs whose lease expired (queued again, or failed after max_attempts): their rows."""

    async def sweep_tables(self) -> int:
        """Drop the job tables and staging tables left behind because a session held a lock on them when their job
        ended (each only if free at once); returns how many were dropped."""

    async def queue_empty(self, gpus: int = 0) -> bool:
        """Nothing left for a draining worker with `gpus` GPUs: no job it could run is queued, and no job is held
        by a worker that stopped heartbeating (that one is waited for, reaped and taken over)."""

    async def idle_workers(self) -> tuple[int, int]:
        """(live workers with a free slot, live workers) in the fleet registry, as of their last heartbeats."""

    async def register(self, info: dict[str, Any]) -> None:
        """This daemon's row in the fleet registry (raises RegistryMissing without one)."""

    async def beat(self, state: dict[str, Any]) -> bool:
        """Renew the row with what the daemon holds now; False when it is no longer this daemon's."""

    async def unregister(self) -> None: ...

    async def jobs_by_status(self) -> list[dict[str, Any]]: ...

    async def job_secrets(self, claim: Claim) -> dict[str, Any]:
        """The job's secrets in clear, for its child: its named credential's token, or its sealed tokens
        opened (raises secrets.SecretError, whose text is the job's error)."""

    async def close(self) -> None: ...
