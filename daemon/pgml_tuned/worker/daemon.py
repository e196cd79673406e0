"""The worker's daemon: one root anyio task group with

- listener   typed notices from the Backend (LISTEN pgml_jobs / pgml_control), routed by one dispatcher
- poller     every poll_seconds: reap expired leases, then wake the claimer (a lost NOTIFY never stalls)
- herd       in a fleet of more than claim_spread idle workers, a job_queued NOTIFY (which every listener
             gets) makes each claim only with probability claim_spread / idle workers, so about claim_spread
             claims race per job instead of the whole fleet; the polls are stretched and jittered so that the
             fleet as a whole still polls about claim_spread times per poll_seconds (the safety net for a
             notified job nobody claimed). The fleet's size is re-read from pgml.worker_status now and then.
- claimer    claims queued jobs while job slots are free (FOR UPDATE SKIP LOCKED, one short statement); after a
             gang_forming NOTIFY (and at every poll) it first looks for a gang to join (a job across several
             workers, gang.py)
- heartbeat  every heartbeat_seconds (or at once on a cancel notice): one statement renews the leases of
             all running attempts and reads their cancel requests
- one task per running attempt (attempt.py): child process, then settle
- serving    the inference lane's process (serving.py), restarted when it dies; never a job slot
- fleet      its row in pgml.workers (registered at start, renewed by the heartbeat — at once when what it holds
             changed, else every REGISTRY_EVERY beats —, marked stopped at a clean exit); systemd's READY=1 /
             WATCHDOG=1 (from the heartbeat) / STOPPING=1 (fleet.py); with --metrics-port, /metrics for Prometheus
             (metrics.py)
- signals    SIGTERM/SIGINT: stop claiming, SIGTERM children (they checkpoint), requeue, exit within
             grace_seconds; a second signal exits at once (leases then expire as after a crash)

Children connect with their own login (settings.child_dsn; `dsn` below), which may only call the ticketed
pgml._child_* functions, and run as settings.child_user when one is set (the daemon then runs as root).

`--drain` stops once the queue is empty and nothing runs (a job held by a worker that stopped heartbeating is
waited for: its lease runs out, it is reaped and taken over). The daemon talks only to a Backend and a
launcher, so tests drive it without PostgreSQL or processes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .. import __version__, logconfig
from ..config import Settings
from ..db import RETRYABLE
from ..states import Claim, Status, StopReason, gpus_of, requested_nodes
from . import gang, scratch
from .attempt import Attempt, Launcher
from .backend import Backend, Notice, PgBackend, RegistryMissing
from .fleet import detect_devices, free_gpus, sd_notify, watchdog_enabled
from .process import ChildProcess, ChildUser, Spare, check_child_user, child_env
from .serving import ServingSupervisor

log = logconfig.get("pgml_tuned.daemon")

REGISTRY_EVERY = 2  # an unchanged registry row is renewed every this many heartbeats


class Daemon:
    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        launch: Launcher,
        *,
        dsn: str = "",
        drain: bool = False,
        serving: Callable[[], Coroutine[Any, Any, None]] | None = None,
        cached_models: Callable[[], list[str]] | None = None,
    ) -> None:
        self.settings = settings
        self.serving = serving
        self.cached_models = cached_models or list
        self.backend = backend
        self.launch = launch
        self.dsn = dsn
        self.drain = drain
        self.wake = anyio.Event()  # the claimer looks for work
        # held by whoever claims (the claimer, or the listener claiming a job it just heard of): never two claim
        # loops over the same free slots; fast_acquire: taking it free does not yield to the event loop first
        self.claiming = anyio.Lock(fast_acquire=True)
        self.beat = anyio.Event()  # the heartbeat renews now
        self.stopping = False
        self.stopped_by: str | None = None  # the signal that stopped the daemon (SIGTERM or SIGINT), if one did
        self.attempts: dict[int, Attempt] = {}
        self.free_slots = list(range(settings.concurrency))
        self.claimed = 0
        self._root: anyio.CancelScope | None = None
        self._tg: TaskGroup | None = None
        self.devices: list[dict[str, Any]] = []
        self.registered = False
        self.watchdog = watchdog_enabled()
        self.turned = time.monotonic()  # when the heartbeat loop last began a round
        self.waiting_on_db = False  # the heartbeat loop is in a database call (it may retry through an outage)
        self.metrics: Any = None  # a metrics.Metrics with --metrics-port (prometheus_client is imported only then)
        self.metrics_port: int | None = None  # the port /metrics listens on
        self.fleet_idle = 0  # live workers with a free slot (pgml.worker_status), for the herd control
        self.fleet_live = 0
        self.fleet_read_at = -1e18  # time.monotonic() of the last read; the first poll reads it
        self.registry_state: dict[str, Any] | None = None  # what the registry row says now
        self.registry_beats = 0  # heartbeats since the row was last written
        self.gang_hint = True  # a gang may be forming (a gang_forming NOTIFY, a poll): look for one to join

    # ---- lifecycle ----
    async def serve(self) -> None:
        await self.backend.prepare()
        self.settings.scratch.mkdir(parents=True, exist_ok=True)
        self.devices = await anyio.to_thread.run_sync(detect_devices, self.settings.gpu_list)
        await self.sweep_scratch()
        log.info(
            "daemon.start",
            worker=self.settings.worker_id,
            concurrency=self.settings.concurrency,
            drain=self.drain,
            lease_seconds=self.settings.lease_seconds,
            devices=self.devices,
        )
        try:
            await self._register()
            async with anyio.create_task_group() as tg:
                self._root, self._tg = tg.cancel_scope, tg
                tg.start_soon(self._signals)
                if self.settings.metrics_port is not None:
                    self.metrics_port = await tg.start(self._metrics)
                tg.start_soon(self._listener)
                tg.start_soon(self._poller)
                tg.start_soon(self._heartbeat)
                if self.watchdog:
                    tg.start_soon(self._watchdog)
                tg.start_soon(self._claimer, tg)
                if self.serving is not None and not self.drain:
                    tg.start_soon(self.serving)
                sd_notify("READY=1", f"STATUS=serving as {self.settings.worker_id}")
        finally:
            sd_notify("STOPPING=1")
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._unregister()
            await self.backend.close()
            stopped = {"message": f"stopped by {self.stopped_by}"} if self.stopped_by else {}
            log.info("daemon.stop", worker=self.settings.worker_id, jobs_claimed=self.claimed, **stopped)

    async def sweep_scratch(self) -> None:
        """Remove what attempts of a killed daemon (or child) left in the work directory: their scratch
        directories that no living process holds (scratch.py)."""
        removed = await anyio.to_thread.run_sync(scratch.sweep, self.settings.scratch)
        if removed:
            log.info(
                "daemon.scratch_removed",
                message=f"removed {len(removed)} scratch director{'y' if len(removed) == 1 else 'ies'} of jobs "
                f"no process runs any more ({sum(b for _, b in removed) / 1e6:.1f} MB) from {self.settings.scratch}",
                directories=[name for name, _ in removed],
                bytes=sum(b for _, b in removed),
            )

    def _finish_if_idle(self) -> None:
        if self.stopping and not self.attempts and self._root is not None:
            self._root.cancel()

    def shutdown(self, why: str) -> None:
        """Stop claiming; pass the signal `why` (SIGTERM, SIGINT; SIGTERM for anything else) on to every child
        (they checkpoint, say which signal stopped them, and are requeued); SIGKILL after the grace."""
        if self.stopping or self._tg is None:
            return
        sig = signal.Signals.__members__.get(why, signal.SIGTERM)
        if sig not in (signal.SIGTERM, signal.SIGINT):
            sig = signal.SIGTERM
        log.info(
            "daemon.shutdown",
            message=f"stopped by {why}: no new jobs; the running ones checkpoint (their children get {sig.name}) "
            "and go back to the queue",
            signal=why,
            running=len(self.attempts),
            grace_seconds=self.settings.grace_seconds,
        )
        self.stopping = True
        self.stopped_by = why
        sd_notify("STOPPING=1", f"STATUS=stopping ({why}): {len(self.attempts)} running jobs checkpoint")
        for attempt in self.attempts.values():
            attempt.stop(StopReason.SHUTDOWN, kill=False, sig=sig)
        self._tg.start_soon(self._grace_then_kill)
        self._finish_if_idle()

    # ---- signals ----
    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            async for sig in received:
                if not self.stopping:
                    self.shutdown(sig.name)
                else:
                    log.warning("daemon.exit_now", signal=sig.name, running=len(self.attempts))
                    self._kill_all()
                    if self._root is not None:
                        self._root.cancel()

    async def _grace_then_kill(self) -> None:
        await anyio.sleep(self.settings.grace_seconds)
        if self.attempts:
            log.warning("daemon.grace_expired", running=len(self.attempts))
        self._kill_all()

    def _kill_all(self) -> None:
        for attempt in self.attempts.values():
            attempt.stop(StopReason.SHUTDOWN, kill=True)

    # ---- notices and polling ----
    async def _listener(self) -> None:
        async for notice in self.backend.notices():
            if notice.type == "gang_forming":
                self.gang_hint = True  # every idle worker looks: SKIP LOCKED sorts them out, each join wakes the next
                if self._tg is not None and self.free_slots and not self.claiming.locked():
                    async with self.claiming:
                        await self.claim_while_free(self._tg)
                continue
            if notice.type == "job_queued" and self._tg is not None and not self.claiming.locked():
                if not self.claims_on_notice():
                    continue  # herd control: about claim_spread other idle workers race for it (polls are the net)
                # claim here, in the task that heard of the job: handing it to the claimer task (an event, a task
                # switch, a pass of the event loop) was ~0.2 ms of every pickup (bench/pickup.py)
                async with self.claiming:
                    await self.claim_while_free(self._tg)
            else:
                self.dispatch(notice)

    def dispatch(self, notice: Notice) -> None:
        """Route one notice. None carries an order: each only makes the daemon read rows sooner."""
        if notice.type == "listening" or (notice.type == "job_queued" and self.claims_on_notice()):
            self.gang_hint = self.gang_hint or notice.type == "listening"
            self.wake.set()
        elif notice.type == "cancel_requested" and notice.id in self.attempts:
            self.beat.set()  # the lease renewal reads cancel_requested from the job's row

    def claims_on_notice(self) -> bool:
        """Whether this worker claims on a job_queued NOTIFY: always in a fleet of at most claim_spread idle
        workers (or with claim_spread 0), else with probability claim_spread / idle workers."""
        spread = self.settings.claim_spread
        if spread <= 0 or self.fleet_idle <= spread:
            return True
        return random.random() < spread / self.fleet_idle

    def poll_delay(self) -> float:
        """poll_seconds; in a fleet of more than claim_spread workers like this one (idle ones while it has a free
        slot: their polls are what claims a job whose NOTIFY nobody acted on; else all the live ones, which reap),
        stretched (to 60 s at most) so that they poll about claim_spread times per poll_seconds between them, and
        jittered (x 0.5-1.5) so that the polls do not bunch up."""
        spread, poll = self.settings.claim_spread, self.settings.poll_seconds
        peers = self.fleet_idle if self.free_slots and not self.stopping else self.fleet_live
        if spread <= 0 or peers <= spread:
            return poll
        return min(60.0, poll * peers / spread) * random.uniform(0.5, 1.5)

    async def _read_fleet(self) -> None:
        """Re-read the fleet's size about every 10 heartbeats (jittered); only the herd control uses it."""
        now = time.monotonic()
        if self.settings.claim_spread <= 0 or not self.registered or now < self.fleet_read_at:
            return
        self.fleet_read_at = now + 10 * self.settings.heartbeat_seconds * random.uniform(0.5, 1.5)
        with contextlib.suppress(*RETRYABLE):
            self.fleet_idle, self.fleet_live = await self.backend.idle_workers()

    async def _poller(self) -> None:
        while True:
            await anyio.sleep(self.poll_delay())
            await self._read_fleet()
            with contextlib.suppress(*RETRYABLE):
                for row in await self.backend.reap():
                    log.warning("job.lease_expired", job_id=row["id"], attempt=row["attempt"], now=row["status"])
                    if self.metrics is not None:
                        self.metrics.takeovers.inc()
            self.gang_hint = True  # the net under a lost gang_forming NOTIFY
            self.wake.set()

    # ---- leases and the fleet registry ----
    async def _heartbeat(self) -> None:
        while True:
            with anyio.move_on_after(self.settings.heartbeat_seconds):
                await self.beat.wait()
            self.beat = anyio.Event()
            self.turned = time.monotonic()
            self.waiting_on_db = True
            try:
                if self.attempts:
                    await self.renew_leases()
                await self._registry_beat()
            finally:
                self.waiting_on_db = False

    async def _watchdog(self) -> None:
        """systemd's WATCHDOG=1 while the heartbeat loop turns (or waits for the database: a PostgreSQL restart
        is no reason to kill the children). A wedged loop — or event loop — stops the pings, and systemd restarts
        the daemon after WatchdogSec."""
        usec = int(os.environ.get("WATCHDOG_USEC") or 0)
        interval = min(self.settings.heartbeat_seconds, usec / 2e6) if usec else self.settings.heartbeat_seconds
        while True:
            if self.waiting_on_db or time.monotonic() - self.turned < 2 * self.settings.heartbeat_seconds + 1:
                sd_notify("WATCHDOG=1")
            await anyio.sleep(interval)

    def free_gpus(self) -> int:
        return free_gpus(self.settings.gpu_list, self.devices, self.free_slots)

    async def _register(self) -> None:
        """This daemon's row in pgml.workers. A schema without the registry (migration 0022) is a warning: the
        daemon serves without it. Another live worker under the same id is an error: the daemon does not start."""
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": __version__,
            "devices": self.devices,
            "gpus": len(self.devices),
            "concurrency": self.settings.concurrency,
            # how often its row is renewed at the least (pgml.worker_status: live within two such intervals)
            "heartbeat_seconds": REGISTRY_EVERY * self.settings.heartbeat_seconds,
            "lease_seconds": self.settings.lease_seconds,
        }
        try:
            await self.backend.register(info)
        except RegistryMissing as e:
            log.warning("fleet.no_registry", error=str(e), note="`pgml-tuned migrate` (0022_fleet) adds the registry")
            return
        self.registered = True
        self._beat_ok()

    async def _registry_beat(self) -> None:
        """Renew this daemon's row: at once when what it holds changed, else every REGISTRY_EVERY heartbeats (a
        fleet of 1000 idle workers wrote 200 rows a second, most of the queue's own load: bench/fleet.py)."""
        if not self.registered:
            return
        state = {
            "free_slots": len(self.free_slots) if not self.stopping else 0,
            "free_gpus": self.free_gpus() if not self.stopping else 0,
            "running": sorted(self.attempts),
            "models_cached": self.cached_models(),
        }
        self.registry_beats += 1
        if state == self.registry_state and self.registry_beats < REGISTRY_EVERY:
            return
        self.registry_state, self.registry_beats = state, 0
        try:
            owned = await self.backend.beat(state)
        except Exception as e:  # the registry never stops the daemon; the next beat tries again
            log.warning("fleet.heartbeat_failed", error=str(e).strip())
            self.registry_state = None
            return
        if owned:
            self._beat_ok()
        else:
            self.registry_state = None
            log.error(
                "fleet.row_taken",
                worker=self.settings.worker_id,
                note="another daemon registered under this worker id; give each daemon its own --worker-id",
            )
            self.registered = False

    def _beat_ok(self) -> None:
        if self.metrics is not None:
            self.metrics.last_heartbeat = time.monotonic()

    async def _unregister(self) -> None:
        if self.registered:
            with contextlib.suppress(Exception):
                await self.backend.unregister()
            self.registered = False

    # ---- /metrics ----
    async def _metrics(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        from .metrics import serve_metrics

        port = self.settings.metrics_port
        assert port is not None and self.metrics is not None
        gpus = [d["index"] for d in self.devices]

        async def refresh() -> None:
            self.metrics.running.set(len(self.attempts))
            await self.metrics.refresh(self.backend.jobs_by_status, gpus)

        await serve_metrics(self.settings.metrics_host, port, self.metrics, refresh, task_status=task_status)

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

    # ---- claiming ----
    async def _claimer(self, tg: TaskGroup) -> None:
        while True:
            await self.wake.wait()
            self.wake = anyio.Event()
            async with self.claiming:
                await self.claim_while_free(tg)
            if (
                self.drain
                and not self.attempts
                and not self.stopping
                and await self.backend.queue_empty(len(self.devices))
            ):
                log.info("daemon.drained", jobs_claimed=self.claimed)
                self.stopping = True
            self._finish_if_idle()

    async def claim_while_free(self, tg: TaskGroup) -> None:
        """Claim queued jobs until the slots are full or the queue is empty; start an attempt for each."""
        while self.free_slots and not self.stopping:
            # with --gpus, a job takes one slot per GPU it asks for; without, each job gets one slot (all devices)
            if self.gang_hint:
                try:
                    joined = await self.backend.gang_join(self.free_gpus())
                except RETRYABLE as e:
                    log.warning("gang.join_failed", error=str(e).strip())
                    joined = None
                if joined is None:
                    self.gang_hint = False
                else:
                    self._start(tg, joined)
                    continue
            try:
                claim = await self.backend.claim(self.settings.lease_seconds, self.free_gpus())
            except RETRYABLE as e:
                # the claim may have committed without us hearing back: put such a job back at once
                log.warning("claim.connection_lost", error=str(e).strip())
                released = await self.backend.release_orphans(list(self.attempts))
                if released:
                    log.warning("claim.released_orphans", jobs=released)
                continue
            if claim is None:
                return
            self.claimed += 1
            if self.metrics is not None and claim.attempt == 1 and claim.queued_seconds is not None:
                self.metrics.pickup.observe(claim.queued_seconds)
            self._start(tg, claim)

    def _start(self, tg: TaskGroup, claim: Claim) -> None:
        """Run an attempt at a job claimed (or a part of a gang joined) in the slots it takes."""
        slots = [self.free_slots.pop(0) for _ in range(min(gpus_of(claim.hyperparams), len(self.free_slots)))]
        plan = None
        nodes = requested_nodes(claim.hyperparams)
        if nodes > 1:
            plan = gang.Plan(
                node=claim.node,
                nodes=nodes,
                form_seconds=self.settings.gang_seconds,
                silent_seconds=2 * self.settings.heartbeat_seconds + 1,
                address=self.settings.gang_address or gang.default_address(),
            )
        attempt = Attempt(claim, slots[0], slots, self.metrics, plan, self.settings.worker_id)
        self.attempts[claim.id] = attempt
        tg.start_soon(self._run_attempt, attempt)

    async def _run_attempt(self, attempt: Attempt) -> None:
        gpus = self.settings.gpu_list
        datasets_dir = str(self.settings.datasets_dir) if self.settings.datasets_dir else None
        devices = ",".join(gpus[s] for s in attempt.slots) if gpus else None
        env = child_env(str(self.settings.scratch), devices, datasets_dir=datasets_dir)
        try:
            await attempt.run(self.backend, self.launch, env, self.dsn)
        finally:
            self.attempts.pop(attempt.claim.id, None)
            self.free_slots.extend(attempt.slots)
            self.free_slots.sort()
            self.wake.set()
            self._finish_if_idle()


async def serve(settings: Settings, dsn: str, *, child_dsn: str | None = None, drain: bool = False) -> Daemon:
    """Run the daemon against PostgreSQL at `dsn` until it is stopped (or drained); its children connect with
    `child_dsn` (else settings.child_dsn, else `dsn`) and run as settings.child_user if that is set."""
    user = ChildUser.lookup(settings.child_user) if settings.child_user else None  # not root: refused now
    child_dsn = child_dsn or settings.child_dsn
    if not child_dsn:
        log.warning(
            "daemon.no_child_login",
            note="children connect with the worker's own login (still only through their ticketed functions); "
            "give them a login of their own: CREATE ROLE worker_child LOGIN; GRANT pgml_child TO worker_child; "
            "then PGML_CHILD_DSN",
        )
    if user is not None:
        settings.scratch.mkdir(parents=True, exist_ok=True)
        secret_files = [p for d in (settings.keyring, settings.credentials) if d.is_dir() for p in d.iterdir()]
        await check_child_user(user, settings.scratch, secret_files)
        log.info("daemon.child_user", user=user.name, uid=user.uid, gid=user.gid)
    spare = Spare(user)  # the next job's child, started ahead of it
    launch = functools.partial(ChildProcess.start, user=user, spare=spare)
    supervisor = ServingSupervisor(settings, dsn, user) if settings.serving else None
    daemon = Daemon(
        settings,
        PgBackend(settings, dsn),
        launch,
        dsn=child_dsn or dsn,
        drain=drain,
        serving=supervisor.run if supervisor else None,
        cached_models=(lambda: list(supervisor.cached)) if supervisor else None,
    )
    if settings.metrics_port is not None:
        from .metrics import Metrics

        daemon.metrics = Metrics()
    try:
        settings.scratch.mkdir(parents=True, exist_ok=True)
        datasets_dir = str(settings.datasets_dir) if settings.datasets_dir else None
        await spare.refill(child_env(str(settings.scratch), None, datasets_dir=datasets_dir), settings.scratch)
        await daemon.serve()
    finally:
        await spare.close()
    return daemon
