"""The Python client's requests to the serving lane (the base of pgml_tuned.client.OpenSourceAI), sync and async.

`pgml.request(...)` commits a request at once (autocommit); the connection LISTENs on `pgml_answers` for it (a
short poll backs the notice up) and takes the answer with `pgml._request_answer(id)`, which deletes it; a caller
that gives up abandons the request with `pgml._request_abandon(id)`. The statements are those of sql/client.sql.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from . import db
from .client_shapes import answer, timed_out

POLL = 0.05  # seconds between looks at a request when no notice came (a notice normally wakes the client first)
QUERIES = "client.sql"

Conn = psycopg.Connection[dict[str, Any]]
AsyncConn = psycopg.AsyncConnection[dict[str, Any]]


def q(name: str) -> str:
    """The named statement `name` of sql/client.sql."""
    return db.q(name, file=QUERIES)


class Requests:
    """Connections to `database_url` and the round trip of one request over them; `timeout` is the default wait."""

    database_url: str
    timeout: float

    # ---- connections ----
    def _connect(self) -> Conn:
        return psycopg.connect(self.database_url, autocommit=True, row_factory=dict_row)

    async def _aconnect(self) -> AsyncConn:
        return await psycopg.AsyncConnection.connect(self.database_url, autocommit=True, row_factory=dict_row)

    # ---- requests, sync ----
    def _submit(self, conn: Conn, kind: str, model: str, args: Any, inputs: Any) -> int:
        conn.execute(q("listen_answers"))
        row = conn.execute(
            q("request"), {"kind": kind, "model": model, "args": Jsonb(args), "inputs": Jsonb(inputs)}
        ).fetchone()
        assert row is not None
        return int(row["id"])

    def _take(self, conn: Conn, request_id: int) -> dict[str, Any] | None:
        return conn.execute(q("request_answer"), {"id": request_id}).fetchone()

    def _chunks(self, conn: Conn, request_id: int, after: int) -> list[dict[str, Any]]:
        return conn.execute(q("request_chunks"), {"id": request_id, "after": after}).fetchall()

    def _wait(self, conn: Conn, request_id: int, timeout: float) -> tuple[Any, Any]:
        deadline = time.monotonic() + timeout
        try:
            while True:
                row = self._take(conn, request_id)
                if row is None or row["status"] in ("done", "failed"):
                    return answer(row, request_id)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise timed_out(row["status"], timeout)
                for _ in conn.notifies(timeout=min(POLL * 20, left), stop_after=1):
                    pass
        except BaseException:
            self._abandon(conn, request_id)
            raise

    def _abandon(self, conn: Conn, request_id: int) -> None:
        try:
            conn.execute(q("request_abandon"), {"id": request_id})
        except psycopg.Error:
            pass

    def _call(self, kind: str, model: str, args: dict[str, Any], inputs: Any) -> tuple[Any, Any]:
        timeout = float(args.get("timeout", self.timeout))
        with self._connect() as conn:
            request_id = self._submit(conn, kind, model, args, inputs)
            return self._wait(conn, request_id, timeout)

    # ---- requests, async ----
    async def _asubmit(self, conn: AsyncConn, kind: str, model: str, args: Any, inputs: Any) -> int:
        await conn.execute(q("listen_answers"))
        cur = await conn.execute(
            q("request"), {"kind": kind, "model": model, "args": Jsonb(args), "inputs": Jsonb(inputs)}
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row["id"])

    async def _atake(self, conn: AsyncConn, request_id: int) -> dict[str, Any] | None:
        return await (await conn.execute(q("request_answer"), {"id": request_id})).fetchone()

    async def _achunks(self, conn: AsyncConn, request_id: int, after: int) -> list[dict[str, Any]]:
        return await (await conn.execute(q("request_chunks"), {"id": request_id, "after": after})).fetchall()

    async def _aabandon(self, conn: AsyncConn, request_id: int) -> None:
        import anyio

        with anyio.CancelScope(shield=True):
            try:
                await conn.execute(q("request_abandon"), {"id": request_id})
            except psycopg.Error:
                pass

    async def _acall(self, kind: str, model: str, args: dict[str, Any], inputs: Any) -> tuple[Any, Any]:
        timeout = float(args.get("timeout", self.timeout))
        async with await self._aconnect() as conn:
            request_id = await self._asubmit(conn, kind, model, args, inputs)
            deadline = time.monotonic() + timeout
            try:
                while True:
                    row = await self._atake(conn, request_id)
                    if row is None or row["status"] in ("done", "failed"):
                        return answer(row, request_id)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise timed_out(row["status"], timeout)
                    async for _ in conn.notifies(timeout=min(POLL * 20, left), stop_after=1):
                        pass
            except BaseException:
                await self._aabandon(conn, request_id)
                raise
