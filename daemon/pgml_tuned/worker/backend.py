"""What the worker needs from the queue, as one interface (Backend), and its PostgreSQL implementation.

The daemon (daemon.py) and its attempts (attempt.py) talk only to a Backend; PgBackend carries it out with
the named statements of jobs.py over a connection pool, plus one dedicated LISTEN connection. Unit tests
drive the real daemon against an in-memory Backend (tests/support/memory.py) in milliseconds.

Notifications are typed (Notice): a NOTIFY only wakes the worker or makes it look at rows sooner; what it
does is decided from the rows it reads (a cancel request is read from pgml.jobs by the lease renewal, never
taken from a payload).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from secrets import token_urlsafe
from typing import Any, Protocol

import anyio
import psycopg
from psycopg.types.json import Jsonb

from .. import jobs, logconfig, secrets
from ..config import Settings
from ..db import RETRYABLE, ListenUnavailable, Pool, backoff_delays, connect, listen, polling_instead, q
from ..states import Claim, Renewal, Status

log = logconfig.get("pgml_tuned.worker.backend")

JOBS_CHANNEL = "pgml_jobs"  # {"type": "job_queued", "id": N}: a job became queued
CONTROL_CHANNEL = "pgml_control"  # {"type": "cancel_requested", "id": N}: look at that job's row now


class RegistryMissing(Exception):
    """The database has no fleet registry (pgml.workers, migration 0022) yet."""


@dataclass(frozen=True)
class Notice:
    """A typed wake-up: "job_queued", "gang_forming" (a job across several workers wants members), "cancel_requested",
    or "listening" (LISTEN (re)established)."""

    type: str
    id: int | None = None


def parse_notice(channel: str, payload: str) -> Notice | None:
    """The Notice a NOTIFY carries; None for one that is not ours (it is ignored)."""
    try:
        data = json.loads(payload) if payload else {}
    except json.JSONDecodeError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    job_id = data.get("id") if isinstance(data.get("id"), int) else None
    if channel == JOBS_CHANNEL:
        if data.get("type") == "gang_forming":
            return Notice("gang_forming", job_id)  # it only makes idle workers look for gangs to join
        return Notice("job_queued", job_id)  # any payload: it only wakes the claimer
    if channel == CONTROL_CHANNEL and data.get("type") == "cancel_requested":
        return Notice("cancel_requested", job_id)
    return None


class Backend(Protocol):
    async def prepare(self) -> None:
        """Connect (waiting for the database) and get ready to claim."""

    def notices(self) -> AsyncIterator[Notice]: ...

    async def claim(self, lease_seconds: float, free_gpus: int = 0) -> Claim | None:
        """The next queued job asking for at most `free_gpus` GPUs, now this worker's; raises a RETRYABLE error
        when the reply was lost."""

    async def release_orphans(self, running: list[int]) -> list[int]: ...

    # a job across several workers (gang.py)
    async def gang_open(self, claim: Claim, rendezvous: str, nodes: int) -> bool: ...

    async def gang_join(self, free_gpus: int) -> Claim | None: ...

    async def gang_state(self, job_id: int) -> dict[str, Any] | None: ...

    async def gang_give_back(self, claim: Claim) -> bool: ...

    async def gang_able(self, gpus: int) -> int: ...

    async def gang_set_ticket(self, claim: Claim, ticket_hash: bytes) -> bool: ...

    async def gang_member_beat(self, attempts: dict[int, int]) -> set[int]: ...

    async def gang_member_end(
        self, claim: Claim, outcome: str, error: str | None = None, error_at: float | None = None
    ) -> None: ...

    async def gang_members(self, claim: Claim) -> list[dict[str, Any]]: ...

    async def gang_lost(self, claim: Claim, error: str) -> None: ...

    async def renew(self, attempts: dict[int, int], lease_seconds: float) -> dict[int, Renewal]:
        """What the renewal found of the attempts still owned (see jobs.renew_leases)."""

    async def status(self, job_id: int, attempt: int) -> Status | None: ...

    async def set_child_ticket(self, claim: Claim, ticket_hash: bytes) -> bool:
        """Record the sha256 of the attempt's child ticket; False when the attempt no longer owns the job."""

    async def fail(self, claim: Claim, error: str) -> None: ...

    async def cancel(self, claim: Claim, by: str) -> None: ...

    async def requeue(self, claim: Claim) -> None: ...

    async def reap(self) -> list[dict[str, Any]]: ...

    async def queue_empty(self, gpus: int = 0) -> bool:
        """Nothing left for a drain (see jobs.queue_empty)."""

    async def idle_workers(self) -> tuple[int, int]:
        """(live workers with a free slot, live workers) in the fleet registry (see jobs.idle_workers)."""

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


class PgBackend:
    def __init__(self, settings: Settings, dsn: str) -> None:
        self.settings = settings
        self.dsn = dsn
        self.worker = settings.worker_id
        # claimer, poller, heartbeat and each settling attempt: a few statements at once at most
        self.pool = Pool(dsn, app=f"pgml-tuned {self.worker}", max_size=3 + settings.concurrency)
        self.keyring = secrets.Keyring(settings.keyring)
        self.token = token_urlsafe(24)  # fences this daemon's row in pgml.workers

    async def prepare(self) -> None:
        # the private keys an administrator put here; a worker never creates or registers one
        await self._load_keyring()
        for delay in backoff_delays(first=0.2, cap=10.0):
            try:
                async with await connect(self.dsn):
                    break
            except RETRYABLE as e:
                log.warning("daemon.db_unavailable", error=str(e).strip(), retry_in=round(delay, 2))
                await anyio.sleep(delay)
        await self.pool.open()

    async def _load_keyring(self) -> None:
        self.keyring = await anyio.to_thread.run_sync(secrets.Keyring.load, self.settings.keyring)
        for problem in self.keyring.problems:
            log.error("keyring.unusable_key", problem=problem)
        log.info("keyring.loaded", directory=str(self.keyring.directory), key_ids=sorted(self.keyring.keys))

    async def notices(self) -> AsyncIterator[Notice]:
        """LISTEN on a dedicated connection (to listen_dsn when set), forever: re-LISTENs (and says "listening")
        after every reconnect. Ends, saying so once, where notifications do not arrive: the daemon's poller still
        looks for work every poll_seconds."""
        delays = backoff_delays(first=0.05, cap=5.0)
        dsn = self.settings.listen_dsn or self.dsn
        while True:
            try:
                conn = await connect(dsn, app=f"pgml-tuned listen {self.worker}")
                async with conn:
                    await listen(conn, dsn, (JOBS_CHANNEL, CONTROL_CHANNEL))
                    delays = backoff_delays(first=0.05, cap=5.0)  # listening again: the next outage starts over
                    yield Notice("listening")  # anything queued while we were not listening
                    while True:
                        async for note in conn.notifies(timeout=max(5.0, self.settings.poll_seconds * 5)):
                            notice = parse_notice(note.channel, note.payload)
                            if notice is not None:
                                yield notice
                        await conn.execute("SELECT 1")  # quiet for a while: check the connection
            except ListenUnavailable as e:
                polling_instead("listener.polling", e, self.settings.poll_seconds)
                return
            except RETRYABLE as e:
                delay = next(delays)
                log.warning("listener.reconnect", error=str(e).strip(), retry_in=round(delay, 2))
                await anyio.sleep(delay)

    async def claim(self, lease_seconds: float, free_gpus: int = 0) -> Claim | None:
        return await jobs.claim(self.pool, self.worker, lease_seconds, free_gpus)

    async def release_orphans(self, running: list[int]) -> list[int]:
        return await jobs.release_orphans(self.pool, self.worker, running)

    async def gang_open(self, claim: Claim, rendezvous: str, nodes: int) -> bool:
        return await jobs.gang_open(self.pool, claim, rendezvous, nodes)

    async def gang_join(self, free_gpus: int) -> Claim | None:
        return await jobs.gang_join(self.pool, self.worker, free_gpus)

    async def gang_state(self, job_id: int) -> dict[str, Any] | None:
        return await jobs.gang_state(self.pool, job_id)

    async def gang_give_back(self, claim: Claim) -> bool:
        return await jobs.gang_give_back(self.pool, claim)

    async def gang_able(self, gpus: int) -> int:
        return await jobs.gang_able(self.pool, gpus)

    async def gang_set_ticket(self, claim: Claim, ticket_hash: bytes) -> bool:
        return await jobs.gang_set_ticket(self.pool, claim, ticket_hash)

    async def gang_member_beat(self, attempts: dict[int, int]) -> set[int]:
        return await jobs.gang_member_beat(self.pool, self.worker, attempts)

    async def gang_member_end(
        self, claim: Claim, outcome: str, error: str | None = None, error_at: float | None = None
    ) -> None:
        await jobs.gang_member_end(self.pool, claim, outcome, error, error_at)

    async def gang_members(self, claim: Claim) -> list[dict[str, Any]]:
        return await jobs.gang_members(self.pool, claim)

    async def gang_lost(self, claim: Claim, error: str) -> None:
        await jobs.gang_lost(self.pool, claim, error)

    async def renew(self, attempts: dict[int, int], lease_seconds: float) -> dict[int, Renewal]:
        return await jobs.renew_leases(self.pool, attempts, lease_seconds)

    async def status(self, job_id: int, attempt: int) -> Status | None:
        return await jobs.status(self.pool, job_id, attempt)

    async def set_child_ticket(self, claim: Claim, ticket_hash: bytes) -> bool:
        return await jobs.set_child_ticket(self.pool, claim, ticket_hash)

    async def fail(self, claim: Claim, error: str) -> None:
        await jobs.fail(self.pool, claim, error)

    async def cancel(self, claim: Claim, by: str) -> None:
        await jobs.cancel_running(self.pool, claim, by)

    async def requeue(self, claim: Claim) -> None:
        await jobs.requeue(self.pool, claim)

    async def reap(self) -> list[dict[str, Any]]:
        return await jobs.reap_expired(self.pool)

    async def queue_empty(self, gpus: int = 0) -> bool:
        return await jobs.queue_empty(self.pool, self.worker, gpus)

    async def idle_workers(self) -> tuple[int, int]:
        return await jobs.idle_workers(self.pool)

    async def register(self, info: dict[str, Any]) -> None:
        try:
            await self.pool.named(
                "worker_register", worker=self.worker, token=self.token, **{**info, "devices": Jsonb(info["devices"])}
            )
        except psycopg.errors.UndefinedFunction as e:
            found = await self.pool.one(q("registry_exists"))
            if found and found["found"]:
                raise  # a bug, not an old schema
            raise RegistryMissing(str(e).strip()) from None

    async def beat(self, state: dict[str, Any]) -> bool:
        rows = await self.pool.named(
            "worker_heartbeat",
            retry=False,  # not through an outage: the next heartbeat tries again
            worker=self.worker,
            token=self.token,
            **{**state, "models_cached": Jsonb(state["models_cached"])},
        )
        return bool(rows and rows[0]["owned"])

    async def unregister(self) -> None:
        await self.pool.named("worker_stop", worker=self.worker, token=self.token)

    async def jobs_by_status(self) -> list[dict[str, Any]]:
        return await self.pool.fetch(q("jobs_by_status"))

    async def job_secrets(self, claim: Claim) -> dict[str, Any]:
        if claim.credential:
            name = await jobs.job_credential(self.pool, claim)
            if name is None:
                return {}
            token = await anyio.to_thread.run_sync(secrets.read_credential, self.settings.credentials, name)
            return {"hub_token": token}
        if not claim.secrets:
            return {}
        key_id = claim.secrets.split(":", 2)[1] if claim.secrets.count(":") >= 2 else ""
        if key_id not in self.keyring.keys:
            await self._load_keyring()  # a key added to the keyring since this worker started
        try:
            return self.keyring.unseal(claim.secrets, claim.id, claim.submitted_by)
        except secrets.SecretError as e:
            log.error("job.secrets_unopened", detail=e.detail, keyring=str(self.keyring.directory))
            raise

    async def close(self) -> None:
        await self.pool.close()
