"""One attempt at one job on this worker: unseal its secrets, give its child a ticket, start the child, forward
the child's events, stop the child when asked (cancel, lost lease, shutdown), then settle how it ended
(states.settle) and write that transition through the Backend. Leases are renewed for all attempts at once by
the daemon. A job across several workers (gang.py) first forms its gang: the leader settles the job for all of
them (gang.judge), a member only reports how its ranks ended.
"""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from secrets import token_urlsafe
from typing import Any, Protocol

import anyio
import structlog

from .. import logconfig, secrets
from ..states import Action, Claim, ExitCode, Status, StopReason, requested_gpus, settle
from . import gang
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
    def __init__(
        self,
        claim: Claim,
        slot: int,
        slots: list[int] | None = None,
        metrics: Any = None,
        plan: gang.Plan | None = None,
        worker: str = "",
    ) -> None:
        self.claim = claim
        self.slot = slot
        self.slots = slots or [slot]  # every job slot it holds: one per GPU it asked for (resources.gpus)
        self.metrics = metrics  # metrics.Metrics with --metrics-port: durations, checkpoint bytes
        self.plan = plan  # its part in a job across several workers (gang.py); None on one host
        self.worker = worker
        self.child: Child | None = None
        self.stop_reason: StopReason | None = None
        self.error_at: float | None = None  # when the child's launcher saw its first failure (a gang compares)
        # a gang's rendezvous secret (child/rendezvous.py): made by its leader, read from the database by a member
        self.rendezvous_secret: str | None = claim.rendezvous_secret
        self._kill = False
        self._signal = signal.SIGTERM

    @property
    def member(self) -> bool:
        """A member of another worker's gang (it never writes the job's state)."""
        return self.plan is not None and not self.plan.leader

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
        if self.member:
            log.info("job.joined", task=job.task, project=job.project_name, node=job.node, rendezvous=job.rendezvous)
        else:
            log.info("job.claimed", task=job.task, project=job.project_name, model=job.model_name)
        # the hub allow-list may have changed between submit and claim; then the job starts nothing
        refusal, unsealed = job.hub_refusal, {}
        if refusal is None:
            try:
                unsealed = await backend.job_secrets(job)
            except secrets.SecretError as e:
                refusal = str(e)
        if refusal is not None:
            if self.member:
                await backend.gang_member_end(job, "error", refusal, time.time())
            else:
                await backend.fail(job, refusal)
            log.error("job.failed", error=refusal)
            return
        rendezvous = None
        if self.plan is not None:
            rendezvous = await (self._form(backend) if self.plan.leader else self._await_gang(backend))
            if rendezvous is None:
                return
        # The child's database access is this ticket: the job row keeps only its hash, and every pgml._child_*
        # function refuses any other job, and this one once the attempt is over. A gang member's ticket only reads.
        ticket = token_urlsafe(32)
        ticket_hash = hashlib.sha256(ticket.encode()).digest()
        if not await (
            backend.gang_set_ticket(job, ticket_hash) if self.member else backend.set_child_ticket(job, ticket_hash)
        ):
            log.warning("job.abandoned", reason="lease lost before the child started")
            return
        payload: dict[str, Any] = {"spec": job.spec(), "secrets": unsealed, "dsn": dsn, "ticket": ticket}
        if self.plan is not None and rendezvous is not None:
            if not self.rendezvous_secret:  # a member reads it with the job (gang_join): not found is a bug
                error = "this gang member found no rendezvous secret for the attempt (pgml.gang_secrets)"
                await backend.gang_member_end(job, "error", error, time.time())
                log.error("job.failed", error=error)
                return
            payload["gang"] = self.plan.payload(rendezvous, self.rendezvous_secret)
        child = await launch(payload, env)
        self.child = child
        if self.stop_reason is not None:
            self.stop(self.stop_reason, kill=self._kill, sig=self._signal)
        started = time.monotonic()
        rc = await child.run(self._on_event)
        with anyio.CancelScope(shield=True):
            if self.member:
                await self._report(backend, rc)
                return
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
            if self.plan is not None and transition.action == Action.FAIL:
                verdict = await self._judge(backend, child.error)
                if verdict.action == "lost":
                    await backend.gang_lost(job, verdict.error or description)
                    log.error("job.gang_lost", error=verdict.error)
                    return
                if verdict.action == "fail":
                    transition = replace(transition, error=verdict.error)
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

    # ---- a job across several workers (gang.py) ----
    async def _form(self, backend: Backend) -> str | None:
        """The leader: open the gang and wait for it to form. Returns the rendezvous once every member has joined;
        None when the attempt ends here (given back untouched, failed, cancelled, or no longer this worker's)."""
        job, plan = self.claim, self.plan
        assert plan is not None
        rendezvous = gang.rendezvous_at(plan.address)
        self.rendezvous_secret = gang.new_secret()  # for this attempt's ranks only (pgml.gang_secrets for the members)
        if not await backend.gang_open(job, rendezvous, self.rendezvous_secret, plan.nodes):
            log.warning("job.abandoned", reason="lease lost before the gang formed")
            return None
        log.info("job.gang_forming", nodes=plan.nodes, rendezvous=rendezvous, wait_seconds=plan.form_seconds)
        deadline = time.monotonic() + plan.form_seconds
        while True:
            state = await backend.gang_state(job.id)
            if not state or state["attempt"] != job.attempt or state["status"] != Status.RUNNING:
                log.warning("job.abandoned", reason="the job left this attempt while its gang formed")
                return None
            if int(state["gang_needed"]) == 0:
                log.info("job.gang_formed", nodes=plan.nodes)
                return rendezvous
            if self.stop_reason == StopReason.CANCELLED:
                await backend.cancel(job, by="pgml.cancel")
                log.info("job.cancelled", note="while its gang formed")
                return None
            if self.stop_reason == StopReason.LEASE_LOST:
                return None
            if self.stop_reason is not None or time.monotonic() > deadline:
                return await self._give_back(backend, int(state["gang_needed"]), rendezvous)
            await anyio.sleep(gang.POLL_SECONDS)

    async def _give_back(self, backend: Backend, missing: int, rendezvous: str) -> str | None:
        """The gang did not form in time (or the worker is stopping): fail the job when the fleet is too small for
        it ever to form, else give it back untouched. Returns the rendezvous when the last member joined first."""
        job, plan = self.claim, self.plan
        assert plan is not None
        able = await backend.gang_able(requested_gpus(job.hyperparams))
        if self.stop_reason is None and able < plan.nodes:
            error = (
                f"hyperparams.resources.nodes = {plan.nodes}: the job needs {plan.nodes} workers at once and "
                f"{able} live worker{'' if able == 1 else 's'} could run a part of it (pgml.worker_status); start "
                f"pgml-tuned serve on {plan.nodes - able} more host{'' if plan.nodes - able == 1 else 's'} and "
                "submit it again, or leave resources.nodes out to train on one host"
            )
            await backend.fail(job, error)  # fenced on this attempt, as every write of the worker's
            log.error("job.failed", error=error)
            return None
        if await backend.gang_give_back(job):
            log.info(
                "job.gang_given_back",
                message=f"{missing} of {plan.nodes - 1} members did not join in {plan.form_seconds:.0f} s"
                if self.stop_reason is None
                else f"the worker is stopping ({self.stop_reason}) before the gang formed",
                note="the job is back in the queue, untouched",
            )
            return None
        state = await backend.gang_state(job.id)  # the give-back matched nothing: did the gang complete first?
        if state and state["attempt"] == job.attempt and state["status"] == Status.RUNNING:
            return rendezvous if int(state["gang_needed"]) == 0 else None
        return None

    async def _await_gang(self, backend: Backend) -> str | None:
        """A member: wait until every member has joined. Returns the leader's rendezvous; None when the gang was
        given back (or the job ended) first. A member being stopped gives the forming gang back."""
        job = self.claim
        while True:
            state = await backend.gang_state(job.id)
            if not state or state["attempt"] != job.attempt or state["status"] != Status.RUNNING:
                log.info("job.gang_dissolved", note="the leader gave the job back (or it ended) before its gang formed")
                return None
            if int(state["gang_needed"]) == 0:
                return job.rendezvous
            if self.stop_reason is not None and await backend.gang_give_back(job):
                log.info("job.gang_given_back", note=f"this member is stopping ({self.stop_reason})")
                return None
            await anyio.sleep(gang.POLL_SECONDS)

    async def _report(self, backend: Backend, rc: int) -> None:
        """A member's end: how its ranks ended, on its row (the leader settles the job)."""
        child = self.child
        assert child is not None
        if rc == 0:
            await backend.gang_member_end(self.claim, "ok")
        elif child.error is not None:
            await backend.gang_member_end(self.claim, "error", child.error, self.error_at)
        elif self.stop_reason is not None or rc == ExitCode.REQUEUE:
            await backend.gang_member_end(self.claim, "stopped")
        else:
            await backend.gang_member_end(self.claim, "error", child.describe_exit(rc), self.error_at or time.time())
        log.info("job.gang_part_ended", rc=rc, stop_reason=self.stop_reason, error=child.error)

    async def _judge(self, backend: Backend, error: str | None) -> gang.Verdict:
        """The leader, its ranks failed: wait (briefly) for the members' reports, then judge the gang's end."""
        plan = self.plan
        assert plan is not None
        deadline = time.monotonic() + plan.silent_seconds + 2
        while True:
            members = [gang.Member.from_row(r) for r in await backend.gang_members(self.claim)]
            if gang.settled(members, plan.silent_seconds) or time.monotonic() > deadline:
                break
            await anyio.sleep(0.2)
        return gang.judge(self.worker, error, self.error_at, members, plan.silent_seconds)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "error" and self.error_at is None:
            self.error_at = float(event.get("at") or time.time())
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
    elif kind == "lease_lost":
        log.warning("job.lease_lost", message=event.get("message"))
