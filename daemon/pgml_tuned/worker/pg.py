"""The Backend in PostgreSQL: every statement the worker sends, by its name in sql/queries.sql (db.q), over a
small connection pool (db.Pool), plus one dedicated LISTEN connection. The job state machine these statements
carry out is in states.py.

Each statement is one short transaction; every write after the claim is fenced on the attempt (id, attempt,
status = 'running'), so a worker whose lease was taken over matches no row. A statement is retried through a
server restart (Pool's default) except where a lost reply may have committed: the claim and a gang's join.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from secrets import token_urlsafe
from typing import Any

import anyio
import psycopg
from psycopg.types.json import Jsonb

from .. import logconfig, secrets
from ..config import Settings
from ..db import RETRYABLE, Pool, Row, backoff_delays, connect, q
from ..listening import ListenUnavailable, listen, polling_instead
from ..states import Claim, Renewal, Status
from .backend import CONTROL_CHANNEL, JOBS_CHANNEL, Notice, RegistryMissing, parse_notice

log = logconfig.get("pgml_tuned.worker.backend")


class LoginRefused(Exception):
    """The worker's login would bypass row-level security: `serve` refuses it (its message says the fix)."""


def login_refusal(row: Row) -> str | None:
    """Why the worker's login (the worker_login row) may not serve: None when it is subject to row-level security."""
    why = (
        "a superuser"
        if row["superuser"]
        else "a role with BYPASSRLS"
        if row["bypassrls"]
        else f"a member of {row['owner']}, the owner of pgml's tables"
        if row["owns"]
        else None
    )
    if why is None:
        return None
    return (
        f"the worker's login {row['login']} is {why}: row-level security does not apply to it, so this daemon, its "
        "training children and its serving process would read and write every user's rows. Serve as a login that "
        "is only in pgml_worker: CREATE ROLE pgml_worker_login LOGIN PASSWORD '...'; "
        "GRANT pgml_worker TO pgml_worker_login; then PGML_DSN=postgresql://pgml_worker_login@HOST/DB "
        "(a throwaway test database only: --allow-superuser)"
    )


class PgBackend:
    """The worker's Backend (backend.py) over PostgreSQL."""

    def __init__(self, settings: Settings, dsn: str, *, allow_superuser: bool = False) -> None:
        self.settings = settings
        self.dsn = dsn
        self.allow_superuser = allow_superuser
        self.worker = settings.worker_id
        # claimer, poller, heartbeat and each settling attempt: a few statements at once at most
        self.pool = Pool(dsn, app=f"pgml-tuned {self.worker}", max_size=3 + settings.concurrency)
        self.keyring = secrets.Keyring(settings.keyring)
        self.token = token_urlsafe(24)  # fences this daemon's row in pgml.workers

    async def prepare(self) -> None:
        # the private keys an administrator put here; a worker never creates or registers one
        await self._load_keyring()
        login: Row | None = None
        for delay in backoff_delays(first=0.2, cap=10.0):
            try:
                async with await connect(self.dsn) as conn:
                    login = await (await conn.execute(q("worker_login"))).fetchone()
                    break
            except RETRYABLE as e:
                log.warning("daemon.db_unavailable", error=str(e).strip(), retry_in=round(delay, 2))
                await anyio.sleep(delay)
        refusal = login_refusal(login) if login is not None else None
        if refusal is not None and not self.allow_superuser:
            raise LoginRefused(refusal)
        if refusal is not None:
            log.warning("daemon.login_bypasses_rls", login=login["login"] if login else None, note=refusal)
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

    # ---- claims, leases and how an attempt ends ----
    async def claim(self, lease_seconds: float, free_gpus: int = 0) -> Claim | None:
        # not retried: a claim whose reply was lost may have committed (the daemon then runs release_orphans)
        rows = await self.pool.named(
            "claim_job", retry=False, worker=self.worker, lease_seconds=lease_seconds, free_gpus=free_gpus
        )
        return Claim.from_row(rows[0]) if rows else None

    async def release_orphans(self, running: list[int]) -> list[int]:
        return [r["id"] for r in await self.pool.named("release_orphans", worker=self.worker, running=running)]

    async def renew(self, attempts: dict[int, int], lease_seconds: float) -> dict[int, Renewal]:
        ids = list(attempts)
        rows = await self.pool.named(
            "renew_leases", ids=ids, attempts=[attempts[i] for i in ids], lease_seconds=lease_seconds
        )
        return {r["id"]: Renewal(bool(r["cancel_requested"]), bool(r["overtime"])) for r in rows}

    async def status(self, job_id: int, attempt: int) -> Status | None:
        row = await self.pool.one(q("job_status"), {"id": job_id})
        return Status(row["status"]) if row and row["attempt"] == attempt else None

    async def set_child_ticket(self, claim: Claim, ticket_hash: bytes) -> bool:
        return bool(await self.pool.named("set_child_ticket", id=claim.id, attempt=claim.attempt, hash=ticket_hash))

    async def fail(self, claim: Claim, error: str) -> None:
        await self.pool.named("fail_job", id=claim.id, attempt=claim.attempt, error=error)

    async def cancel(self, claim: Claim, by: str) -> None:
        await self.pool.named("cancel_running", id=claim.id, attempt=claim.attempt, by=by)

    async def requeue(self, claim: Claim) -> None:
        await self.pool.named("requeue_job", id=claim.id, attempt=claim.attempt)

    async def reap(self) -> list[dict[str, Any]]:
        return await self.pool.named("reap_expired")

    async def sweep_tables(self) -> int:
        row = await self.pool.one(q("job_tables_sweep"), {})
        return int(row["dropped"]) if row else 0

    async def queue_empty(self, gpus: int = 0) -> bool:
        row = await self.pool.one(q("queue_empty"), {"worker": self.worker, "gpus": gpus})
        return bool(row and row["empty"])

    # ---- gangs: jobs across several workers (gang.py tells the story) ----
    async def gang_open(self, claim: Claim, rendezvous: str, secret: str, nodes: int) -> bool:
        rows = await self.pool.named(
            "gang_open", id=claim.id, attempt=claim.attempt, rendezvous=rendezvous, secret=secret, nodes=nodes
        )
        return bool(rows)

    async def gang_join(self, free_gpus: int) -> Claim | None:
        try:  # not retried, as a claim
            rows = await self.pool.named("gang_join", retry=False, worker=self.worker, free_gpus=free_gpus)
        except psycopg.errors.UniqueViolation:
            return None  # another worker took that node number in the same instant: the next wake-up looks again
        if not rows:
            return None
        row = rows[0]
        if int(row["gang_needed_after"]) > 0:
            await self.pool.named("gang_notify")  # more members wanted: wake the next one
        return Claim.from_row(row)

    async def gang_state(self, job_id: int) -> Row | None:
        return await self.pool.one(q("gang_state"), {"id": job_id})

    async def gang_give_back(self, claim: Claim) -> bool:
        return bool(await self.pool.named("gang_give_back", id=claim.id, attempt=claim.attempt))

    async def gang_able(self, gpus: int) -> int:
        row = await self.pool.one(q("gang_live_workers"), {"gpus": gpus})
        return int(row["able"]) if row else 0

    async def gang_set_ticket(self, claim: Claim, ticket_hash: bytes) -> bool:
        rows = await self.pool.named(
            "gang_set_ticket", id=claim.id, attempt=claim.attempt, node=claim.node, hash=ticket_hash
        )
        return bool(rows)

    async def gang_member_beat(self, attempts: dict[int, int]) -> set[int]:
        ids = list(attempts)
        rows = await self.pool.named(
            "gang_member_beat", worker=self.worker, ids=ids, attempts=[attempts[i] for i in ids]
        )
        return {int(r["id"]) for r in rows}

    async def gang_member_end(
        self, claim: Claim, outcome: str, error: str | None = None, error_at: float | None = None
    ) -> None:
        params: dict[str, Any] = {"outcome": outcome, "error": error, "error_at": error_at}
        await self.pool.named("gang_member_end", id=claim.id, attempt=claim.attempt, node=claim.node, **params)

    async def gang_members(self, claim: Claim) -> list[Row]:
        return await self.pool.named("gang_members", id=claim.id, attempt=claim.attempt)

    async def gang_lost(self, claim: Claim, error: str) -> None:
        await self.pool.named("gang_lost", id=claim.id, attempt=claim.attempt, error=error)

    # ---- the fleet registry (pgml.workers) ----
    async def idle_workers(self) -> tuple[int, int]:
        row = await self.pool.one(q("idle_workers"))
        return (int(row["idle"]), int(row["live"])) if row else (0, 0)

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
            **{**state, "models_cached": Jsonb(state["models_cached"]), "serving": Jsonb(state["serving"])},
        )
        return bool(rows and rows[0]["owned"])

    async def unregister(self) -> None:
        await self.pool.named("worker_stop", worker=self.worker, token=self.token)

    async def jobs_by_status(self) -> list[dict[str, Any]]:
        return await self.pool.fetch(q("jobs_by_status"))

    # ---- a job's secrets ----
    async def job_secrets(self, claim: Claim) -> dict[str, Any]:
        if claim.credential:
            name = await self._credential(claim)
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

    async def _credential(self, claim: Claim) -> str | None:
        """The name of the job's credential, asked again at every attempt: raises secrets.SecretError (the
        database's reason, e.g. the credential was revoked) if the submitter may no longer use it."""
        try:
            rows = await self.pool.named("job_credential", id=claim.id, attempt=claim.attempt)
        except (psycopg.errors.InsufficientPrivilege, psycopg.errors.NoDataFound) as e:
            message, hint = e.diag.message_primary or str(e), e.diag.message_hint
            raise secrets.SecretError(f"{message}: {hint}" if hint else message) from None
        return rows[0]["credential"] if rows else None

    async def close(self) -> None:
        await self.pool.close()
