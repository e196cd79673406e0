"""`pgml-tuned` with timestamps on the pickup path, for bench/pickup.py's profile.

    [PGML_BENCH_VARIANT=inline-claim] python bench/traced_daemon.py serve --dsn ... (as `pgml-tuned`)

The daemon is not changed: this wrapper patches, in this process only,

- psycopg.AsyncConnection.notifies:  when the listener receives a `pgml_jobs` notification
- PgBackend.claim (worker/pg.py):    when it is called (the claimer task has woken up) and when it returns
- Pool._acquire:                     when the claim holds a pooled connection (the statement is sent right after)

and prints one JSON line per claimed job to stderr (`trace.claim`), after the claim has returned, so no
printing happens inside the measured interval.

PGML_BENCH_VARIANT prototypes proposed daemon changes, to measure them side by side (bench only):

- inline-claim: the listener claims as soon as a `pgml_jobs` notice arrives, in a task of its own, instead of
                setting the wake event and leaving the claim to the claimer task's next turn
                (worker/daemon.py, Daemon.dispatch; a lock keeps the two from over-filling the slots).
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

from pgml_tuned import cli
from pgml_tuned.db import Pool
from pgml_tuned.states import Claim
from pgml_tuned.worker.backend import Notice
from pgml_tuned.worker.daemon import Daemon
from pgml_tuned.worker.pg import PgBackend

VARIANT = {v.strip() for v in os.environ.get("PGML_BENCH_VARIANT", "").split(",") if v.strip()}
_last: dict[str, float] = {}

_orig_notifies = psycopg.AsyncConnection.notifies


async def _notifies(self: psycopg.AsyncConnection[Any], **kwargs: Any) -> AsyncGenerator[psycopg.Notify]:
    async for note in _orig_notifies(self, **kwargs):
        if note.channel == "pgml_jobs":
            _last["notify"] = time.time()
        yield note


_orig_acquire = Pool._acquire


async def _acquire(self: Pool) -> Any:
    conn = await _orig_acquire(self)
    _last["locked"] = time.time()
    return conn


_orig_claim = PgBackend.claim


async def _claim(self: PgBackend, lease_seconds: float, free_gpus: int = 0) -> Claim | None:
    t_call = time.time()
    job = await _orig_claim(self, lease_seconds, free_gpus)
    t_return = time.time()
    if job is not None:
        print(
            json.dumps(
                {
                    "event": "trace.claim",
                    "job_id": job.id,
                    "t_notify": _last.get("notify"),
                    "t_claim_call": t_call,
                    "t_locked": _last.get("locked"),
                    "t_claim_return": t_return,
                    "variant": sorted(VARIANT),
                }
            ),
            file=sys.stderr,
            flush=True,
        )
    return job


# ---- inline-claim: the listener claims at once, under one lock shared with the claimer ----

_orig_dispatch = Daemon.dispatch
_orig_claim_while_free = Daemon.claim_while_free
_lock: anyio.Lock | None = None


async def _claim_locked(self: Daemon, tg: Any) -> None:
    global _lock
    _lock = _lock or anyio.Lock(fast_acquire=True)
    async with _lock:
        await _orig_claim_while_free(self, tg)


def _dispatch_inline(self: Daemon, notice: Notice) -> None:
    if notice.type == "job_queued" and self._tg is not None:
        self._tg.start_soon(_claim_locked, self, self._tg)
    else:
        _orig_dispatch(self, notice)


psycopg.AsyncConnection.notifies = _notifies  # type: ignore[method-assign]
Pool._acquire = _acquire  # type: ignore[method-assign]
PgBackend.claim = _claim  # type: ignore[method-assign]
if "inline-claim" in VARIANT:
    Daemon.claim_while_free = _claim_locked  # type: ignore[method-assign]
    Daemon.dispatch = _dispatch_inline  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main())
