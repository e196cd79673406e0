"""The daemon: one root anyio task group with

- listener   LISTEN pgml_jobs / pgml_control on an autocommit connection (re-LISTENs after reconnecting)
- poller     every poll_seconds: reap expired leases, then wake the claimer (a lost NOTIFY never stalls)
- claimer    claims queued jobs while job slots are free (FOR UPDATE SKIP LOCKED, one short statement)
- one task per running job: child process + heartbeat (lease renewal, cancel requests)
- signals    SIGTERM/SIGINT: stop claiming, SIGTERM children (they checkpoint), requeue, exit within
             grace_seconds; a second signal exits at once (leases then expire as after a crash)
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any

import anyio
import structlog

from . import jobs, logs, secrets
from .config import Settings
from .db import RETRYABLE, Db, backoff_delays, connect
from .jobs import EXIT_LEASE_LOST, EXIT_OK, EXIT_REQUEUE, Claim
from .runner import Child, child_env
from .sql import q

log = logs.get("pgml_tuned.daemon")


class Daemon:
    def __init__(self, settings: Settings, dsn: str, *, drain: bool = False) -> None:
        self.settings = settings
        self.dsn = dsn
        self.drain = drain
        self.db = Db(dsn, app=f"pgml-tuned {settings.worker_id}")
        self.wake = anyio.Event()
        self.stopping = False
        self.running: dict[int, tuple[Claim, Child | None]] = {}
        self.free_slots = list(range(settings.concurrency))
        self.key: secrets.WorkerKey | None = None
        self.claimed = 0
        self._root: anyio.CancelScope | None = None
        self._idle = anyio.Event()

    # ---- lifecycle ----
    async def serve(self) -> None:
        self.key = await anyio.to_thread.run_sync(secrets.load_or_create_key, self.settings.key_file)
        for delay in backoff_delays(first=0.2, cap=10.0):
            try:
                async with await connect(self.dsn) as conn:
                    await secrets.register_key(conn, self.key)
                break
            except RETRYABLE as e:
                log.warning("daemon.db_unavailable", error=str(e).strip(), retry_in=round(delay, 2))
                await anyio.sleep(delay)
        self.settings.scratch.mkdir(parents=True, exist_ok=True)
        log.info("daemon.start", worker=self.settings.worker_id, concurrency=self.settings.concurrency,
                 drain=self.drain, lease_seconds=self.settings.lease_seconds)
        try:
            async with anyio.create_task_group() as tg:
                self._root = tg.cancel_scope
                tg.start_soon(self._signals, tg)
                tg.start_soon(self._listener)
                tg.start_soon(self._poller)
                tg.start_soon(self._claimer, tg)
        finally:
            with anyio.CancelScope(shield=True):
                await self.db.close()
            log.info("daemon.stop", worker=self.settings.worker_id, jobs_claimed=self.claimed)

    def _finish_if_idle(self) -> None:
        if self.stopping and not self.running and self._root is not None:
            self._root.cancel()

    # ---- signals ----
    async def _signals(self, tg: anyio.abc.TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            async for sig in received:
                if not self.stopping:
                    log.info("daemon.shutdown", signal=sig.name, running=len(self.running),
                             grace_seconds=self.settings.grace_seconds)
                    self.stopping = True
                    for _, child in self.running.values():
                        if child:
                            child.terminate("shutdown")
                    tg.start_soon(self._grace_then_kill)
                    self._finish_if_idle()
                else:
                    log.warning("daemon.exit_now", signal=sig.name, running=len(self.running))
                    self._kill_all("exit")
                    if self._root is not None:
                        self._root.cancel()

    async def _grace_then_kill(self) -> None:
        await anyio.sleep(self.settings.grace_seconds)
        if self.running:
            log.warning("daemon.grace_expired", running=len(self.running))
        self._kill_all("shutdown")

    def _kill_all(self, reason: str) -> None:
        for _, child in self.running.values():
            if child:
                child.kill(reason)

    # ---- listening and polling ----
    async def _listener(self) -> None:
        delays = backoff_delays(first=0.05, cap=5.0)
        while True:
            try:
                conn = await connect(self.dsn, app=f"pgml-tuned listen {self.settings.worker_id}")
                async with conn:
                    await conn.execute("LISTEN pgml_jobs")
                    await conn.execute("LISTEN pgml_control")
                    delays = backoff_delays(first=0.05, cap=5.0)  # listening again: the next outage starts over
                    self.wake.set()  # anything queued while we were not listening
                    while True:
                        async for note in conn.notifies(timeout=max(5.0, self.settings.poll_seconds * 5)):
                            if note.channel == "pgml_jobs":
                                self.wake.set()
                            elif note.channel == "pgml_control":
                                self._control(note.payload)
                        await conn.execute("SELECT 1")  # quiet for a while: check the connection
            except RETRYABLE as e:
                delay = next(delays)
                log.warning("listener.reconnect", error=str(e).strip(), retry_in=round(delay, 2))
                await anyio.sleep(delay)

    def _control(self, payload: str) -> None:
        command, _, arg = payload.partition(":")
        if command == "cancel" and arg.isdigit() and int(arg) in self.running:
            _, child = self.running[int(arg)]
            if child:
                log.info("job.cancel", job_id=int(arg))
                child.kill("cancelled")

    async def _poller(self) -> None:
        while True:
            await anyio.sleep(self.settings.poll_seconds)
            with contextlib.suppress(*RETRYABLE):
                for row in await jobs.reap_expired(self.db):
                    log.warning("job.lease_expired", job_id=row["id"], attempt=row["attempt"], now=row["status"])
            self.wake.set()

    # ---- claiming ----
    async def _claimer(self, tg: anyio.abc.TaskGroup) -> None:
        while True:
            await self.wake.wait()
            self.wake = anyio.Event()
            while self.free_slots and not self.stopping:
                try:
                    job = await jobs.claim(self.db, self.settings.worker_id, self.settings.lease_seconds)
                except RETRYABLE as e:
                    # the claim may have committed without us hearing back: put such a job back at once
                    log.warning("claim.connection_lost", error=str(e).strip())
                    released = await jobs.release_orphans(self.db, self.settings.worker_id, list(self.running))
                    if released:
                        log.warning("claim.released_orphans", jobs=released)
                    continue
                if job is None:
                    break
                self.claimed += 1
                slot = self.free_slots.pop(0)
                self.running[job.id] = (job, None)
                tg.start_soon(self._run_job, job, slot)
            if self.drain and not self.running and not self.stopping:
                row = await self.db.one(q("queue_empty"))
                if row and row["empty"]:
                    log.info("daemon.drained", jobs_claimed=self.claimed)
                    self.stopping = True
                    self._finish_if_idle()
            if self.stopping:
                self._finish_if_idle()

    # ---- one job ----
    async def _run_job(self, job: Claim, slot: int) -> None:
        with structlog.contextvars.bound_contextvars(job_id=job.id, attempt=job.attempt):
            try:
                await self._run_job_inner(job, slot)
            except Exception as e:  # a bug or an OS error here fails this job, never the daemon
                log.exception("job.runner_error")
                with anyio.CancelScope(shield=True):
                    await jobs.fail(self.db, job, f"pgml-tuned worker error: {type(e).__name__}: {e}")
            finally:
                self.running.pop(job.id, None)
                self.free_slots.append(slot)
                self.free_slots.sort()
                self.wake.set()
                self._finish_if_idle()

    async def _run_job_inner(self, job: Claim, slot: int) -> None:
        log.info("job.claimed", task=job.task, project=job.project_name, model=job.model_name)
        try:
            unsealed = secrets.unseal(job.secrets, self.key) if job.secrets and self.key else {}
        except secrets.SecretError as e:
            await jobs.fail(self.db, job, str(e))
            log.error("job.failed", error=str(e))
            return
        gpus = self.settings.gpu_list
        env = child_env(self.dsn, str(self.settings.scratch), gpus[slot] if gpus else None)
        child = await Child.start({"spec": job.spec(), "secrets": unsealed}, env)
        self.running[job.id] = (job, child)
        if self.stopping:
            child.terminate("shutdown")
        rc = -1
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeat, job, child)
            rc = await child.run(lambda event: self._on_event(event))
            tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await self._settle(job, child, rc)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "log":
            log.info("train.log", **event["logs"])
        elif kind == "info":
            getattr(log, event.get("level", "info"), log.info)("job.info", message=event.get("message"))
        elif kind == "error":
            log.error("job.error", error=event.get("error"))

    async def _heartbeat(self, job: Claim, child: Child) -> None:
        while True:
            await anyio.sleep(self.settings.heartbeat_seconds)
            cancel = await jobs.renew(self.db, job, self.settings.lease_seconds)
            if cancel is None:
                row = await self.db.one(q("job_status"), {"id": job.id})
                if row and row["attempt"] == job.attempt and row["status"] == jobs.Status.SUCCEEDED:
                    return  # the child committed its results and is exiting
                log.error("job.lease_lost", note="another worker owns this job now; stopping the child",
                          status=row and row["status"], current_attempt=row and row["attempt"])
                child.kill("lease_lost")
                return
            if cancel:
                child.kill("cancelled")
                return

    async def _settle(self, job: Claim, child: Child, rc: int) -> None:
        """Record how the attempt ended (the daemon's transitions of the state machine)."""
        reason = child.stop_reason
        if reason == "lease_lost" or rc == EXIT_LEASE_LOST or child.lease_lost_event:
            log.warning("job.abandoned", reason="lease lost", rc=rc)
        elif reason == "cancelled":
            await jobs.cancel_running(self.db, job, by="pgml.cancel")
            log.info("job.cancelled", rc=rc)
        elif rc == EXIT_OK:
            status = await jobs.status(self.db, job.id)
            if status == jobs.Status.SUCCEEDED:
                log.info("job.succeeded")
            else:
                await jobs.fail(self.db, job, f"the training process exited without storing results (status {status})")
        elif rc == EXIT_REQUEUE or reason == "shutdown":
            await jobs.requeue(self.db, job)
            log.info("job.requeued", rc=rc)
        else:
            error = child.describe_exit(rc)
            await jobs.fail(self.db, job, error)
            log.error("job.failed", rc=rc, error=error)


async def serve(settings: Settings, dsn: str, *, drain: bool = False) -> Daemon:
    daemon = Daemon(settings, dsn, drain=drain)
    await daemon.serve()
    return daemon
