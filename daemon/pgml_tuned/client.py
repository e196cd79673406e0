"""The Python client: PostgresML's `OpenSourceAI` (the guide's snippet works with only the import changed) and
thin wrappers over the SQL API for Python users.

    import pgml_tuned
    client = pgml_tuned.OpenSourceAI(database_url)
    client.chat_completions_create({"model": "pgml:fingpt", "temperature": 0.1, "max_tokens": 32}, messages)

It talks to the same tables as `pgml.transform`, over an ordinary connection: `pgml.request(...)` commits the
request at once (autocommit), the client LISTENs on `pgml_answers` for it (a short poll backs the notice up)
and takes the answer with `pgml._request_answer(id)`, which deletes it. A streamed request's pieces are read
with `pgml._request_chunks(id, after)` while it runs. Nothing here needs dblink.
"""

from __future__ import annotations

import functools
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

__all__ = ["OpenSourceAI", "RequestError"]

POLL = 0.05  # seconds between looks at a request when no notice came (a notice normally wakes the client first)
CHUNK_POLL = 0.01


class RequestError(RuntimeError):
    """The serving side failed the request, or nobody served it in time."""


def _split_model(model: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """PostgresML takes the model as a name or as {"model": name, <options>}: the options become args."""
    if isinstance(model, str):
        return model, {}
    if not isinstance(model, Mapping) or not isinstance(model.get("model"), str):
        raise ValueError('model must be a name or a dict with a "model" name, e.g. {"model": "pgml:my_project"}')
    options = {k: v for k, v in model.items() if k != "model"}
    return model["model"], options


def _chat_args(
    options: dict[str, Any], max_tokens: int | None, temperature: float | None, n: int | None, chat_template: str | None
) -> dict[str, Any]:
    args = dict(options)
    for key in ("load_in_8bit", "load_in_4bit"):  # the guide passes "true" as a string
        if isinstance(args.get(key), str):
            args[key] = args[key].strip().lower() in ("1", "true", "yes")
    if max_tokens is not None:
        args["max_tokens"] = max_tokens
    if temperature is not None:
        args["temperature"] = temperature
    if n not in (None, 1):
        raise ValueError("n > 1 is not supported: ask once per completion")
    if chat_template is not None:
        args["chat_template"] = chat_template
    return args


def _messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError('messages must be a non-empty list of {"role": ..., "content": ...} dicts')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f'message {i} must be a dict with string "role" and "content", got {m!r}'[:300])
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _fingerprint(model: str, result: Mapping[str, Any]) -> str:
    """Which model answered: the stored model id or hub revision the serving side reports, else the name."""
    source = result.get("fingerprint") or result.get("model_id") or model
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"pgml-tuned:{source}"))


def _completion(model: str, result: Mapping[str, Any], usage: Mapping[str, Any] | None) -> dict[str, Any]:
    content = result.get("content")
    if content is None and isinstance(result.get("choices"), list):
        return dict(result)  # already in the OpenAI shape
    usage = dict(usage or result.get("usage") or {})
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    return {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content or ""},
                "finish_reason": result.get("finish_reason", "stop"),
            }
        ],
        "created": int(time.time()),
        "id": str(uuid.uuid4()),
        "model": model,
        "object": "chat.completion",
        "system_fingerprint": _fingerprint(model, result),
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


def _chunk(model: str, ident: str, created: int, fingerprint: str, text: str, finish: str | None) -> dict[str, Any]:
    delta: dict[str, Any] = {"content": text} if finish is None else {}
    return {
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        "created": created,
        "id": ident,
        "model": model,
        "object": "chat.completion.chunk",
        "system_fingerprint": fingerprint,
    }


def _rest(result: Any, streamed: str) -> str:
    """What the answer holds beyond the pieces already yielded (pieces written just before the answer go with
    the request when the answer is taken)."""
    content = result.get("content") if isinstance(result, dict) else None
    if isinstance(content, str) and content.startswith(streamed):
        return content[len(streamed) :]
    return ""


def _answer(row: Mapping[str, Any] | None, request_id: int) -> tuple[Any, Any]:
    if row is None:
        raise RequestError(f"request {request_id} is gone (it expired, or its serving process failed it twice)")
    if row["status"] == "failed":
        raise RequestError(row["error"] or f"request {request_id} failed")
    return row["result"], row["usage"]


class OpenSourceAI:
    """PostgresML's OpenSourceAI over pgml-tuned's serving lane. `database_url` defaults to $PGML_DSN, then
    $DATABASE_URL. Every call opens its own short connection (safe to share one client between threads)."""

    def __init__(self, database_url: str | None = None, *, timeout: float = 60.0) -> None:
        dsn = database_url or os.environ.get("PGML_DSN") or os.environ.get("DATABASE_URL")
        if not dsn:
            raise ValueError("OpenSourceAI needs a database URL: OpenSourceAI('postgresql://...') or PGML_DSN")
        self.database_url = dsn
        self.timeout = timeout

    # ---- connections ----
    def _connect(self) -> psycopg.Connection[dict[str, Any]]:
        return psycopg.connect(self.database_url, autocommit=True, row_factory=dict_row)

    async def _aconnect(self) -> psycopg.AsyncConnection[dict[str, Any]]:
        return await psycopg.AsyncConnection.connect(self.database_url, autocommit=True, row_factory=dict_row)

    # ---- requests, sync ----
    def _submit(self, conn: psycopg.Connection[dict[str, Any]], kind: str, model: str, args: Any, inputs: Any) -> int:
        conn.execute("LISTEN pgml_answers")
        row = conn.execute(
            "SELECT pgml.request(%s, %s, %s, %s) AS id", (kind, model, Jsonb(args), Jsonb(inputs))
        ).fetchone()
        assert row is not None
        return int(row["id"])

    def _take(self, conn: psycopg.Connection[dict[str, Any]], request_id: int) -> dict[str, Any] | None:
        return conn.execute("SELECT * FROM pgml._request_answer(%s)", (request_id,)).fetchone()

    def _wait(self, conn: psycopg.Connection[dict[str, Any]], request_id: int, timeout: float) -> tuple[Any, Any]:
        deadline = time.monotonic() + timeout
        try:
            while True:
                row = self._take(conn, request_id)
                if row is None or row["status"] in ("done", "failed"):
                    return _answer(row, request_id)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RequestError(self._timeout_message(row["status"], timeout))
                for _ in conn.notifies(timeout=min(POLL * 20, left), stop_after=1):
                    pass
        except BaseException:
            self._abandon(conn, request_id)
            raise

    def _abandon(self, conn: psycopg.Connection[dict[str, Any]], request_id: int) -> None:
        try:
            conn.execute("SELECT pgml._request_abandon(%s)", (request_id,))
        except psycopg.Error:
            pass

    @staticmethod
    def _timeout_message(status: str, timeout: float) -> str:
        if status == "queued":
            return f"no pgml-tuned worker is serving: nobody took the request within {timeout:g} s"
        return f"the request timed out after {timeout:g} s while a worker was answering it"

    def _call(self, kind: str, model: str, args: dict[str, Any], inputs: Any) -> tuple[Any, Any]:
        timeout = float(args.get("timeout", self.timeout))
        with self._connect() as conn:
            request_id = self._submit(conn, kind, model, args, inputs)
            return self._wait(conn, request_id, timeout)

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
        name, options = _split_model(model)
        args = _chat_args(options, max_tokens, temperature, n, chat_template)
        result, usage = self._call("chat", name, args, _messages(messages))
        return _completion(name, result, usage)

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
        name, options = _split_model(model)
        args = {**_chat_args(options, max_tokens, temperature, n, chat_template), "stream": True}
        ident, created, fingerprint = str(uuid.uuid4()), int(time.time()), _fingerprint(name, {})
        return (
            name,
            args,
            float(args.get("timeout", self.timeout)),
            functools.partial(_chunk, name, ident, created, fingerprint),
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
        with self._connect() as conn:
            request_id = self._submit(conn, "chat", name, args, _messages(messages))
            deadline, after, streamed = time.monotonic() + timeout, -1, ""
            try:
                while True:
                    for chunk in conn.execute(
                        "SELECT seq, text FROM pgml._request_chunks(%s, %s)", (request_id, after)
                    ).fetchall():
                        after = chunk["seq"]
                        if chunk["text"]:
                            streamed += chunk["text"]
                            yield make_chunk(chunk["text"], None)
                    row = self._take(conn, request_id)
                    if row is None or row["status"] in ("done", "failed"):
                        result, _ = _answer(row, request_id)
                        rest = _rest(result, streamed)
                        if rest:
                            yield make_chunk(rest, None)
                        finish = (result or {}).get("finish_reason", "stop") if isinstance(result, dict) else "stop"
                        yield make_chunk("", finish)
                        return
                    if time.monotonic() > deadline and row["status"] == "queued":
                        raise RequestError(self._timeout_message("queued", timeout))
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
        name, options = _split_model(model)
        args = _chat_args(options, max_tokens, temperature, n, chat_template)
        result, usage = await self._acall("chat", name, args, _messages(messages))
        return _completion(name, result, usage)

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

        name, args, timeout, make_chunk = self._stream(model, max_tokens, temperature, n, chat_template)
        async with await self._aconnect() as conn:
            request_id = await self._asubmit(conn, "chat", name, args, _messages(messages))
            deadline, after, streamed = time.monotonic() + timeout, -1, ""
            try:
                while True:
                    cur = await conn.execute("SELECT seq, text FROM pgml._request_chunks(%s, %s)", (request_id, after))
                    for chunk in await cur.fetchall():
                        after = chunk["seq"]
                        if chunk["text"]:
                            streamed += chunk["text"]
                            yield make_chunk(chunk["text"], None)
                    row = await (await conn.execute("SELECT * FROM pgml._request_answer(%s)", (request_id,))).fetchone()
                    if row is None or row["status"] in ("done", "failed"):
                        result, _ = _answer(row, request_id)
                        rest = _rest(result, streamed)
                        if rest:
                            yield make_chunk(rest, None)
                        finish = result.get("finish_reason", "stop") if isinstance(result, dict) else "stop"
                        yield make_chunk("", finish)
                        return
                    if time.monotonic() > deadline and row["status"] == "queued":
                        raise RequestError(self._timeout_message("queued", timeout))
                    await anyio.sleep(CHUNK_POLL)
            except BaseException:
                await self._aabandon(conn, request_id)
                raise

    # ---- requests, async ----
    async def _asubmit(
        self, conn: psycopg.AsyncConnection[dict[str, Any]], kind: str, model: str, args: Any, inputs: Any
    ) -> int:
        await conn.execute("LISTEN pgml_answers")
        cur = await conn.execute("SELECT pgml.request(%s, %s, %s, %s) AS id", (kind, model, Jsonb(args), Jsonb(inputs)))
        row = await cur.fetchone()
        assert row is not None
        return int(row["id"])

    async def _aabandon(self, conn: psycopg.AsyncConnection[dict[str, Any]], request_id: int) -> None:
        import anyio

        with anyio.CancelScope(shield=True):
            try:
                await conn.execute("SELECT pgml._request_abandon(%s)", (request_id,))
            except psycopg.Error:
                pass

    async def _acall(self, kind: str, model: str, args: dict[str, Any], inputs: Any) -> tuple[Any, Any]:
        timeout = float(args.get("timeout", self.timeout))
        async with await self._aconnect() as conn:
            request_id = await self._asubmit(conn, kind, model, args, inputs)
            deadline = time.monotonic() + timeout
            try:
                while True:
                    cur = await conn.execute("SELECT * FROM pgml._request_answer(%s)", (request_id,))
                    row = await cur.fetchone()
                    if row is None or row["status"] in ("done", "failed"):
                        return _answer(row, request_id)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise RequestError(self._timeout_message(row["status"], timeout))
                    async for _ in conn.notifies(timeout=min(POLL * 20, left), stop_after=1):
                        pass
            except BaseException:
                await self._aabandon(conn, request_id)
                raise

    # ---- the rest of the SQL API, for Python users ----
    def transform(
        self, task: str | Mapping[str, Any], inputs: Sequence[Any], args: Mapping[str, Any] | None = None
    ) -> Any:
        """pgml.transform without dblink: the same request, answered the same way."""
        spec = {"task": task} if isinstance(task, str) else dict(task)
        kind = {"text-classification": "classify", "sentiment-analysis": "classify", "text-generation": "generate"}.get(
            str(spec.get("task")), "chat" if spec.get("task") in ("conversational", "conversation", "chat") else None
        )
        if kind is None:
            raise ValueError(f"transform does not serve task {spec.get('task')!r}")
        if not isinstance(spec.get("model"), str):
            raise ValueError('transform needs a model: {"task": ..., "model": "pgml:<project>" or a hub id}')
        merged = {k: v for k, v in spec.items() if k not in ("task", "model")} | dict(args or {})
        result, _ = self._call(kind, spec["model"], merged, list(inputs))
        return result

    def tune(self, project_name: str, **kwargs: Any) -> dict[str, Any]:
        """pgml.tune(project_name, task=..., relation_name=..., model_name=..., hyperparams={...}, ...)."""
        names = ", ".join(f"{k} => %({k})s" for k in kwargs)
        params = {k: Jsonb(v) if isinstance(v, (dict, list)) else v for k, v in kwargs.items()}
        with self._connect() as conn:
            row = conn.execute(
                f"SELECT * FROM pgml.tune(%(project_name)s{', ' if names else ''}{names})",
                {"project_name": project_name, **params},
            ).fetchone()
            assert row is not None
            return dict(row)

    def wait(self, job_id: int, timeout: float | None = None) -> dict[str, Any]:
        """Block until the job ends; return its row from pgml.jobs (raises RequestError if it failed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._connect() as conn:
            conn.execute("LISTEN pgml_job_status")
            while True:
                row = conn.execute(
                    "SELECT id, status, error, metrics, model_id FROM pgml.jobs WHERE id = %s", (job_id,)
                ).fetchone()
                if row is None:
                    raise RequestError(f"no job {job_id}")
                if row["status"] in ("succeeded", "failed", "cancelled"):
                    if row["status"] != "succeeded":
                        raise RequestError(f"job {job_id} {row['status']}: {row['error']}")
                    return dict(row)
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} is still {row['status']} after {timeout:g} s")
                for _ in conn.notifies(timeout=1.0, stop_after=1):
                    pass

    def logs(self, job_id: int) -> list[dict[str, Any]]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT l.created_at, l.logs FROM pgml.logs l WHERE l.job_id = %s ORDER BY l.id", (job_id,)
            ).fetchall()
            return [{"created_at": r["created_at"], **(r["logs"] if isinstance(r["logs"], dict) else {})} for r in rows]

    def cancel(self, job_id: int) -> str:
        with self._connect() as conn:
            row = conn.execute("SELECT pgml.cancel(%s) AS s", (job_id,)).fetchone()
            assert row is not None
            return str(row["s"])
