"""Connections, the SQL files, migrations and the one retry helper.

- `q(name)`: a named statement of sql/queries.sql (`-- name: claim_job` blocks) or of another file of sql/;
  `migrate()`: the files sql/install.sql lists, migrations once, functions every time. SQL lives in those files.
- `Pool`: the worker's connection pool. Every statement is a short autocommit transaction of its own; a
  connection found broken is replaced; `retrying()` retries a statement through server restarts.
  LISTEN keeps a dedicated connection of its own (worker/backend.py), never a pooled one.
- Every connection pins `search_path` to pg_catalog, pg_temp: the worker's statements name every object with
  its schema, so nothing a user creates in another schema can be called by them by accident.
- Behind a transaction pooler (PgBouncer pool_mode=transaction; README "Behind PgBouncer"): the pin is a startup
  parameter (`options`), which PgBouncer refuses (then the connection is made again without it) or drops
  (ignore_startup_parameters); the first connection to each DSN reads the effective search_path and warns, with
  the fix, when it is not pinned (ALTER ROLE ... SET search_path survives transaction pooling: it is applied to
  every server connection of the role, at no cost per statement). A DSN is pooled when the startup parameter
  was refused or did not arrive (its marker setting, pgml_tuned.direct, is not set): then no server-side
  prepared statements (prepare_threshold=None), as a statement prepared in one transaction may be on another
  server connection by the next; directly, psycopg's default (prepared from the 5th run). Session state that
  must outlive a transaction (LISTEN, the serving lane's advisory locks) goes to a direct DSN (listen_dsn);
  `listen()` proves that notifications arrive, and callers fall back to polling when they do not.
"""

from __future__ import annotations

import contextlib
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import anyio
import psycopg
import psycopg.sql
from psycopg.rows import DictRow, dict_row

from . import logconfig, secrets

log = logconfig.get("pgml_tuned.db")


def _sql_dir() -> Path:
    """sql/: inside the package when installed from a wheel (pyproject maps pgml_tuned.sql to the repository's
    top-level sql/), at the top of the checkout when running from source or an editable install."""
    here = Path(__file__).resolve().parent
    installed = here / "sql"
    return installed if (installed / "migrations").is_dir() else here.parents[1] / "sql"


SQL_DIR = _sql_dir()
_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.M)
SEARCH_PATH = "pg_catalog, pg_temp"
DIRECT_MARKER = "pgml_tuned.direct"  # a custom setting sent with the startup options: there when they arrived

# Errors after which a fresh connection may succeed: server restarts, terminated backends, network loss.
RETRYABLE = (psycopg.OperationalError, psycopg.errors.AdminShutdown, psycopg.errors.CannotConnectNow)

T = TypeVar("T")
Row = dict[str, Any]


# ---- the SQL files ----


@cache
def queries(file: str = "queries.sql") -> dict[str, str]:
    parts = _NAME.split((SQL_DIR / file).read_text())
    return {parts[i]: parts[i + 1].strip().rstrip(";") for i in range(1, len(parts), 2)}


def q(name: str, file: str = "queries.sql") -> str:
    """The named statement `name` of sql/queries.sql (the worker's), or of another file of sql/ (dashboard.sql)."""
    try:
        return queries(file)[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in {SQL_DIR / file}") from None


_INCLUDE = re.compile(r"^\\ir\s+((?:migrations|functions)/\S+)\s*$", re.M)  # not pending.psql: psql's own


def install_files() -> list[Path]:
    """The files sql/install.sql includes, in its order: the functions tables' constraints call, migrations/, then
    the other files of functions/ (grants last)."""
    return [SQL_DIR / name for name in _INCLUDE.findall((SQL_DIR / "install.sql").read_text())]


def is_migration(file: Path) -> bool:
    """A one-time change (applied once, recorded), as against a file of functions/ (applied by every migrate)."""
    return file.parent.name == "migrations"


def migrations() -> list[tuple[str, str]]:
    """(version, sql) of every migration, in order."""
    return [(f.stem, f.read_text()) for f in install_files() if is_migration(f)]


# ---- connections ----


_role: list[str] = []  # act_as(): the role every connection of this process takes at its start


def act_as(role: str) -> None:
    """Every connection this process opens from now on takes `role` at its start (the startup option role=, i.e.
    SET ROLE; a login not in `role` is refused at connect): the serving process on the worker's login, as
    pgml_serving. Never through a pooler (it would not keep the option): connecting without options then fails."""
    if not _PLAIN_ROLE.match(role):
        raise ValueError(f"not a plain role name: {role!r}")
    _role[:] = [role]


_PLAIN_ROLE = re.compile(r"^[a-z_][a-z0-9_]*$")


def conn_kwargs(app: str, *, read_only: bool = False, options: bool = True) -> dict[str, Any]:
    """read_only: the server refuses every write of the session (the dashboard's connections). options=False: no
    startup `options` (a pooler that refuses them), and never a server-side prepared statement."""
    kwargs: dict[str, Any] = {"row_factory": dict_row, "application_name": app, "connect_timeout": 10}
    if options:
        kwargs["options"] = (
            f"-c search_path={SEARCH_PATH.replace(' ', '')} -c {DIRECT_MARKER}=on"
            + (" -c default_transaction_read_only=on" if read_only else "")
            + "".join(f" -c role={r}" for r in _role)
        )
    else:
        kwargs["prepare_threshold"] = None
    return kwargs


# DSNs whose server refused the `options` startup parameter (a pooler), and those whose search_path was checked
_no_options: set[str] = set()
_direct: dict[str, bool] = {}  # dsn -> the startup options arrived (checked once, on the first connection)


def _refused_options(e: psycopg.OperationalError, dsn: str, read_only: bool) -> bool:
    """True when `e` is a pooler refusing the `options` startup parameter: then connect again without it (said once
    per DSN). A read-only connection is never made without its read-only pin."""
    if "unsupported startup parameter" not in str(e):
        return False
    if _role:
        raise psycopg.OperationalError(
            f"{str(e).strip()}: a connection as role {_role[0]} needs its startup options; give the serving process "
            "a login of its own (PGML_SERVING_DSN, a member of pgml_serving) or connect it directly to PostgreSQL"
        ) from e
    if read_only:
        raise psycopg.OperationalError(
            f"{str(e).strip()}: a read-only connection needs its startup options; connect it directly to "
            "PostgreSQL, not through the pooler"
        ) from e
    if dsn not in _no_options:
        _no_options.add(dsn)
        log.warning(
            "db.pooler_refused_options",
            error=str(e).strip(),
            note="a connection pooler (PgBouncer?) refused the startup parameter `options`: connecting without it; "
            "search_path must then be pinned on the role (a warning follows if it is not)",
        )
    return True


async def connect(
    dsn: str, *, autocommit: bool = True, app: str = "pgml-tuned", read_only: bool = False
) -> psycopg.AsyncConnection[DictRow]:
    async def attempt(options: bool) -> psycopg.AsyncConnection[DictRow]:
        return await psycopg.AsyncConnection.connect(
            dsn, autocommit=autocommit, **conn_kwargs(app, read_only=read_only, options=options)
        )

    if dsn in _no_options:
        conn = await attempt(False)
    else:
        try:
            conn = await attempt(True)
        except psycopg.OperationalError as e:
            if not _refused_options(e, dsn, read_only):
                raise
            conn = await attempt(False)
    if dsn not in _direct:
        await _check_options(conn, dsn)
    if pooled(dsn):
        conn.prepare_threshold = None
    return conn


async def _check_options(conn: psycopg.AsyncConnection[DictRow], dsn: str) -> None:
    """Once per DSN: did the startup options arrive (else: a pooler), and is search_path pinned (by them, or by the
    role's setting behind a pooler)? A warning with the fix when it is not."""
    async with conn.cursor() as cur:  # its own transaction in autocommit; the caller's otherwise (rolled back)
        await cur.execute(
            "SELECT pg_catalog.current_setting('search_path') AS sp, current_user AS who, "
            "pg_catalog.current_setting(%s, true) AS direct",
            (DIRECT_MARKER,),
        )
        row = await cur.fetchone()
    if not conn.autocommit:
        await conn.rollback()
    assert row is not None
    if _role and row["who"] != _role[0]:  # a pooler dropped the startup options unnoticed
        await conn.close()
        raise psycopg.OperationalError(
            f"connected as {row['who']}, not as role {_role[0]} (the startup options did not arrive: a pooler?): "
            "give the serving process a login of its own (PGML_SERVING_DSN) or connect it directly to PostgreSQL"
        )
    _direct[dsn] = row["direct"] == "on"
    if row["sp"].replace(" ", "") != SEARCH_PATH.replace(" ", ""):
        log.warning(
            "db.search_path_not_pinned",
            search_path=row["sp"],
            role=row["who"],
            note="every statement of pgml-tuned names its schemas, so this is defence in depth lost, not a failure; "
            "behind a transaction pooler pin it on the role: "
            f"ALTER ROLE {psycopg.sql.Identifier(row['who']).as_string(conn)} SET search_path = {SEARCH_PATH}",
        )


def pooled(dsn: str) -> bool:
    """Whether connections to `dsn` look pooled: the `options` startup parameter was refused, or did not arrive
    (a pooler dropping it). Known once a connection to `dsn` was made in this process."""
    return dsn in _no_options or _direct.get(dsn) is False


def sync_connect(dsn: str, app: str = "pgml-tuned") -> psycopg.Connection[DictRow]:
    """A blocking connection (child processes are synchronous; they never prepare statements server-side, so that
    a pooler that drops the startup options unnoticed does not break them)."""
    if dsn not in _no_options:
        try:
            return psycopg.connect(dsn, **conn_kwargs(app), prepare_threshold=None)
        except psycopg.OperationalError as e:
            if not _refused_options(e, dsn, False):
                raise
    return psycopg.connect(dsn, **conn_kwargs(app, options=False))


def fetch_one(conn: psycopg.Connection[Any], query: Any, params: Any = None) -> Row:
    """The single row a blocking query must return."""
    row = conn.execute(query, params).fetchone()
    if row is None:
        raise LookupError(f"no row from {str(query)[:80]!r}")
    return dict(row)


def backoff_delays(first: float = 0.05, cap: float = 5.0) -> Iterator[float]:
    """Exponential backoff with full jitter, forever."""
    delay = first
    while True:
        yield random.uniform(delay / 2, delay)
        delay = min(cap, delay * 2)


async def retrying(
    what: str, fn: Callable[[], Awaitable[T]], *, first: float = 0.05, cap: float = 5.0, deadline: float | None = None
) -> T:
    """Await fn() until it does not raise a RETRYABLE error (backoff between tries); give up at `deadline`
    (time.monotonic()) if one is given, raising the last error."""
    for delay in backoff_delays(first, cap):
        try:
            return await fn()
        except RETRYABLE as e:
            if deadline is not None and time.monotonic() + delay > deadline:
                raise
            log.warning("db.retry", what=what, error=str(e).strip(), retry_in=round(delay, 2))
            await anyio.sleep(delay)
    raise AssertionError("unreachable")


class Pool:
    """The worker's pool of autocommit connections: one statement, one transaction, any free connection.

    Small and in the caller's task: connections are opened when a statement needs one (never in a background
    task), so a connection lost to a server restart is replaced by the statement's own retry, with
    retrying()'s backoff (50 ms first) — a general-purpose pool reconnects on a backoff of its own that
    starts at a second and doubles, long enough for a lease to expire. A connection idle for longer than
    CHECK_IDLE_SECONDS is checked (one round trip) before it is used; a busy one is not (that round trip
    would be on every statement, the claim among them): if it broke meanwhile, its statement fails and runs
    again on another connection.
    """

    CHECK_IDLE_SECONDS = 10.0

    def __init__(self, dsn: str, app: str = "pgml-tuned", *, max_size: int = 4, read_only: bool = False) -> None:
        self.dsn = dsn
        self.app = app
        self.read_only = read_only
        self._slots = anyio.Semaphore(max_size, fast_acquire=True)  # a free slot: no extra pass of the event loop
        self._idle: list[tuple[psycopg.AsyncConnection[DictRow], float]] = []  # (connection, last used)

    async def open(self) -> None:
        pass  # connections open on first use

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            while self._idle:
                conn, _ = self._idle.pop()
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _acquire(self) -> psycopg.AsyncConnection[DictRow]:
        while self._idle:
            conn, used = self._idle.pop()  # the most recently used: the least likely to be stale
            if conn.closed or conn.broken:
                continue
            if time.monotonic() - used > self.CHECK_IDLE_SECONDS:
                try:
                    await conn.execute("")
                except Exception as e:
                    log.warning("db.connection_lost", error=str(e).strip() or type(e).__name__, note="replacing it")
                    with contextlib.suppress(Exception):
                        await conn.close()
                    continue
            return conn
        return await connect(self.dsn, app=self.app, read_only=self.read_only)

    async def _run(
        self, statements: Callable[[psycopg.AsyncConnection[DictRow]], Awaitable[list[Row]]], retry: bool
    ) -> list[Row]:
        """`statements` on a free connection, which goes back to the idle ones after; through a server restart when
        `retry`. A connection whose statements raised is in an unknown state (an aborted transaction, perhaps):
        closed, never reused."""

        async def once() -> list[Row]:
            async with self._slots:
                conn = await self._acquire()
                try:
                    rows = await statements(conn)
                except BaseException:
                    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                        await conn.close()
                    raise
                self._idle.append((conn, time.monotonic()))
                return rows

        return await retrying("statement", once) if retry else await once()

    async def fetch(self, query: str, params: dict[str, Any] | None = None, *, retry: bool = True) -> list[Row]:
        """Run one statement and return its rows; through a server restart when `retry` (the default)."""

        async def one_statement(conn: psycopg.AsyncConnection[DictRow]) -> list[Row]:
            cur = await conn.execute(query, params)
            return list(await cur.fetchall()) if cur.description else []

        return await self._run(one_statement, retry)

    async def fetch_then(
        self, query: str, params: dict[str, Any] | None, then: str, then_params: dict[str, Any] | None
    ) -> list[Row]:
        """`query`'s rows, in a transaction of its own; then, once that has committed, `then` (its rows dropped):
        both sent at once in pipeline mode (BEGIN, query, COMMIT, then), one round trip instead of two. Through a
        server restart as fetch(): a `query` that committed before its connection broke runs again, so it must be
        one whose second run changes nothing."""

        async def pipelined(conn: psycopg.AsyncConnection[DictRow]) -> list[Row]:
            async with conn.pipeline():
                await conn.execute("BEGIN")
                cur = conn.cursor()
                await cur.execute(query, params)
                await conn.execute("COMMIT")
                await conn.execute(then, then_params)
            return list(await cur.fetchall()) if cur.description else []

        return await self._run(pipelined, retry=True)

    async def one(self, query: str, params: dict[str, Any] | None = None) -> Row | None:
        rows = await self.fetch(query, params)
        return rows[0] if rows else None

    async def named(self, name: str, *, retry: bool = True, **params: Any) -> list[Row]:
        # no parameters: send the text as is (with {} psycopg would turn the %s of format() into $1)
        return await self.fetch(q(name), params or None, retry=retry)


@asynccontextmanager
async def pool(dsn: str, app: str = "pgml-tuned", *, max_size: int = 4, read_only: bool = False) -> AsyncIterator[Pool]:
    p = Pool(dsn, app, max_size=max_size, read_only=read_only)
    await p.open()
    try:
        yield p
    finally:
        await p.close()


async def prepare_local(admin_dsn: str) -> None:
    """The embedded default: migrate, then its logins (sql/local_logins.sql)."""
    await migrate(admin_dsn)
    async with await connect(admin_dsn, app="pgml-tuned setup") as conn:
        await conn.execute((SQL_DIR / "local_logins.sql").read_text().encode())


async def local_sealing_key(admin_dsn: str, keyring: Path) -> str | None:
    """The embedded default: its administrator (this machine's user, setting it up) registers a sealing key once,
    into the local keyring, so that the guide's inline `"hub_token"` works as written there. A deployment's
    administrator does the same with `pgml-tuned keys generate` / `keys register`; a worker never does.
    Returns the new key's id, or None when a key is active already."""
    async with await connect(admin_dsn, app="pgml-tuned setup") as conn:
        row = await (await conn.execute(q("active_sealing_key", file="migrate.sql"))).fetchone()
        if row:
            return None
        key = await anyio.to_thread.run_sync(_new_local_key, keyring)  # key generation and files: blocking
        return await secrets.register_key(conn, key)


def _new_local_key(keyring: Path) -> Any:
    keyring.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.generate_private_key()
    secrets.write_private_key(key, keyring / f"{secrets.key_id_of(key)}.pem")
    return key


async def migrate(dsn: str) -> list[str]:
    """Apply the files sql/install.sql lists, in its order: every migration not yet recorded in
    pgml.schema_migrations, every file of sql/functions; return the versions of the migrations applied.

    All of it is one transaction, which first takes a transaction-level advisory lock and then reads which
    migrations were applied: concurrent runs serialize (through a transaction pooler too), and a database is never
    left between two versions. The functions, views, triggers and grants are applied every time (CREATE OR
    REPLACE), so each has one definition, in sql/functions, and an upgraded database gets the same as a new one.
    """
    applied: list[str] = []
    async with await connect(dsn, autocommit=True, app="pgml-tuned migrate") as conn, conn.transaction():
        await conn.execute(q("migrate_lock", file="migrate.sql"))
        done = await _migrations_done(conn)
        for file in install_files():
            if is_migration(file) and file.stem in done:
                continue
            await conn.execute(file.read_text().encode())  # a whole file: no parameters, several statements
            if is_migration(file):
                await conn.execute(q("migration_record", file="migrate.sql"), {"version": file.stem})
                applied.append(file.stem)
    return applied


async def loopback_problem(dsn: str) -> str | None:
    """After a migrate: one statement through this session's loopback, as pgml.transform makes. What is wrong and
    its fix (the error pgml.transform would raise, with its detail and hint), or None when it works (or there is no
    dblink: the synchronous calls say themselves how to install it)."""
    async with await connect(dsn, app="pgml-tuned migrate") as conn:
        try:
            await conn.execute(q("loopback_check", file="migrate.sql"))
        except psycopg.Error as e:
            d = e.diag
            parts = [d.message_primary or str(e).strip()]
            parts += [
                f"{label}: {text}" for label, text in (("DETAIL", d.message_detail), ("HINT", d.message_hint)) if text
            ]
            return "\n".join(parts)
    return None


async def stale_loopback_logins(dsn: str, *, apply: bool) -> list[Row]:
    """The loopback logins whose database is gone (pgml._stale_loopback_logins): login, dropped, note; dropped when
    `apply` and the connecting role may drop roles (otherwise the note says so)."""
    async with await connect(dsn, app="pgml-tuned migrate") as conn:
        cur = await conn.execute(q("stale_loopback_logins", file="migrate.sql"), {"apply": apply})
        return [dict(r) for r in await cur.fetchall()]


async def _migrations_done(conn: psycopg.AsyncConnection[DictRow]) -> set[str]:
    present = await (await conn.execute(q("migrations_table", file="migrate.sql"))).fetchone()
    if not (present and present["present"]):
        return set()
    return {r["version"] for r in await (await conn.execute(q("migrations_done", file="migrate.sql"))).fetchall()}
