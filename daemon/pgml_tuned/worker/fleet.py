"""What a daemon tells the fleet and its service manager, and what it reads back.

- the registry   its row in pgml.workers (Fleet): registered at start, renewed by the heartbeat — at once when what
                 the daemon holds changed, else every REGISTRY_EVERY beats —, marked stopped at a clean exit
- the herd       in a fleet of more than claim_spread idle workers, a job_queued NOTIFY (which every listener gets)
                 makes each claim only with probability claim_spread / idle workers, so about claim_spread claims
                 race per job instead of the whole fleet; the polls are stretched and jittered so that the fleet as
                 a whole still polls about claim_spread times per poll_seconds (the safety net for a notified job
                 nobody claimed). The fleet's size is re-read from pgml.worker_status now and then (Fleet).
- its devices    NVML when nvidia-ml-py is installed, and the GPUs its free slots hold
- systemd        the notify protocol (READY=1, WATCHDOG=1, STOPPING=1 as datagrams on $NOTIFY_SOCKET; nothing at
                 all when it is unset) and the watchdog's pings
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from .. import __version__, logconfig
from ..config import Settings
from ..db import RETRYABLE
from .backend import Backend, RegistryMissing

log = logconfig.get("pgml_tuned.worker.fleet")

REGISTRY_EVERY = 2  # an unchanged registry row is renewed every this many heartbeats


class Fleet:
    """This daemon's row in the fleet registry, and the fleet's size read back from it for the herd control."""

    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.registered = False
        self.row: dict[str, Any] | None = None  # what the registry row says now
        self.beats = 0  # heartbeats since the row was last written
        self.beat_at: float | None = None  # time.monotonic() of the last write that found the row this daemon's
        self.idle = 0  # live workers with a free slot (pgml.worker_status)
        self.live = 0
        self.read_at = -1e18  # time.monotonic() of the next read of the fleet's size; the first poll reads it

    # ---- the registry ----
    async def register(self, devices: list[dict[str, Any]]) -> None:
        """This daemon's row in pgml.workers. A schema without the registry (migration 0022) is a warning: the
        daemon serves without it. Another live worker under the same id is an error: the daemon does not start."""
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": __version__,
            "devices": devices,
            "gpus": len(devices),
            "concurrency": self.settings.concurrency,
            "cpus": cpu_count(),  # resources.procs of a job is bounded by the largest live worker's (0033)
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
        self.beat_at = time.monotonic()

    async def renew(self, holding: Callable[[], dict[str, Any]]) -> None:
        """Renew the row with what the daemon holds now (holding()): at once when that changed, else every
        REGISTRY_EVERY heartbeats (a fleet of 1000 idle workers wrote 200 rows a second, most of the queue's own
        load: bench/fleet.py)."""
        if not self.registered:
            return
        state = holding()
        self.beats += 1
        if state == self.row and self.beats < REGISTRY_EVERY:
            return
        self.row, self.beats = state, 0
        try:
            owned = await self.backend.beat(state)
        except Exception as e:  # the registry never stops the daemon; the next beat tries again
            log.warning("fleet.heartbeat_failed", error=str(e).strip())
            self.row = None
            return
        if owned:
            self.beat_at = time.monotonic()
        else:
            self.row = None
            log.error(
                "fleet.row_taken",
                worker=self.settings.worker_id,
                note="another daemon registered under this worker id; give each daemon its own --worker-id",
            )
            self.registered = False

    async def unregister(self) -> None:
        if self.registered:
            with contextlib.suppress(Exception):
                await self.backend.unregister()
            self.registered = False

    # ---- the herd control ----
    async def read_size(self) -> None:
        """Re-read the fleet's size about every 10 heartbeats (jittered); only the herd control uses it."""
        now = time.monotonic()
        if self.settings.claim_spread <= 0 or not self.registered or now < self.read_at:
            return
        self.read_at = now + 10 * self.settings.heartbeat_seconds * random.uniform(0.5, 1.5)
        with contextlib.suppress(*RETRYABLE):
            self.idle, self.live = await self.backend.idle_workers()

    def claims_on_notice(self) -> bool:
        """Whether this worker claims on a job_queued NOTIFY: always in a fleet of at most claim_spread idle
        workers (or with claim_spread 0), else with probability claim_spread / idle workers."""
        spread = self.settings.claim_spread
        if spread <= 0 or self.idle <= spread:
            return True
        return random.random() < spread / self.idle

    def poll_delay(self, looking: bool) -> float:
        """poll_seconds; in a fleet of more than claim_spread workers like this one (idle ones while it is `looking`
        for work — it has a free slot: their polls are what claims a job whose NOTIFY nobody acted on; else all the
        live ones, which reap), stretched (to 60 s at most) so that they poll about claim_spread times per
        poll_seconds between them, and jittered (x 0.5-1.5) so that the polls do not bunch up."""
        spread, poll = self.settings.claim_spread, self.settings.poll_seconds
        peers = self.idle if looking else self.live
        if spread <= 0 or peers <= spread:
            return poll
        return min(60.0, poll * peers / spread) * random.uniform(0.5, 1.5)


# ---- devices ----
def _nvml() -> Any | None:
    """The pynvml module, initialised; None without nvidia-ml-py or without a driver."""
    try:
        import pynvml  # type: ignore[import-untyped, import-not-found, unused-ignore]

        pynvml.nvmlInit()
    except Exception:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        return None
    return pynvml


def device_readings(indexes: list[str] | None = None) -> list[dict[str, Any]]:
    """One dict per GPU (index, name, memory_mb, memory_used_mb, utilization_pct) from NVML, for `indexes` (all when
    None); [] without NVML. Blocking: call it in a thread."""
    nvml = _nvml()
    if nvml is None:
        return []
    out = []
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            if indexes is not None and str(i) not in indexes:
                continue
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            reading: dict[str, Any] = {
                "index": str(i),
                "name": name.decode() if isinstance(name, bytes) else str(name),
                "memory_mb": int(memory.total) // 2**20,
                "memory_used_mb": int(memory.used) // 2**20,
            }
            with contextlib.suppress(Exception):  # not every device reports utilization
                reading["utilization_pct"] = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            out.append(reading)
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
    return out


def detect_devices(gpu_ids: list[str]) -> list[dict[str, Any]]:
    """The GPUs this daemon hands out: those of --gpus (named by NVML when it can), else every GPU that
    CUDA_VISIBLE_DEVICES leaves it (all that NVML sees when it is unset). Blocking: call it in a thread."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    wanted = gpu_ids or ([v.strip() for v in visible.split(",") if v.strip()] if visible is not None else None)
    found = {d["index"]: d for d in device_readings(wanted)}
    if wanted is None:
        devices = list(found.values())
    else:
        devices = [found.get(i, {"index": i, "name": None, "memory_mb": None}) for i in wanted]
    return [{k: d.get(k) for k in ("index", "name", "memory_mb")} for d in devices]


def cpu_count() -> int:
    """The CPUs this daemon may run on (its affinity, where the system has one)."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def free_gpus(gpu_ids: list[str], devices: list[dict[str, Any]], free_slots: list[int]) -> int:
    """How many GPUs a job claimed now could get: with --gpus, those of the free slots (slot i holds the i-th id);
    without, every slot sees all the devices, so all of them while a slot is free."""
    if gpu_ids:
        return len({gpu_ids[s] for s in free_slots if s < len(gpu_ids)})
    return len(devices) if free_slots else 0


# ---- systemd's notify protocol (sd_notify(3)), without libsystemd ----
def sd_notify(*states: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `states` ("READY=1", "WATCHDOG=1", "STOPPING=1", "STATUS=...") to the service manager as one datagram
    on $NOTIFY_SOCKET. False (and nothing sent) when the variable is unset, as outside systemd. A datagram to a
    local socket never waits on its reader, so this is safe on the event loop."""
    path = (os.environ if env is None else env).get("NOTIFY_SOCKET")
    if not path or not states:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto("\n".join(states).encode(), address)
    except OSError as e:
        log.warning("sd_notify.failed", socket=path, error=str(e))
        return False
    return True


async def watchdog(heartbeat_seconds: float, turning: Callable[[], bool]) -> None:
    """systemd's WATCHDOG=1 while the daemon's heartbeat loop is turning(). A wedged loop — or event loop — stops
    the pings, and systemd restarts the daemon after WatchdogSec."""
    usec = int(os.environ.get("WATCHDOG_USEC") or 0)
    interval = min(heartbeat_seconds, usec / 2e6) if usec else heartbeat_seconds
    while True:
        if turning():
            sd_notify("WATCHDOG=1")
        await anyio.sleep(interval)


def watchdog_enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether systemd asked this process for WATCHDOG=1 pings (WatchdogSec= in the unit)."""
    values = os.environ if env is None else env
    pid = values.get("WATCHDOG_PID")
    return bool(values.get("WATCHDOG_USEC")) and (not pid or pid == str(os.getpid()))
