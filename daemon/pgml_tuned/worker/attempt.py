"""One attempt at one job on this worker: unseal its secrets, give its child a ticket, start the child, forward
the child's events, stop the child when asked (cancel, lost lease, shutdown), then settle how it ended
(states.settle) and write that transition through the Backend. Leases are renewed for all attempts at once by
the daemon.
"""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Awaitable, Callable
from secrets import token_urlsafe
from typing import Any, Protocol

import anyio
import structlog

from .. import logconfig, secrets
from ..states import Action, Claim, StopReason, settle
from .backend import Backend

log = logconfig.get("pgml_tuned.worker")

OUTCOMES = {
    Action.DONE: "succeeded",
    Action.FAIL: "failed",
    Action.CANCEL: "cancelled",
    Action.REQUEUE: "requeued",
    Action.ABANDON: "abandoned",
}


class Child(Protocol):
    """What an attempt needs of its child process (process.ChildProcess; a fake one in unit tests)."""

    error: str | None
    lease_lost_reported: bool

    async def run(self, on_event: Callable[[dict[str, Any]], None]) -> int: ...

    def terminate(self, sig: signal.Signals = signal.SIGTERM) -> None: ...

    def kill(self) -> None: ...

    def describe_exit(self, rc: int) -> str: ...


Launcher = Callable[[dict[str, Any], dict[str, str]], Awaitable[Child]]


class Attempt:
    def __init__(self, claim: Claim, slot: int, slots: list[int] | None = None, metrics: Any = None) -> None:
        self.claim = claim
        self.slot = slot
        self.slots = slots or [slot]  # every job slot it holds: one per GPU it asked for (resources.gpus)
        self.metrics = metrics  # metrics.Metrics with --metrics-port: durations, checkpoint bytes
        self.child: Child | None = None
        self.stop_reason: StopReason | None = None
        self._kill = False
        self._signal = signal.SIGTERM

    def stop(self, reason: StopReason, *, kill: bool, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the child (`sig`, SIGTERM or the SIGINT that stopped the daemon: it checkpoints and exits; kill:
        SIGKILL). The first reason is the one settled on; a stop that comes before the child started is applied
        as soon as it has."""
        if self.stop_reason is None:
            self.stop_reason, self._signal = reason, sig
        self._kill = self._kill or kill
        if self.child is not None:
            self.child.kill() if self._kill else self.child.terminate(self._signal)

    async def run(self, backend: Backend, launch: Launcher, env: dict[str, str], dsn: str) -> None:
        """Run the attempt; `dsn` is the children's login (settings.child_dsn)."""
        job = self.claim
        with structlog.contextvars.bound_contextvars(job_id=job.id, attempt=job.attempt):
            try:
                await self._run(backend, launch, env, dsn)
            except Exception as e:  # a bug or an OS error here fails this job, never the worker
                log.exception("job.runner_error")
                with anyio.CancelScope(shield=True):
                    await backend.fail(job, f"pgml-tuned worker error: {type(e).__name__}: {e}")

    async def _run(self, backend: Backend, launch: Launcher, env: dict[str, str], dsn: str) -> None:
        job = self.claim
        log.info("job.claimed", task=job.task, project=job.project_name, model=job.model_name)
        # the hub allow-list may have changed between submit and claim; then the job starts nothing
        refusal, unsealed = job.hub_refusal, {}
        if refusal is None:
            try:
                unsealed = await backend.job_secrets(job)
            except secrets.SecretError as e:
                refusal = str(e)
        if refusal is not None:
            await backend.fail(job, refusal)
            log.error("job.failed", error=refusal)
            return
        # The child's database access is this ticket: the job row keeps only its hash, and every pgml._child_*
        # function refuses any other job, and this one once the attempt is over.
        ticket = token_urlsafe(32)
        if not await backend.set_child_ticket(job, hashlib.sha256(ticket.encode()).digest()):
            log.warning("job.abandoned", reason="lease lost before the child started")
            return
        child = await launch({"spec": job.spec(), "secrets": unsealed, "dsn": dsn, "ticket": ticket}, env)
        self.child = child
        if self.stop_reason is not None:
            self.stop(self.stop_reason, kill=self._kill, sig=self._signal)
        started = time.monotonic()
        rc = await child.run(self._on_event)
        with anyio.CancelScope(shield=True):
            status = await backend.status(job.id, job.attempt)
            description = child.describe_exit(rc)
            transition = settle(
                rc,
                self.stop_reason,
                status,
                error_reported=child.error is not None,
                lease_lost_reported=child.lease_lost_reported,
                description=description,
            )
            if transition.action == Action.DONE:
                log.info("job.succeeded")
            elif transition.action == Action.CANCEL:
                await backend.cancel(job, by="pgml.cancel")
                log.info("job.cancelled", rc=rc)
            elif transition.action == Action.REQUEUE:
                await backend.requeue(job)
                log.info("job.requeued", rc=rc)
            elif transition.action == Action.FAIL:
                await backend.fail(job, transition.error or description)
                log.error("job.failed", rc=rc, error=transition.error)
            else:
                log.warning("job.abandoned", reason="lease lost", rc=rc, stop_reason=self.stop_reason, status=status)
            if self.metrics is not None:
                outcome = OUTCOMES[transition.action]
                self.metrics.duration.labels(outcome).observe(time.monotonic() - started)

    def _on_event(self, event: dict[str, Any]) -> None:
        on_child_event(event)
        if self.metrics is not None:
            self.metrics.on_child_event(event)


def on_child_event(event: dict[str, Any]) -> None:
    kind = event.get("event")
    if kind == "log":
        log.info("train.log", **event["logs"])
    elif kind == "info":
        getattr(log, event.get("level", "info"), log.info)("job.info", message=event.get("message"))
    elif kind == "error":
        log.error("job.error", error=event.get("error"))
