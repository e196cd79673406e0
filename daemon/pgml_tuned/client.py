"""The Python client: PostgresML's `OpenSourceAI` (the guide's snippet works with only the import changed) and
thin wrappers over the SQL API for Python users.

    import pgml_tuned
    client = pgml_tuned.OpenSourceAI(database_url)
    client.chat_completions_create({"model": "pgml:fingpt", "temperature": 0.1, "max_tokens": 32}, messages)

It talks to the same tables as `pgml.transform`, over an ordinary connection: `pgml.request(...)` commits the
request at once (autocommit), the client LISTENs on `pgml_answers` for it (a short poll backs the notice up)
and takes the answer with `pgml._request_answer(id)`, which deletes it. A streamed request's pieces are read
with `pgml._request_chunks(id, after)` while it runs. Nothing here needs dblink. The round trip of a request is
pgml_tuned.client_requests; the shapes of what goes and comes back, pgml_tuned.client_shapes; the statements,
sql/client.sql.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

import psycopg.sql
from psycopg.types.json import Jsonb

from .client_requests import Requests, q
from .client_shapes import (
    RequestError,
    answer,
    chat_args,
    chunk,
    completion,
    fingerprint,
    messages_of,
    rest_of,
    split_model,
    timed_out,
)
from .errors import InvalidInputError, JobFailedError, NotFoundError, TimedOutError, pgml_errors

__all__ = ["OpenSourceAI", "RequestError"]

CHUNK_POLL = 0.01


class OpenSourceAI(Requests):
    """PostgresML's OpenSourceAI over pgml-tuned's serving lane. `database_url` defaults to $PGML_DSN, then
    $DATABASE_URL. Every call opens its own short connection (safe to share one client between threads)."""

    def __init__(self, database_url: str | None = None, *, timeout: float = 60.0) -> None:
        dsn = database_url or os.environ.get("PGML_DSN") or os.environ.get("DATABASE_URL")
        if not dsn:
            raise InvalidInputError(
                "OpenSourceAI needs a database URL", "OpenSourceAI('postgresql://...'), or set PGML_DSN or DATABASE_URL"
            )
        self.database_url = dsn
        self.timeout = timeout

    def _errors(self) -> contextlib.AbstractContextManager[None]:
        """Every entry point runs under this: psycopg's errors become pgml_tuned.PgmlErrors (pgml_tuned.errors)."""
        return pgml_errors(self.database_url)

    # ---- OpenSourceAI ----
    def chat_completions_create(
        self,
        model: str | Mapping[str, Any],
        messages: Sequence[Mapping[str, Any]],
        max_tokens: int | None = None,
        temperature: float | None = None,
        n: int | None = None,
        chat_template: str | None = None,
    ) -> dict[str, Any]:
        with self._errors():
            name, options = split_model(model)
            args = chat_args(options, max_tokens, temperature, n, chat_template)
            result, usage = self._call("chat", name, args, messages_of(messages))
            return completion(name, result, usage)

    def _stream(
        self,
        model: str | Mapping[str, Any],
        max_tokens: int | None,
        temperature: float | None,
        n: int | None,
        chat_template: str | None,
    ) -> tuple[str, dict[str, Any], float, Callable[[str, str | None], dict[str, Any]]]:
        """What a streamed completion needs, sync or async: the model's name, the request's args, its timeout, and
        the maker of its OpenAI-shaped chunks (one id, creation time and fingerprint for all of them)."""
        name, options = split_model(model)
        args = {**chat_args(options, max_tokens, temperature, n, chat_template), "stream": True}
        ident, created, answered_by = str(uuid.uuid4()), int(time.time()), fingerprint(name, {})
        return (
            name,
            args,
            float(args.get("timeout", self.timeout)),
            functools.partial(chunk, name, ident, created, answered_by),
        )

    def chat_completions_create_stream(
        self,
        model: str | Mapping[str, Any],
        messages: Sequence[Mapping[str, Any]],
        max_tokens: int | None = None,
        temperature: float | None = None,
        n: int | None = None,
        chat_template: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yields OpenAI-shaped chunks as the serving side generates them; the last one has a finish_reason."""
        name, args, timeout, make_chunk = self._stream(model, max_tokens, temperature, n, chat_template)
        with self._errors(), self._connect() as conn:
            request_id = self._submit(conn, "chat", name, args, messages_of(messages))
            deadline, after, streamed = time.monotonic() + timeout, -1, ""
            try:
                while True:
                    for piece in self._chunks(conn, request_id, after):
                        after = piece["seq"]
                        if piece["text"]:
                            streamed += piece["text"]
                            yield make_chunk(piece["text"], None)
                    row = self._take(conn, request_id)
                    if row is None or row["status"] in ("done", "failed"):
                        result, _ = answer(row, request_id)
                        rest = rest_of(result, streamed)
                        if rest:
                            yield make_chunk(rest, None)
                        finish = (result or {}).get("finish_reason", "stop") if isinstance(result, dict) else "stop"
                        yield make_chunk("", finish)
                        return
                    if time.monotonic() > deadline and row["status"] == "queued":
                        raise timed_out("queued", timeout)
                    time.sleep(CHUNK_POLL)
            except BaseException:
                self._abandon(conn, request_id)
                raise

    async def chat_completions_create_async(
        self,
        model: str | Mapping[str, Any],
        messages: Sequence[Mapping[str, Any]],
        max_tokens: int | None = None,
        temperature: float | None = None,
        n: int | None = None,
        chat_template: str | None = None,
    ) -> dict[str, Any]:
        with self._errors():
            name, options = split_model(model)
            args = chat_args(options, max_tokens, temperature, n, chat_template)
            result, usage = await self._acall("chat", name, args, messages_of(messages))
            return completion(name, result, usage)

    async def chat_completions_create_stream_async(
        self,
        model: str | Mapping[str, Any],
        messages: Sequence[Mapping[str, Any]],
        max_tokens: int | None = None,
        temperature: float | None = None,
        n: int | None = None,
        chat_template: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        import anyio

        with self._errors():
            name, args, timeout, make_chunk = self._stream(model, max_tokens, temperature, n, chat_template)
            async with await self._aconnect() as conn:
                request_id = await self._asubmit(conn, "chat", name, args, messages_of(messages))
                deadline, after, streamed = time.monotonic() + timeout, -1, ""
                try:
                    while True:
                        for piece in await self._achunks(conn, request_id, after):
                            after = piece["seq"]
                            if piece["text"]:
                                streamed += piece["text"]
                                yield make_chunk(piece["text"], None)
                        row = await self._atake(conn, request_id)
                        if row is None or row["status"] in ("done", "failed"):
                            result, _ = answer(row, request_id)
                            rest = rest_of(result, streamed)
                            if rest:
                                yield make_chunk(rest, None)
                            finish = result.get("finish_reason", "stop") if isinstance(result, dict) else "stop"
                            yield make_chunk("", finish)
                            return
                        if time.monotonic() > deadline and row["status"] == "queued":
                            raise timed_out("queued", timeout)
                        await anyio.sleep(CHUNK_POLL)
                except BaseException:
                    await self._aabandon(conn, request_id)
                    raise

    # ---- the rest of the SQL API, for Python users ----
    def transform(
        self, task: str | Mapping[str, Any], inputs: Sequence[Any], args: Mapping[str, Any] | None = None
    ) -> Any:
        """pgml.transform without dblink: the same request, answered the same way."""
        with self._errors():
            spec = {"task": task} if isinstance(task, str) else dict(task)
            kind = {
                "text-classification": "classify",
                "sentiment-analysis": "classify",
                "text-generation": "generate",
            }.get(
                str(spec.get("task")),
                "chat" if spec.get("task") in ("conversational", "conversation", "chat") else None,
            )
            if kind is None:
                raise InvalidInputError(
                    f"transform does not serve task {spec.get('task')!r}",
                    "the tasks it serves: text-classification, text-generation, conversational",
                )
            if not isinstance(spec.get("model"), str):
                raise InvalidInputError(
                    "transform needs a model", '{"task": ..., "model": "pgml:<project>" or a hub id}'
                )
            merged = {k: v for k, v in spec.items() if k not in ("task", "model")} | dict(args or {})
            result, _ = self._call(kind, spec["model"], merged, list(inputs))
            return result

    def embed(
        self, transformer: str, inputs: str | Sequence[str], kwargs: Mapping[str, Any] | None = None
    ) -> list[float] | list[list[float]]:
        """pgml.embed without dblink: one text's vector, or a list of texts' vectors in order (kwargs: normalize,
        prompt, prompt_name, truncate_dim, timeout)."""
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not texts:
            return []
        answer, _ = self._call("embed", transformer, dict(kwargs or {}), texts)
        # the answer's vectors are real[] literals, {+123456789e-10,...}: each value the float32 pgml.embed gives
        vectors = [[float(x) for x in v[1:-1].split(",")] if v != "{}" else [] for v in answer]
        return vectors[0] if isinstance(inputs, str) else vectors

    def rank(
        self, transformer: str, query: str, documents: Sequence[str], kwargs: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """pgml.rank without dblink: {"corpus_id", "score", "text"} per document, best first (kwargs: top_k,
        return_documents, timeout), as pgml.rank's rows."""
        args = dict(kwargs or {})
        if not documents:
            return []
        scores, _ = self._call("rank", transformer, args, [query, *documents])
        order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[: args.get("top_k")]
        docs = args.get("return_documents", True)
        return [{"corpus_id": i, "score": float(scores[i]), "text": documents[i] if docs else None} for i in order]

    def tune(self, project_name: str, **kwargs: Any) -> dict[str, Any]:
        """pgml.tune(project_name, task=..., relation_name=..., model_name=..., hyperparams={...}, ...)."""
        with self._errors():
            named = psycopg.sql.SQL("").join(
                psycopg.sql.SQL(", {} => {}").format(psycopg.sql.Identifier(k), psycopg.sql.Placeholder(k))
                for k in kwargs
            )
            params = {k: Jsonb(v) if isinstance(v, (dict, list)) else v for k, v in kwargs.items()}
            with self._connect() as conn:
                row = conn.execute(
                    psycopg.sql.SQL(q("tune")).format(named), {"project_name": project_name, **params}
                ).fetchone()
                assert row is not None
                return dict(row)

    def wait(self, job_id: int, timeout: float | None = None) -> dict[str, Any]:
        """Block until the job ends; return its row from pgml.jobs (JobFailedError if it failed or was cancelled,
        TimedOutError after `timeout` seconds)."""
        with self._errors():
            deadline = None if timeout is None else time.monotonic() + timeout
            with self._connect() as conn:
                conn.execute(q("listen_job_status"))
                while True:
                    row = conn.execute(q("job_end"), {"job_id": job_id}).fetchone()
                    if row is None:
                        raise NotFoundError(
                            f"no job {job_id}", "SELECT id, status FROM pgml.jobs lists your jobs", job_id=job_id
                        )
                    if row["status"] in ("succeeded", "failed", "cancelled"):
                        if row["status"] != "succeeded":
                            raise JobFailedError(
                                f"job {job_id} {row['status']}: {row['error']}",
                                f"SELECT errors FROM pgml.jobs WHERE id = {job_id} shows every attempt",
                                job_id=job_id,
                            )
                        return dict(row)
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimedOutError(
                            f"job {job_id} is still {row['status']} after {timeout:g} s",
                            "wait again to keep following it; pgml-tuned status shows whether a worker runs it",
                            job_id=job_id,
                        )
                    for _ in conn.notifies(timeout=1.0, stop_after=1):
                        pass

    def logs(self, job_id: int) -> list[dict[str, Any]]:
        with self._errors(), self._connect() as conn:
            rows = conn.execute(q("job_logs"), {"job_id": job_id}).fetchall()
            return [{"created_at": r["created_at"], **(r["logs"] if isinstance(r["logs"], dict) else {})} for r in rows]

    def cancel(self, job_id: int) -> str:
        with self._errors(), self._connect() as conn:
            row = conn.execute(q("cancel_job"), {"job_id": job_id}).fetchone()
            assert row is not None
            return str(row["s"])
