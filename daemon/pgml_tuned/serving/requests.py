"""The serving side of pgml.requests: every statement the serving process runs (named queries of queries.sql,
which call the SECURITY DEFINER functions of 0014_serving.sql; each write is fenced on the claiming process)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from psycopg import adapters
from psycopg.adapt import Dumper
from psycopg.pq import Format

from ..db import Pool, Row, q

CHANNEL = "pgml_requests"  # {"type": "request_queued"}: only wakes the serving process


class Float4s:
    """A float32 numpy array of any shape, sent as one flat real[] in PostgreSQL's binary format (Float4sDumper): the
    server reads 4 bytes a value, where a text literal of 384,000 values took it longer to parse than the model took to
    compute them."""

    def __init__(self, values: Any) -> None:
        self.values = values


class Float4sDumper(Dumper):
    format = Format.BINARY
    oid = 1021  # real[] (float4's array type: a built-in, the same oid on every server)

    def dump(self, obj: Float4s) -> bytes:
        import numpy as np

        flat = np.asarray(obj.values, dtype=np.float32).reshape(-1)
        # array_recv's layout: dimensions (1), no NULLs, the element type (float4: 700), the length and lower bound;
        # then each element as its length (4) and its value, big-endian
        cells = np.empty(flat.size, dtype=[("len", ">i4"), ("value", ">f4")])
        cells["len"] = 4
        cells["value"] = flat
        return struct.pack(">iiiii", 1, 0, 700, flat.size, 1) + cells.tobytes()


adapters.register_dumper(Float4s, Float4sDumper)


@dataclass(frozen=True)
class Request:
    id: int
    submitted_by: str
    kind: str  # classify | generate | chat | embed | rank
    model: str
    args: dict[str, Any]
    inputs: list[Any]
    stream: bool
    attempts: int

    @classmethod
    def from_row(cls, row: Row) -> Request:
        return cls(
            id=row["id"],
            submitted_by=row["submitted_by"],
            kind=row["kind"],
            model=row["model"],
            args=dict(row["args"] or {}),
            inputs=list(row["inputs"]),
            stream=bool(row["stream"]),
            attempts=row["attempts"],
        )


class Requests:
    """The statements of one serving process (`serving_id` fences every write).

    Claims and answers go through one connection of their own, the lane: the claim takes an advisory lock on each
    request for that session (0025_request_locks.sql), and once a request's answer is committed the lane releases
    its lock, which wakes the caller waiting on it. Everything else uses the pool. The lane's locks outlive its
    statements' transactions: `lane_dsn` is a direct connection (never through a transaction pooler).
    """

    def __init__(self, pool: Pool, serving_id: str, lease_seconds: float, *, lane_dsn: str | None = None) -> None:
        self.pool = pool
        self.lane = Pool(lane_dsn or pool.dsn, app=f"{pool.app} lane", max_size=1)
        self.serving_id = serving_id
        self.lease_seconds = lease_seconds

    async def close(self) -> None:
        await self.lane.close()

    async def claim(self, max_n: int, max_inputs: int) -> list[Request]:
        """Up to `max_n` queued requests (and, past the first, `max_inputs` texts), fairly across submitters
        (0033_fair_lanes.sql), in the order they should be answered."""
        rows = await self.lane.named(
            "claim_requests",
            serving_id=self.serving_id,
            max_n=max_n,
            lease_seconds=self.lease_seconds,
            max_inputs=max_inputs,
        )
        return [Request.from_row(r) for r in rows]

    async def renew(self) -> set[int]:
        rows = await self.pool.named("renew_requests", serving_id=self.serving_id, lease_seconds=self.lease_seconds)
        return {r["id"] for r in rows}

    async def answer(self, request_id: int, result: Any, usage: dict[str, int] | None = None) -> bool:
        return await self._finish(request_id, json.dumps(result), json.dumps(usage) if usage else None, None)

    async def answer_all(self, answers: list[tuple[int, Any]]) -> set[int]:
        """A batch's answers in one statement and one commit; the ids this process still owned."""
        ids = [i for i, _ in answers]
        rows = await self._write("answer_requests", ids, ids=ids, results=[json.dumps(r) for _, r in answers])
        return {r["id"] for r in rows}

    async def answer_vectors(self, answers: list[tuple[int, Any]]) -> set[int]:
        """A batch of embed requests' answers (each a float32 array of one row per text, all of one width) in one
        statement and one commit, sent as one binary real[] (0044_embed_vectors.sql); the ids still owned."""
        import numpy as np

        ids = [i for i, _ in answers]
        rows = await self._write(
            "answer_vectors",
            ids,
            ids=ids,
            counts=[len(v) for _, v in answers],
            dim=int(answers[0][1].shape[1]),
            flat=Float4s(np.concatenate([v for _, v in answers])),
        )
        return {r["id"] for r in rows}

    async def fail(self, request_id: int, error: str) -> bool:
        return await self._finish(request_id, None, None, error)

    async def _finish(self, request_id: int, result: str | None, usage: str | None, error: str | None) -> bool:
        rows = await self._write("finish_request", [request_id], id=request_id, result=result, usage=usage, error=error)
        return bool(rows and rows[0]["owned"])

    async def _write(self, query: str, unlock: list[int], **params: Any) -> list[Row]:
        """An answering statement of the lane (fenced on this process), then the locks of requests `unlock`
        released: their callers wake up once the answers are committed. Both go in one round trip (the unlock
        pipelined behind the answer's COMMIT): a one-text call's answer reaches its caller a round trip sooner. A
        write that fails closes the lane's connection, and its locks go with it."""
        return await self.lane.fetch_then(
            q(query), {"serving_id": self.serving_id, **params}, q("unlock_requests"), {"ids": unlock}
        )

    async def chunk(self, request_id: int, first_seq: int, texts: list[str]) -> bool:
        rows = await self.pool.named(
            "request_chunk", id=request_id, serving_id=self.serving_id, first_seq=first_seq, texts=texts
        )
        return bool(rows and rows[0]["owned"])

    async def release_own(self) -> list[Row]:
        """This process's running requests back to the queue (shutting down): retried by another."""
        return await self.pool.named("release_requests", serving_id=self.serving_id)

    async def housekeeping(self) -> tuple[list[Row], int]:
        """Requests whose serving process stopped renewing (retried once, then failed), and what nobody will
        read again (deleted): any serving process does this for all."""
        rows = await self.pool.named("requests_housekeeping")
        return list(rows[0]["released"]), int(rows[0]["deleted"])

    async def stored_model(self, owner: str, ref: str) -> Row | None:
        rows = await self.pool.named("serving_model", owner=owner, ref=ref)
        return rows[0] if rows else None
