"""The worker's daemon: one root anyio task group with

- listener   typed notices from the Backend (LISTEN pgml_jobs / pgml_control), routed by one dispatcher
- poller     every poll_seconds: reap expired leases, then wake the claimer (a lost NOTIFY never stalls); about
             every SWEEP_SECONDS, drop the job and staging tables a job's end left because a session held them
- herd       in a large fleet, a job_queued NOTIFY makes only about claim_spread idle workers claim, and the polls
             are stretched to match (fleet.py)
- claimer    claims queued jobs while job slots are free (FOR UPDATE SKIP LOCKED, one short statement); after a
             gang_forming NOTIFY (and at every poll) it first looks for a gang to join (a job across several
             workers, gang.py)
- heartbeat  every heartbeat_seconds (or at once on a cancel notice): one statement renews the leases of
             all running attempts and reads their cancel requests; then the registry row (heartbeat.py)
- one task per running attempt (attempt.py): child process, then settle
- serving    the inference lane's process (serving.py), restarted when it dies; never a job slot
- fleet      its row in pgml.workers (registered at start, renewed by the heartbeat, marked stopped at a clean
             exit); systemd's READY=1 / WATCHDOG=1 (while the heartbeat turns) / STOPPING=1 (fleet.py); with
             --metrics-port, /metrics for Prometheus (metrics.py)
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
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .. import logconfig
from ..config import Settings
from ..db import RETRYABLE
from ..states import Claim, StopReason, gpus_of
from . import gang, scratch
from .attempt import Attempt, Launcher
from .backend import Backend, Notice
from .fleet import Fleet, detect_devices, free_gpus, sd_notify, watchdog, watchdog_enabled
from .heartbeat import Heartbeat
from .pg import PgBackend
from .process import ChildProcess, ChildUser, Spare, check_child_user, child_env
from .serving import ServingSupervisor

log = logconfig.get("pgml_tuned.daemon")


SWEEP_SECONDS = 10.0  # how often the poller drops the tables left in use at a job's end (pgml._job_tables_sweep)


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
        serving_state: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.settings = settings
        self.serving = serving
        # what its serving process holds: models_cached (names) and serving (counts), for the registry row
        self.serving_state = serving_state or (lambda: {"models_cached": [], "serving": {}})
        self.backend = backend
        self.launch = launch
        self.dsn = dsn
        self.drain = drain
        self.wake = anyio.Event()  # the claimer looks for work
        # held by whoever claims (the claimer, or the listener claiming a job it just heard of): never two claim
        # loops over the same free slots; fast_acquire: taking it free does not yield to the event loop first
        self.claiming = anyio.Lock(fast_acquire=True)
        self.stopping = False
        self.stopped_by: str | None = None  # the signal that stopped the daemon (SIGTERM or SIGINT), if one did
        self.attempts: dict[int, Attempt] = {}
        self.free_slots = list(range(settings.concurrency))
        self.claimed = 0
        self._root: anyio.CancelScope | None = None
        self._tg: TaskGroup | None = None
        self.devices: list[dict[str, Any]] = []
        self.fleet = Fleet(settings, backend)  # its row in the registry, and the herd control
        self.heartbeat = Heartbeat(settings, backend, self.attempts, self.fleet, self._holding)
        self.watchdog = watchdog_enabled()
        self.metrics: Any = None  # a metrics.Metrics with --metrics-port (prometheus_client is imported only then)
        self.metrics_port: int | None = None  # the port /metrics listens on
        self.gang_hint = True  # a gang may be forming (a gang_forming NOTIFY, a poll): look for one to join

    # ---- lifecycle ----
    async def serve(self) -> None:
        await self.backend.prepare()
        self.settings.scratch.mkdir(parents=True, exist_ok=True)
        self.devices = await anyio.to_thread.run_sync(detect_devices, self.settings.gpu_list)
        await scratch.sweep_leftovers(self.settings.scratch)
        log.info(
            "daemon.start",
            worker=self.settings.worker_id,
            concurrency=self.settings.concurrency,
            drain=self.drain,
            lease_seconds=self.settings.lease_seconds,
            devices=self.devices,
        )
        try:
            await self.fleet.register(self.devices)
            async with anyio.create_task_group() as tg:
                self._root, self._tg = tg.cancel_scope, tg
                tg.start_soon(self._signals)
                if self.settings.metrics_port is not None:
                    self.metrics_port = await tg.start(self._metrics)
                tg.start_soon(self._listener)
                tg.start_soon(self._poller)
                tg.start_soon(self.heartbeat.run)
                if self.watchdog:
                    tg.start_soon(watchdog, self.settings.heartbeat_seconds, self.heartbeat.turning)
                tg.start_soon(self._claimer, tg)
                if self.serving is not None and not self.drain:
                    tg.start_soon(self.serving)
                sd_notify("READY=1", f"STATUS=serving as {self.settings.worker_id}")
        finally:
            sd_notify("STOPPING=1")
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.fleet.unregister()
            await self.backend.close()
            stopped = {"message": f"stopped by {self.stopped_by}"} if self.stopped_by else {}
            log.info("daemon.stop", worker=self.settings.worker_id, jobs_claimed=self.claimed, **stopped)

    def _finish_if_idle(self) -> None:
        if self.stopping and not self.attempts and self._root is not None:
            self._root.cancel()

    def shutdown(self, why: str) -> None:
        """Stop claiming; pass the signal `why` (SIGTERM, SIGINT; SIGTERM for anything else) on to every child
        (they checkpoint, say which signal stopped them, and are requeued); SIGKILL after the grace."""
        if self.stopping or self._tg is None:
            return
        sig = signal.SIGINT if why == "SIGINT" else signal.SIGTERM
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
                if not self.fleet.claims_on_notice():
                    continue  # herd control: about claim_spread other idle workers race for it (polls are the net)
                # claim here, in the task that heard of the job: handing it to the claimer task (an event, a task
                # switch, a pass of the event loop) was ~0.2 ms of every pickup (bench/pickup.py)
                async with self.claiming:
                    await self.claim_while_free(self._tg)
            else:
                self.dispatch(notice)

    def dispatch(self, notice: Notice) -> None:
        """Route one notice. None carries an order: each only makes the daemon read rows sooner."""
        if notice.type == "listening" or (notice.type == "job_queued" and self.fleet.claims_on_notice()):
            self.gang_hint = self.gang_hint or notice.type == "listening"
            self.wake.set()
        elif notice.type == "cancel_requested" and self.attempts:
            # some job was cancelled (the notice names none): the lease renewal reads cancel_requested from the rows
            self.heartbeat.now.set()

    def poll_delay(self) -> float:
        """How long the poller sleeps (fleet.py: the herd control), among the idle workers while this one has a
        free slot, else among all the live ones."""
        return self.fleet.poll_delay(looking=bool(self.free_slots) and not self.stopping)

    async def _poller(self) -> None:
        swept = time.monotonic()
        while True:
            await anyio.sleep(self.poll_delay())
            await self.fleet.read_size()
            with contextlib.suppress(*RETRYABLE):
                for row in await self.backend.reap():
                    log.warning("job.lease_expired", job_id=row["id"], attempt=row["attempt"], now=row["status"])
                    if self.metrics is not None:
                        self.metrics.takeovers.inc()
            if time.monotonic() - swept > SWEEP_SECONDS:
                # the tables a job's end or a cancel left because a session held a lock on them (they never wait)
                swept = time.monotonic()
                with contextlib.suppress(*RETRYABLE):
                    if dropped := await self.backend.sweep_tables():
                        log.info("job_tables.swept", dropped=dropped)
            self.gang_hint = True  # the net under a lost gang_forming NOTIFY
            self.wake.set()

    # ---- what it holds ----
    def free_gpus(self) -> int:
        return free_gpus(self.settings.gpu_list, self.devices, self.free_slots)

    def _holding(self) -> dict[str, Any]:
        """What the registry row says of this daemon now."""
        return {
            "free_slots": len(self.free_slots) if not self.stopping else 0,
            "free_gpus": self.free_gpus() if not self.stopping else 0,
            "running": sorted(self.attempts),
            **self.serving_state(),
        }

    # ---- /metrics ----
    async def _metrics(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        from .metrics import serve_metrics

        port = self.settings.metrics_port
        assert port is not None and self.metrics is not None
        gpus = [d["index"] for d in self.devices]

        async def refresh() -> None:
            self.metrics.running.set(len(self.attempts))
            self.metrics.last_heartbeat = self.fleet.beat_at
            await self.metrics.refresh(self.backend.jobs_by_status, gpus)

        await serve_metrics(self.settings.metrics_host, port, self.metrics, refresh, task_status=task_status)

    # ---- claiming ----
    async def _claimer(self, tg: TaskGroup) -> None:
        while True:
            await self.wake.wait()
            self.wake = anyio.Event()
            async with self.claiming:
                await self.claim_while_free(tg)
            idle = self.drain and not self.attempts and not self.stopping
            if idle and await self.backend.queue_empty(len(self.devices)):
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
        plan = gang.Plan.of(claim, self.settings)
        attempt = Attempt(claim, slots[0], slots, self.metrics, plan, self.settings.worker_id)
        self.attempts[claim.id] = attempt
        tg.start_soon(self._run_attempt, attempt)

    async def _run_attempt(self, attempt: Attempt) -> None:
        gpus = self.settings.gpu_list
        env = job_env(self.settings, ",".join(gpus[s] for s in attempt.slots) if gpus else None)
        try:
            await attempt.run(self.backend, self.launch, env, self.dsn)
        finally:
            self.attempts.pop(attempt.claim.id, None)
            self.free_slots.extend(attempt.slots)
            self.free_slots.sort()
            self.wake.set()
            self._finish_if_idle()


def job_env(settings: Settings, devices: str | None) -> dict[str, str]:
    """A job's child's environment (process.child_env), seeing `devices` (CUDA_VISIBLE_DEVICES) when not None."""
    datasets_dir = str(settings.datasets_dir) if settings.datasets_dir else None
    return child_env(
        str(settings.scratch),
        devices,
        datasets_dir=datasets_dir,
        model_dirs=settings.model_dir_list,
        state_dirs=settings.state_dirs,
    )


async def serve(
    settings: Settings,
    dsn: str,
    *,
    child_dsn: str | None = None,
    serving_dsn: str | None = None,
    drain: bool = False,
    allow_superuser: bool = False,
) -> Daemon:
    """Run the daemon against PostgreSQL at `dsn` until it is stopped (or drained); its children connect with
    `child_dsn` (else settings.child_dsn, else `dsn`) and run as settings.child_user if that is set; its serving
    process with `serving_dsn` (else settings.serving_dsn, else `dsn` as role pgml_serving). A login that bypasses
    row-level security is refused (pg.LoginRefused) unless `allow_superuser`."""
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
    serving_dsn = serving_dsn or settings.serving_dsn
    supervisor = ServingSupervisor(settings, dsn, user, serving_dsn=serving_dsn) if settings.serving else None
    daemon = Daemon(
        settings,
        PgBackend(settings, dsn, allow_superuser=allow_superuser),
        launch,
        dsn=child_dsn or dsn,
        drain=drain,
        serving=supervisor.run if supervisor else None,
        serving_state=supervisor.state if supervisor else None,
    )
    if settings.metrics_port is not None:
        from .metrics import Metrics

        daemon.metrics = Metrics()
        if supervisor is not None:
            supervisor.on_load = daemon.metrics.on_serving_load
    try:
        settings.scratch.mkdir(parents=True, exist_ok=True)
        await spare.refill(job_env(settings, None), settings.scratch)
        await daemon.serve()
    finally:
        await spare.close()
    return daemon
