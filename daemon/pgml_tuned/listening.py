"""LISTEN that is proved to work: notifications arrive, or the caller is told to poll instead.

Through a transaction pooler (PgBouncer, pool_mode=transaction) LISTEN "works" but notifications are lost: `listen()`
sends a NOTIFY to a private channel from another connection and waits for it, and raises ListenUnavailable when it
does not come; callers (the worker's listener, the serving lane) then poll, and say so once (`polling_instead`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import psycopg
from psycopg.rows import DictRow

from . import logconfig
from .db import RETRYABLE, connect, q

log = logconfig.get("pgml_tuned.listening")

PROBE_SECONDS = 1.0


class ListenUnavailable(Exception):
    """LISTEN failed, or a notification sent to it did not arrive (a transaction pooler)."""


async def listen(conn: psycopg.AsyncConnection[DictRow], dsn: str, channels: Sequence[str]) -> None:
    """LISTEN on `channels`, then prove that notifications arrive: NOTIFY a private channel from another
    connection and wait up to PROBE_SECONDS for it. Through PgBouncer in transaction mode LISTEN "works" but
    notifications are lost: that raises ListenUnavailable (as does a LISTEN refused); a lost connection
    raises its RETRYABLE error."""
    probe = f"pgml_probe_{os.getpid()}_{os.urandom(4).hex()}"
    try:
        for channel in (*channels, probe):
            await conn.execute(f"LISTEN {channel}")
        async with await connect(dsn, app="pgml-tuned listen probe") as other:
            await other.execute(q("listen_probe"), {"channel": probe})
        arrived = False
        # closed before the next statement: a running notifies() holds the connection (notifications that come
        # meanwhile are kept for the caller's next notifies())
        async with contextlib.aclosing(conn.notifies(timeout=PROBE_SECONDS)) as notes:
            async for note in notes:
                if note.channel == probe:
                    arrived = True
                    break
        if arrived:
            await conn.execute(f"UNLISTEN {probe}")
            return
    except RETRYABLE:
        raise
    except psycopg.Error as e:
        raise ListenUnavailable(f"LISTEN failed: {str(e).strip()}") from e
    raise ListenUnavailable(f"a NOTIFY sent to this connection did not arrive within {PROBE_SECONDS} s")


def polling_instead(event: str, error: ListenUnavailable, poll_seconds: float) -> None:
    """The one line said when a listener gives up on LISTEN for good."""
    log.warning(
        event,
        error=str(error),
        poll_seconds=poll_seconds,
        note=f"cannot LISTEN here (a transaction pooler such as PgBouncer?): polling every {poll_seconds} s instead; "
        "set PGML_LISTEN_DSN (--listen-dsn) to a direct connection to PostgreSQL for instant wake-ups",
    )
