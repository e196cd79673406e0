"""`pgml-tuned` with timestamps on the pickup path, for bench/pickup.py --profile-jobs.

    python bench/traced_daemon.py serve --dsn ... (the same arguments as `pgml-tuned`)

daemon.py is not changed: this wrapper patches, in this process only,

- psycopg.AsyncConnection.notifies: when the listener task receives a `pgml_jobs` notification
- pgml_tuned.jobs.claim:            when the claimer task calls it (it has woken up) and when it returns
- pgml_tuned.db.Db._connection:     when the statement holds the Db lock (the statement is sent right after)

and prints one JSON line per claimed job to stderr (`trace.claim`), after the claim has returned, so no
printing happens inside the measured interval.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncGenerator
from typing import Any

import psycopg
from pgml_tuned import cli, jobs
from pgml_tuned.db import Db

_last: dict[str, float] = {}

_orig_notifies = psycopg.AsyncConnection.notifies


async def _notifies(self: psycopg.AsyncConnection, **kwargs: Any) -> AsyncGenerator[psycopg.Notify]:
    async for note in _orig_notifies(self, **kwargs):
        if note.channel == "pgml_jobs":
            _last["notify"] = time.time()
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
                          "t_claim_call": t_call, "t_locked": _last.get("locked"), "t_claim_return": t_return}),
              file=sys.stderr, flush=True)
    return job


psycopg.AsyncConnection.notifies = _notifies  # type: ignore[method-assign]
Db._connection = _connection  # type: ignore[method-assign]
jobs.claim = _claim

if __name__ == "__main__":
    sys.exit(cli.main())
