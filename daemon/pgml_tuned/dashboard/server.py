"""The dashboard's HTTP server: a Starlette app under uvicorn, in one anyio task group with its listener.

- Reads go through one small pool of read-only sessions on the viewer's DSN (`default_transaction_read_only`):
  the statements of sql/dashboard.sql, over pgml.job_status, pgml.models, pgml.logs and pgml.files — whatever
  the login may read there (a pgml_user: its own jobs only), nothing more.
- Live: one LISTEN connection (pgml_job_status: status changes; pgml_logs: new log rows, migration 0020) wakes
  every open event stream (`/api/stream`, server-sent events); each then re-reads the rows it shows with the
  viewer's rights. A payload is never read: any session may NOTIFY any channel. A stream also re-reads every
  `poll_seconds` (PGML_POLL_SECONDS: heartbeats and ETAs move without a notice; a reconnecting listener may
  miss one).
- Access: it binds 127.0.0.1 by default, and every read needs the random token of the URL it prints (in its
  fragment, #token=…: the page's script keeps it in sessionStorage and sends it as a header; the event stream gets a
  single-use ticket for it): another local user who reaches the port cannot read through the viewer's login, and
  no cookie hands the token to the other web services of the host (TokenGate).
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import anyio
import psycopg
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import db, logconfig

log = logconfig.get("pgml_tuned.dashboard")

STATIC = Path(__file__).resolve().parent / "static"
QUERIES = "dashboard.sql"
CHANNELS = ("pgml_job_status", "pgml_logs")
SETTLE_SECONDS = 0.05  # after a wake-up, let a burst of notices (a batch of log rows, a status) arrive first
JOBS_LIMIT = 200
LOGS_LIMIT = 5000  # log rows per read; a stream reads again at once when it got this many
MAX_STREAM_MODELS = 4

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Wakeups:
    """A counter of notices and an event for the next one: a stream remembers the count it has read up to, so a
    notice that arrives while it reads is never missed."""

    def __init__(self) -> None:
        self.count = 0
        self.closing = False  # the server is shutting down: streams end (their connections can then close)
        self._next = anyio.Event()

    def close(self) -> None:
        self.closing = True
        self.wake()

    def wake(self) -> None:
        self.count += 1
        self._next.set()
        self._next = anyio.Event()

    async def wait(self, seen: int, at_most: float) -> int:
        """The count once it is past `seen`, or after `at_most` seconds (then unchanged)."""
        if self.count == seen:
            with anyio.move_on_after(at_most):
                await self._next.wait()
        return self.count


async def listen(dsn: str, wakeups: Wakeups) -> None:
    """LISTEN on CHANNELS for as long as the server runs; reconnect (with backoff) when the connection is lost."""
    delays = db.backoff_delays(0.5, 10.0)
    while True:
        try:
            async with await db.connect(dsn, app="pgml-tuned dashboard", read_only=True) as conn:
                for channel in CHANNELS:
                    await conn.execute(f"LISTEN {channel}")
                delays = db.backoff_delays(0.5, 10.0)
                wakeups.wake()  # whatever happened while it was not listening
                async for _ in conn.notifies():
                    wakeups.wake()
        except db.RETRYABLE as e:
            delay = next(delays)
            log.warning("dashboard.listen_lost", error=" ".join(str(e).split()), retry_in=round(delay, 2))
            await anyio.sleep(delay)


class Reader:
    """The dashboard's reads, as the viewer: each returns the JSON value its statement answers."""

    def __init__(self, pool: db.Pool) -> None:
        self.pool = pool

    async def _one(self, name: str, **params: Any) -> Any:
        rows = await self.pool.fetch(db.q(name, QUERIES), params, retry=False)
        return next(iter(rows[0].values())) if rows else None

    async def jobs(self, limit: int = JOBS_LIMIT) -> list[dict[str, Any]]:
        return list(await self._one("jobs", limit=limit))

    async def model(self, model_id: int) -> dict[str, Any] | None:
        found = await self._one("model", model_id=model_id)
        return dict(found) if found else None

    async def logs(self, model_id: int, after: int = 0, limit: int = LOGS_LIMIT) -> list[dict[str, Any]]:
        return list(await self._one("model_logs", model_id=model_id, after=after, limit=limit))


def _int_param(request: Request, name: str, default: int, low: int = 0, high: int = 2**62) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name}={raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise BadRequest(f"{name}={value} is out of range ({low} to {high})")
    return value


def _model_ids(request: Request) -> list[int]:
    raw = request.query_params.get("models", "")
    ids: list[int] = []
    for part in filter(None, (p.strip() for p in raw.split(","))):
        if not part.isdigit():
            raise BadRequest(f"models={raw!r}: a comma-separated list of model ids, e.g. models=3,5")
        if int(part) not in ids:
            ids.append(int(part))
    if len(ids) > MAX_STREAM_MODELS:
        raise BadRequest(f"models={raw!r}: at most {MAX_STREAM_MODELS} models per stream")
    return ids


class BadRequest(Exception):
    """A request's parameter is wrong: 400 with the message."""


def sse(event: str, data: Any) -> str:
    """One server-sent event (a JSON payload never holds a raw newline)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def build_app(reader: Reader, wakeups: Wakeups, viewer: str, poll_seconds: float) -> Starlette:
    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def whoami(request: Request) -> Response:
        return JSONResponse({"viewer": viewer, "live": list(CHANNELS)})

    async def jobs(request: Request) -> Response:
        return JSONResponse(await reader.jobs(_int_param(request, "limit", JOBS_LIMIT, 1, 10_000)))

    async def model(request: Request) -> Response:
        model_id = int(request.path_params["model_id"])
        found = await reader.model(model_id)
        if found is None:
            return JSONResponse({"error": f"no model {model_id} (or it is another user's)"}, status_code=404)
        return JSONResponse(found)

    async def model_logs(request: Request) -> Response:
        model_id = int(request.path_params["model_id"])
        after = _int_param(request, "after", 0)
        return JSONResponse(await reader.logs(model_id, after, _int_param(request, "limit", LOGS_LIMIT, 1, LOGS_LIMIT)))

    async def stream(request: Request) -> Response:
        models = _model_ids(request)

        async def events() -> AsyncIterator[str]:
            after = dict.fromkeys(models, 0)
            last_jobs: list[dict[str, Any]] | None = None
            seen = wakeups.count
            yield "retry: 2000\n\n"
            while True:
                current = await reader.jobs()
                if current != last_jobs:
                    last_jobs = current
                    yield sse("jobs", current)
                for model_id in models:
                    while True:
                        rows = await reader.logs(model_id, after[model_id])
                        if rows:
                            after[model_id] = rows[-1]["id"]
                            yield sse("logs", {"model_id": model_id, "rows": rows})
                        if len(rows) < LOGS_LIMIT:
                            break
                woke = await wakeups.wait(seen, poll_seconds)
                if wakeups.closing:
                    return
                if woke == seen:
                    yield ": still here\n\n"  # a comment: keeps proxies and the browser from timing out
                else:
                    await anyio.sleep(SETTLE_SECONDS)
                seen = wakeups.count

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def bad_request(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=400)

    async def database_error(request: Request, exc: Exception) -> Response:
        message = " ".join(str(exc).split())
        log.warning("dashboard.read_failed", path=request.url.path, error=message)
        return JSONResponse({"error": f"the database refused or failed the read: {message}"}, status_code=503)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/whoami", whoami),
            Route("/api/jobs", jobs),
            Route("/api/models/{model_id:int}", model),
            Route("/api/models/{model_id:int}/logs", model_logs),
            Route("/api/stream", stream),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        exception_handlers={BadRequest: bad_request, psycopg.Error: database_error},
    )


class TokenGate:
    """The page and its static files are open (they hold no data); every /api/ request needs the server's token, in
    an `Authorization: Bearer` header (the page's script keeps it in sessionStorage: this origin's own, its port
    included), or, for the event stream (EventSource sends no header), a ticket: single-use, valid TICKET_SECONDS,
    from POST /api/ticket. Never a cookie: a browser sends a cookie to every service on the host, whatever its port
    (RFC 6265), so another local web service would receive the token."""

    TICKET_SECONDS = 30.0

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token
        self.tickets: dict[str, float] = {}  # ticket -> when it expires (time.monotonic())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        ticket = request.query_params.get("ticket") if scope["path"] == "/api/stream" else None
        if not (self._redeem(ticket) if ticket is not None else self._bearer(request)):
            refused = PlainTextResponse(
                "this dashboard needs its token: open the URL `pgml-tuned dashboard` printed (…/#token=…)",
                status_code=403,
            )
            await refused(scope, receive, send)
            return
        if scope["path"] == "/api/ticket":
            answer: Response = (
                JSONResponse({"ticket": self._issue(), "seconds": self.TICKET_SECONDS})
                if request.method == "POST"
                else JSONResponse({"error": "POST /api/ticket"}, status_code=405)
            )
            await answer(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _bearer(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), self.token.encode())

    def _issue(self) -> str:
        now = time.monotonic()
        self.tickets = {t: until for t, until in self.tickets.items() if until > now}
        ticket = secrets.token_urlsafe(24)
        self.tickets[ticket] = now + self.TICKET_SECONDS
        return ticket

    def _redeem(self, ticket: str) -> bool:
        until = self.tickets.pop(ticket, None)
        return until is not None and until > time.monotonic()


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (port 0: any free port), bound before the server starts so its URL is known."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} is not an address this machine can listen on: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ValueError(
            f"cannot listen on {host}:{port}: {e.strerror} (another program uses the port? pick one with --port)"
        ) from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket, token: str) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/#token={token}"  # a fragment: never sent to the server, nor kept in its logs


async def serve_dashboard(
    dsn: str,
    viewer: str,
    sock: socket.socket,
    *,
    poll_seconds: float,
    on_ready: Callable[[str], None],
    token: str | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's handlers) — `on_ready(url)` once it accepts connections."""
    token = token or secrets.token_urlsafe(24)
    wakeups = Wakeups()
    async with db.pool(dsn, "pgml-tuned dashboard", max_size=4, read_only=True) as pool:
        app = TokenGate(build_app(Reader(pool), wakeups, viewer, poll_seconds), token)
        config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False, timeout_graceful_shutdown=1)
        server = _Server(config, lambda: on_ready(url_of(sock, token)), wakeups.close)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listen, dsn, wakeups)
            await server.serve(sockets=[sock])
            tg.cancel_scope.cancel()


class _Server(uvicorn.Server):
    """uvicorn's server, saying when it accepts connections and when it begins to shut down (the event streams
    end then, instead of being cancelled when the grace period runs out)."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None], on_shutdown: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_started, self.on_shutdown = on_started, on_shutdown

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.on_shutdown()
        await super().shutdown(sockets)
