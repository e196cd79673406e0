"""The daemon's heartbeat: every heartbeat_seconds, or at once when asked (a cancel notice),

- one statement renews the leases of all the attempts this worker owns and reads their cancel requests and
  overtime; an attempt found cancelled, over its runtime or no longer this worker's is stopped
- another renews its parts in other workers' gangs (gang.py), and a gang's leader looks at its members: a part
  whose job left its attempt, or a gang with a failed or silent member, stops its ranks
- then the daemon's row in the fleet registry (fleet.py)

While it turns (or waits for the database: a PostgreSQL restart is no reason to kill the children), systemd's
watchdog is pinged (fleet.watchdog); a wedged loop — or event loop — stops the pings.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import anyio

from .. import logconfig
from ..config import Settings
from ..db import RETRYABLE
from ..states import Status, StopReason
from . import gang
from .attempt import Attempt
from .backend import Backend
from .fleet import Fleet

log = logconfig.get("pgml_tuned.daemon")


class Heartbeat:
    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        attempts: dict[int, Attempt],
        fleet: Fleet,
        holding: Callable[[], dict[str, Any]],
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.attempts = attempts  # the daemon's running attempts (its own dict)
        self.fleet = fleet
        self.holding = holding  # what the daemon's registry row says now
        self.now = anyio.Event()  # set: beat now
        self.turned = time.monotonic()  # when the loop last began a round
        self.waiting_on_db = False  # the loop is in a database call (it may retry through an outage)

    async def run(self) -> None:
        while True:
            with anyio.move_on_after(self.settings.heartbeat_seconds):
                await self.now.wait()
            self.now = anyio.Event()
            self.turned = time.monotonic()
            self.waiting_on_db = True
            try:
                if self.attempts:
                    await self.renew_leases()
                await self.fleet.renew(self.holding)
            finally:
                self.waiting_on_db = False

    def turning(self) -> bool:
        """Whether the loop turns, or waits for the database (systemd's watchdog pings while it does)."""
        return self.waiting_on_db or time.monotonic() - self.turned < 2 * self.settings.heartbeat_seconds + 1

    async def renew_leases(self) -> None:
        members = {i: a for i, a in self.attempts.items() if a.member}
        if members:
            await self._renew_memberships(members)
        attempts = {i: a for i, a in self.attempts.items() if not a.member}
        if not attempts:
            return
        owned = await self.backend.renew({i: a.claim.attempt for i, a in attempts.items()}, self.settings.lease_seconds)
        for job_id, attempt in attempts.items():
            if job_id in owned and attempt.plan is not None and attempt.child is not None:
                await self._watch_gang(attempt)
            if job_id in owned:
                if owned[job_id].cancel_requested:
                    log.info("job.cancel", job_id=job_id)
                    attempt.stop(StopReason.CANCELLED, kill=True)
                elif owned[job_id].overtime:
                    log.warning("job.overtime", job_id=job_id, note="past its max_runtime: stopping it")
                    attempt.stop(StopReason.OVERTIME, kill=True)
                continue
            status = await self.backend.status(job_id, attempt.claim.attempt)
            if status == Status.SUCCEEDED:
                continue  # the child committed its results and is exiting
            log.error(
                "job.lease_lost",
                job_id=job_id,
                status=status,
                note="another worker owns this job now; stopping the child",
            )
            attempt.stop(StopReason.LEASE_LOST, kill=True)

    async def _renew_memberships(self, members: dict[int, Attempt]) -> None:
        """This worker's parts in other workers' gangs: renewed in one statement; a part whose job no longer runs
        its attempt (ended, given back, taken over) stops its ranks."""
        alive = await self.backend.gang_member_beat({i: a.claim.attempt for i, a in members.items()})
        for job_id, attempt in members.items():
            if job_id not in alive:
                log.info("job.gang_ended", job_id=job_id, note="the job left this attempt: stopping the ranks")
                attempt.stop(StopReason.LEASE_LOST, kill=True)

    async def _watch_gang(self, attempt: Attempt) -> None:
        """A gang's leader: stop its own ranks when a member's failed or its worker went silent (its ranks would
        wait on the dead ones until a collective times out)."""
        plan = attempt.plan
        assert plan is not None
        with contextlib.suppress(*RETRYABLE):
            members = [gang.Member.from_row(r) for r in await self.backend.gang_members(attempt.claim)]
            culprit = gang.failing(members, plan.silent_seconds)
            if culprit is not None:
                log.warning("job.gang_member_failed", job_id=attempt.claim.id, node=culprit.node, worker=culprit.worker)
                attempt.stop(StopReason.GANG, kill=True)
