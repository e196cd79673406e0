"""The daemon's serving process: started with the daemon, restarted within a second when it dies, stopped with
the daemon. It never takes a job slot, so training never blocks inference (and a model being served never
blocks training: it is another process). When it dies, the requests it was answering are released at once
(retried once, then failed, never left hanging: pgml._requests_release); its leases would release them within
seconds anyway, when the whole worker dies.

Its environment is a training child's (child_env: an allow-list, no credential); the DSN and its settings go
on its stdin. It connects as a login of its own (settings.serving_dsn: a member of pgml_serving, which may call
only the inference lane's functions and read no table); without one, as the worker's login in role pgml_serving
(act_as: the same rights in SQL, but the process holds the worker's credentials, as children without a login of
their own do). Its JSON log lines are passed through to the daemon's stderr.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio

from .. import logconfig
from ..config import Settings
from ..db import Pool, pooled, q
from .process import ChildUser, child_env, lines, send_signal

log = logconfig.get("pgml_tuned.worker.serving")

STABLE_SECONDS = 30.0  # a process that ran this long restarts at once; one that keeps dying, with backoff
KINDS = ("base", "adapter")  # a whole model | a LoRA adapter loaded onto a base, unmerged


@dataclass
class Load:
    """One load line of the serving process, read once: what /metrics and the registry row both count."""

    kind: str  # base | adapter
    seconds: float | None  # from PostgreSQL (or the hub cache) to loaded
    loaded: dict[str, int]  # {base, adapter}: how many the serving process holds now
    evicted: dict[str, int]  # {base, adapter}: how many this load evicted
    adapter_mb: float | None  # what its loaded adapters take now
    at: float = field(default_factory=time.time)

    @classmethod
    def of(cls, event: dict[str, Any]) -> Load:
        loaded = event.get("loaded") or {}
        seconds, mb = event.get("seconds"), event.get("adapter_mb")
        return cls(
            kind="adapter" if event.get("event") == "serving.adapter_loaded" else "base",
            seconds=float(seconds) if isinstance(seconds, int | float) else None,
            loaded={
                k: n for k, f in zip(KINDS, ("bases", "adapters"), strict=True) if isinstance(n := loaded.get(f), int)
            },
            evicted={k: len(event.get(f) or []) for k, f in zip(KINDS, ("evicted", "evicted_adapters"), strict=True)},
            adapter_mb=float(mb) if isinstance(mb, int | float) else None,
        )


def stamp(at: float | None) -> str | None:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds") if at is not None else None


class ServingLoads:
    """What the serving processes of this daemon loaded and evicted, counted from their load lines since the daemon
    started: the registry row's `serving` (pgml.worker_status). /metrics counts the same Load objects."""

    def __init__(self) -> None:
        self.loaded = dict.fromkeys(KINDS, 0)
        self.adapter_mb = 0.0
        self.loads = dict.fromkeys(KINDS, 0)
        self.load_seconds = dict.fromkeys(KINDS, 0.0)
        self.last_load_at: dict[str, float | None] = dict.fromkeys(KINDS)
        self.evictions = dict.fromkeys(KINDS, 0)
        self.last_eviction_at: dict[str, float | None] = dict.fromkeys(KINDS)

    def add(self, load: Load) -> None:
        self.loads[load.kind] += 1
        self.last_load_at[load.kind] = load.at
        self.load_seconds[load.kind] += load.seconds or 0.0
        self.loaded.update(load.loaded)
        for kind, n in load.evicted.items():
            if n:
                self.evictions[kind] += n
                self.last_eviction_at[kind] = load.at
        if load.adapter_mb is not None:
            self.adapter_mb = load.adapter_mb

    def exited(self) -> None:
        """The serving process exited: nothing is loaded any more (the counts stay)."""
        self.loaded = dict.fromkeys(KINDS, 0)
        self.adapter_mb = 0.0

    def row(self) -> dict[str, Any]:
        """The registry row's `serving` (JSON)."""
        return {
            "bases": self.loaded["base"],
            "adapters": self.loaded["adapter"],
            "adapter_mb": round(self.adapter_mb, 2),
            "loads": dict(self.loads),
            "load_seconds": {k: round(v, 3) for k, v in self.load_seconds.items()},
            "last_load_at": {k: stamp(v) for k, v in self.last_load_at.items()},
            "evictions": dict(self.evictions),
            "last_eviction_at": {k: stamp(v) for k, v in self.last_eviction_at.items()},
        }


class ServingSupervisor:
    ROLE = "pgml_serving"

    def __init__(
        self, settings: Settings, dsn: str, user: ChildUser | None = None, *, serving_dsn: str | None = None
    ) -> None:
        self.settings = settings
        self.dsn = dsn  # the worker's: releasing a dead serving process's requests
        self.serving_dsn = serving_dsn  # the serving process's own login (direct), if it has one
        self.user = user  # the training children's system user, when the daemon runs them as one: this one too
        self.starts = 0
        self.pid: int | None = None  # of the running serving process (tests and operators)
        self.cached: list[str] = []  # the models and adapters it keeps warm now (from its load log lines)
        self.loads = ServingLoads()  # its loads and evictions (the registry row's `serving`)
        self.on_load: Callable[[Load], None] | None = None  # each load (the daemon's /metrics)

    def state(self) -> dict[str, Any]:
        """What the registry row says of it: the models and adapters it keeps warm, and its loads and evictions."""
        return {"models_cached": list(self.cached), "serving": self.loads.row()}

    async def run(self) -> None:
        """Forever: run the serving process; when it exits, release its requests and start another. Not at all
        behind a transaction pooler without a direct DSN: its lane's session advisory locks would stay behind on
        the pooler's server connections (the daemon has connected by now: db.pooled knows)."""
        if not self.settings.listen_dsn and not self.serving_dsn and pooled(self.dsn):
            log.error(
                "serving.needs_direct_dsn",
                note="the DSN goes through a transaction pooler, which cannot keep the serving lane's session advisory "
                "locks: this worker does not answer pgml.transform; set PGML_LISTEN_DSN (--listen-dsn) to a direct "
                "connection to PostgreSQL",
            )
            return
        pool = Pool(self.dsn, app=f"pgml-tuned {self.settings.worker_id} serving", max_size=1)
        delay = 0.2
        try:
            while True:
                self.starts += 1
                serving_id = f"{self.settings.worker_id}/serving-{self.starts}"
                started = time.monotonic()
                rc = await self.run_once(serving_id)
                released = await pool.fetch(q("release_requests"), {"serving_id": serving_id})
                log.warning(
                    "serving.exited",
                    serving_id=serving_id,
                    returncode=rc,
                    released=[f"{r['id']}:{r['status']}" for r in released],
                    note="starting another",
                )
                delay = 0.2 if time.monotonic() - started > STABLE_SECONDS else min(10.0, delay * 2)
                await anyio.sleep(delay)
        finally:
            await pool.close()

    async def run_once(self, serving_id: str) -> int:
        gpus = self.settings.gpu_list
        work = self.settings.scratch / "serving"
        work.mkdir(parents=True, exist_ok=True)  # its working directory: no name is a path relative to the daemon's
        if self.user is not None:  # its own directory, the child user's (its model cache lives there)
            os.chown(work, self.user.uid, self.user.gid)
        env = child_env(
            str(work),
            gpus[0] if gpus else None,
            model_dirs=self.settings.model_dir_list,
            state_dirs=self.settings.state_dirs,
        )
        own = self.serving_dsn is not None
        payload = {
            # its own login, a direct connection; else the worker's, direct too (PGML_LISTEN_DSN behind a pooler):
            # the startup option that sets its role does not pass a transaction pooler
            "dsn": self.serving_dsn if own else self.settings.listen_dsn or self.dsn,
            "role": None if own else self.ROLE,
            "listen_dsn": None if own else self.settings.listen_dsn,
            "serving_id": serving_id,
            "cache_dir": str(work / "models"),
            "model_cache_mb": self.settings.model_cache_mb,
            "lora_serving": self.settings.lora_serving,
            "adapter_cache_count": self.settings.adapter_cache_count,
            "adapter_cache_mb": self.settings.adapter_cache_mb,
            "log_level": self.settings.log_level,
        }
        process = await anyio.open_process(
            [sys.executable, "-m", "pgml_tuned.serving"],
            env=env,
            cwd=work,
            start_new_session=True,
            **(self.user.process_args() if self.user is not None else {}),
        )
        self.pid = process.pid
        log.info("serving.started", serving_id=serving_id, pid=process.pid)
        try:
            assert process.stdin is not None and process.stdout is not None and process.stderr is not None
            with anyio.CancelScope(shield=True):
                await process.stdin.send(json.dumps(payload).encode())
                await process.stdin.aclose()
            async with anyio.create_task_group() as tg:
                tg.start_soon(passthrough, process.stdout, self._seen)
                tg.start_soon(passthrough, process.stderr, self._seen)
            return await process.wait()
        finally:
            self.pid = None
            self.cached = []
            self.loads.exited()
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    send_signal(process, signal.SIGTERM)  # it puts its requests back in the queue and exits
                    with anyio.move_on_after(5):
                        await process.wait()
                if process.returncode is None:
                    send_signal(process, signal.SIGKILL)
                    await process.wait()

    def _seen(self, line: str) -> None:
        """The serving process logs what its cache holds after each load of a model or an adapter: the fleet
        registry shows it and counts the loads, their times and the evictions (ServingLoads), and so does /metrics."""
        if '"serving.model_loaded"' not in line and '"serving.adapter_loaded"' not in line:
            return
        try:
            event = json.loads(line)
            cached = event.get("cached")
        except (json.JSONDecodeError, AttributeError):
            return
        if isinstance(cached, list):
            self.cached = [str(c) for c in cached]
        load = Load.of(event)
        self.loads.add(load)
        if self.on_load is not None:
            self.on_load(load)


async def passthrough(stream: anyio.abc.ByteReceiveStream, seen: Callable[[str], None] | None = None) -> None:
    async for line in lines(stream):
        sys.stderr.write(line + "\n")
        if seen is not None:
            seen(line)
