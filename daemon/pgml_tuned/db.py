"""Connections, migrations and COPY helpers.

The daemon talks to PostgreSQL through `Db`: one autocommit command connection that reconnects with
backoff when the server restarts or a backend is terminated, and retries the statement that failed.
Every statement it runs is a short transaction of its own.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg
from psycopg.rows import dict_row

from . import logs
from .sql import migrations, q

log = logs.get("pgml_tuned.db")

# Errors after which a fresh connection may succeed: server restarts, terminated backends, network loss.
RETRYABLE = (psycopg.OperationalError, psycopg.errors.AdminShutdown, psycopg.errors.CannotConnectNow)


async def connect(dsn: str, *, autocommit: bool = True, app: str = "pgml-tuned") -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(
        dsn, autocommit=autocommit, row_factory=dict_row, application_name=app, connect_timeout=10
    )


def backoff_delays(first: float = 0.05, cap: float = 5.0) -> Iterable[float]:
    """Exponential backoff with full jitter, forever."""
    delay = first
    while True:
        yield random.uniform(delay / 2, delay)
        delay = min(cap, delay * 2)


class Db:
    """A self-healing autocommit connection shared by the daemon's tasks (one statement at a time)."""

    def __init__(self, dsn: str, app: str = "pgml-tuned") -> None:
        self.dsn = dsn
        self.app = app
        self._conn: psycopg.AsyncConnection | None = None
        self._lock = anyio.Lock()
        self.reconnects = 0

    async def _connection(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            for delay in backoff_delays():
                try:
                    self._conn = await connect(self.dsn, app=self.app)
                    break
                except RETRYABLE as e:
                    log.warning("db.connect_failed", error=str(e).strip(), retry_in=round(delay, 2))
                    await anyio.sleep(delay)
            self.reconnects += 1
        assert self._conn is not None
        return self._conn

    async def fetch(self, query: str, params: dict[str, Any] | None = None, *, retry: bool = True
                    ) -> list[dict[str, Any]]:
        """Run one statement (its own transaction) and return its rows; reconnect and retry on loss."""
        for delay in backoff_delays():
            async with self._lock:
                conn = await self._connection()
                try:
                    cur = await conn.execute(query, params)
                    return await cur.fetchall() if cur.description else []
                except RETRYABLE as e:
                    if not retry:
                        raise
                    log.warning("db.statement_failed", error=str(e).strip(), retry_in=round(delay, 2))
                    await self._drop()
            await anyio.sleep(delay)
        raise AssertionError("unreachable")

    async def one(self, query: str, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
        rows = await self.fetch(query, params)
        return rows[0] if rows else None

    async def named(self, name: str, **params: Any) -> list[dict[str, Any]]:
        # no parameters: send the text as is (with {} psycopg would turn the %s of format() into $1)
        return await self.fetch(q(name), params or None)

    async def _drop(self) -> None:
        if self._conn is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):  # already broken
                await self._conn.close()
        self._conn = None

    async def close(self) -> None:
        async with self._lock:
            await self._drop()


@asynccontextmanager
async def session(dsn: str, app: str = "pgml-tuned") -> AsyncIterator[Db]:
    db = Db(dsn, app)
    try:
        yield db
    finally:
        await db.close()


async def migrate(dsn: str) -> list[str]:
    """Apply every migration not yet recorded in pgml.schema_migrations; return the versions applied.

    Concurrent runs serialize on an advisory lock; each file runs in its own transaction.
    """
    applied: list[str] = []
    async with await connect(dsn, autocommit=True, app="pgml-tuned migrate") as conn:
        await conn.execute("SELECT pg_advisory_lock(hashtext('pgml-tuned migrate'))")
        try:
            exists = await (await conn.execute("SELECT to_regclass('pgml.schema_migrations') AS t")).fetchone()
            done: set[str] = set()
            if exists and exists["t"]:
                rows = await (await conn.execute("SELECT version FROM pgml.schema_migrations")).fetchall()
                done = {r["version"] for r in rows}
            for version, text in migrations():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(text.encode())  # a whole file: no parameters, several statements
                    await conn.execute(
                        "INSERT INTO pgml.schema_migrations (version) VALUES (%s) ON CONFLICT DO NOTHING",
                        (version,),
                    )
                applied.append(version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtext('pgml-tuned migrate'))")
    return applied


def sync_connect(dsn: str, app: str = "pgml-tuned") -> psycopg.Connection[dict[str, Any]]:
    """A blocking connection (used by child processes, which are synchronous)."""
    return psycopg.connect(dsn, row_factory=dict_row, application_name=app, connect_timeout=10)


def fetch_one(conn: psycopg.Connection[Any], query: Any, params: Any = None) -> dict[str, Any]:
    """The single row a blocking query must return."""
    row = conn.execute(query, params).fetchone()
    if row is None:
        raise LookupError(f"no row from {str(query)[:80]!r}")
    return dict(row)
