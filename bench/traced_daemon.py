"""`pgml-tuned` with timestamps on the pickup path, for bench/pickup.py's profile.

    [PGML_BENCH_VARIANT=fast-lock,inline-claim] python bench/traced_daemon.py serve --dsn ... (as `pgml-tuned`)

daemon.py is not changed: this wrapper patches, in this process only,

- psycopg.AsyncConnection.notifies: when the listener task receives a `pgml_jobs` notification
- pgml_tuned.jobs.claim:            when it is called (the claimer task has woken up) and when it returns
- pgml_tuned.db.Db._connection:     when the statement holds the Db lock (the statement is sent right after)

and prints one JSON line per claimed job to stderr (`trace.claim`), after the claim has returned, so no
printing happens inside the measured interval.

PGML_BENCH_VARIANT prototypes proposed daemon changes, to measure them side by side (bench only):

- fast-lock:    Db's lock is anyio.Lock(fast_acquire=True): an uncontended statement does not first yield to
                the event loop (db.py, Db.__init__).
- inline-claim: the listener claims as soon as a `pgml_jobs` notification arrives, in its own task, instead of
                setting the wake event and leaving the claim to the claimer task's next turn (daemon.py,
                Daemon._listener / _claimer; a claim lock keeps the two from over-filling the slots).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import AsyncGenerator
from typing import Any

import anyio
import psycopg

from pgml_tuned import cli, jobs
from pgml_tuned.daemon import Daemon
from pgml_tuned.db import Db
from pgml_tuned.sql import q

VARIANT = {v.strip() for v in os.environ.get("PGML_BENCH_VARIANT", "").split(",") if v.strip()}
_last: dict[str, float] = {}
_daemons: list[Daemon] = []

_orig_notifies = psycopg.AsyncConnection.notifies


async def _notifies(self: psycopg.AsyncConnection, **kwargs: Any) -> AsyncGenerator[psycopg.Notify]:
    async for note in _orig_notifies(self, **kwargs):
        if note.channel == "pgml_jobs":
            _last["notify"] = time.time()
            if "inline-claim" in VARIANT and _daemons:
                await _claim_now(_daemons[0])
        yield note


_orig_connection = Db._connection


async def _connection(self: Db) -> psycopg.AsyncConnection:
    _last["locked"] = time.time()
    return await _orig_connection(self)


_orig_claim = jobs.claim


async def _claim(db: Db, worker: str, lease_seconds: float) -> jobs.Claim | None:
    t_call = time.time()
    job = await _orig_claim(db, worker, lease_seconds)
    t_return = time.time()
    if job is not None:
        print(json.dumps({"event": "trace.claim", "job_id": job.id, "t_notify": _last.get("notify"),
                          "t_claim_call": t_call, "t_locked": _last.get("locked"), "t_claim_return": t_return,
                          "variant": sorted(VARIANT)}),
              file=sys.stderr, flush=True)
    return job


# ---- inline-claim: the claimer's loop body, shared by the listener and the claimer under one lock ----

async def _claim_now(self: Any) -> None:
    if self._tg is None:
        return
    async with self._claim_lock:
        while self.free_slots and not self.stopping:
            job = await jobs.claim(self.db, self.settings.worker_id, self.settings.lease_seconds)
            if job is None:
                break
            self.claimed += 1
            slot = self.free_slots.pop(0)
            self.running[job.id] = (job, None)
            self._tg.start_soon(self._run_job, job, slot)


async def _claimer_inline(self: Any, tg: anyio.abc.TaskGroup) -> None:
    self._tg = tg
    self._claim_lock = anyio.Lock(fast_acquire=True)
    _daemons.append(self)
    while True:
        await self.wake.wait()
        self.wake = anyio.Event()
        await _claim_now(self)
        if self.drain and not self.running and not self.stopping:
            row = await self.db.one(q("queue_empty"))
            if row and row["empty"]:
                self.stopping = True
                self._finish_if_idle()
        if self.stopping:
            self._finish_if_idle()


_orig_db_init = Db.__init__


def _db_init(self: Db, *args: Any, **kwargs: Any) -> None:
    _orig_db_init(self, *args, **kwargs)
    self._lock = anyio.Lock(fast_acquire=True)


psycopg.AsyncConnection.notifies = _notifies  # type: ignore[method-assign]
Db._connection = _connection  # type: ignore[method-assign]
jobs.claim = _claim
if "fast-lock" in VARIANT:
    Db.__init__ = _db_init  # type: ignore[method-assign]
if "inline-claim" in VARIANT:
    Daemon._tg = None  # type: ignore[attr-defined]
    Daemon._claimer = _claimer_inline  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main())
