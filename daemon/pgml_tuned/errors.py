"""Exceptions shared by the child process, the recipes and the model loader, and the Python client's typed errors
(the bottom layer: imports nothing of ours).

The client's errors: every entry point of pgml_tuned.OpenSourceAI runs under `pgml_errors()`, which turns a
psycopg error into a PgmlError of the class its SQLSTATE belongs to (see SQLSTATE_CLASSES), chained to it
(`raise ... from e`): `str(e)` is the message, its DETAIL and its HINT, never PL/pgSQL's CONTEXT lines, and never
a password (a connection error names the server it tried as user@host:port/dbname).

    try:
        client.wait(job_id)
    except pgml_tuned.JobFailedError as e:
        print(e.job_id, e.message, e.hint)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg.conninfo import conninfo_to_dict

__all__ = [
    "ConnectionFailedError",
    "InvalidInputError",
    "JobFailedError",
    "NotFoundError",
    "PermissionDeniedError",
    "PgmlError",
    "TimedOutError",
    "connection_message",
    "pgml_errors",
    "shown_dsn",
    "translated",
]


class JobError(Exception):
    """A problem with the job itself (bad input, bad hyperparams): fails the job with this message."""


class Interrupted(Exception):
    """SIGTERM arrived: the job goes back to the queue (after a checkpoint when one could be saved)."""


class LeaseLost(RuntimeError):
    """A fenced write matched no row: this attempt no longer owns the job."""


# ---- the Python client's errors ----

JOB_IN_MESSAGE = re.compile(r"\bjob (\d+)\b")


class PgmlError(Exception):
    """What pgml-tuned refused or could not do, as the client reports it: `message` (one sentence), `hint` (the
    fix, when there is one), `detail`, `job_id` (the job it is about, when it is about one) and `sqlstate` (the
    PostgreSQL error code, None for errors found on the client's side or before a server answered)."""

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        job_id: int | None = None,
        sqlstate: str | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint or None
        self.detail = detail or None
        self.sqlstate = sqlstate
        found = JOB_IN_MESSAGE.search(message)
        self.job_id = job_id if job_id is not None else int(found.group(1)) if found else None

    def __str__(self) -> str:
        return (
            self.message
            + (f"\nDETAIL: {self.detail}" if self.detail else "")
            + (f"\nHINT: {self.hint}" if self.hint else "")
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, hint={self.hint!r}, sqlstate={self.sqlstate!r})"


class InvalidInputError(PgmlError, ValueError):
    """A bad argument: a wrong value, type, name or shape (SQLSTATE classes 22, 23, 42, 0A, 54)."""


class NotFoundError(PgmlError, LookupError):
    """No such job, model, project, credential, table or request (P0002, 02000, 42704, 42P01, 42703, 42883)."""


class PermissionDeniedError(PgmlError, PermissionError):
    """The login may not do that (42501, class 28)."""


class TimedOutError(PgmlError, TimeoutError):
    """Nothing came in time: no worker took the request or the job, or a wait ran out (57014, 55P03)."""


class JobFailedError(PgmlError, RuntimeError):
    """The job or the request ran and failed, or was cancelled (class 38, 39, and 22000 from a failed request)."""


class ConnectionFailedError(PgmlError, ConnectionError):
    """The database could not be reached, or the connection was lost (class 08, 53300, 57P0x)."""


# the most specific first: a 5-character code, then its 2-character class
SQLSTATE_CLASSES: tuple[tuple[str, type[PgmlError]], ...] = (
    ("42501", PermissionDeniedError),
    ("42704", NotFoundError),
    ("42P01", NotFoundError),
    ("42703", NotFoundError),
    ("42883", NotFoundError),
    ("P0002", NotFoundError),
    ("22000", JobFailedError),  # pgml._request_answer: the serving side failed the request
    ("57014", TimedOutError),
    ("55P03", TimedOutError),
    ("53300", ConnectionFailedError),
    ("57P01", ConnectionFailedError),
    ("57P02", ConnectionFailedError),
    ("57P03", ConnectionFailedError),
    ("02", NotFoundError),
    ("08", ConnectionFailedError),
    ("22", InvalidInputError),
    ("23", InvalidInputError),
    ("28", PermissionDeniedError),
    ("38", JobFailedError),
    ("39", JobFailedError),
    ("0A", InvalidInputError),
    ("42", InvalidInputError),
    ("54", InvalidInputError),
)


def error_class(sqlstate: str) -> type[PgmlError]:
    """The PgmlError subclass of a SQLSTATE (PgmlError itself for one outside SQLSTATE_CLASSES)."""
    for prefix, cls in SQLSTATE_CLASSES:
        if sqlstate.startswith(prefix):
            return cls
    return PgmlError


def shown_dsn(dsn: str) -> str:
    """A DSN as it may be printed: user@host:port/dbname, never a password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "the DSN given"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    user = f"{params['user']}@" if params.get("user") else ""
    port = f":{params['port']}" if params.get("port") else ""
    return f"{user}{host}{port}/{params.get('dbname') or ''}"


LIBPQ_PREFIX = re.compile(r"^(connection failed: )?(connection to server (at|on) .*?failed: )?(FATAL: +)?")


def connection_message(e: BaseException, dsn: str | None) -> str:
    """Why a connection failed, as sentences on one line: libpq's lines (one per address tried) without their
    `connection to server at "...", port N failed:` prefixes (the caller names the server), each said once, and
    with the DSN and its password taken out (libpq may quote either)."""
    reasons: list[str] = []
    for line in str(e).splitlines():
        reason = LIBPQ_PREFIX.sub("", " ".join(line.split()))
        if reason and reason not in reasons:
            reasons.append(reason)
    text = " ".join(r if r.endswith((".", "?", "!")) else r + "." for r in reasons)
    secrets = [dsn or ""]
    try:
        secrets.append(str(conninfo_to_dict(dsn or "").get("password") or ""))
    except psycopg.ProgrammingError:
        pass
    for secret in filter(None, secrets):
        text = text.replace(secret, "***")
    return text


def translated(e: psycopg.Error, dsn: str | None = None) -> PgmlError:
    """The PgmlError of a psycopg error (not raised: the caller chains it, `raise translated(e) from e`)."""
    if e.sqlstate is None and isinstance(e, psycopg.OperationalError):  # no server answered, or it went away
        where = f" to {shown_dsn(dsn)}" if dsn else ""
        return ConnectionFailedError(
            f"cannot connect{where}: {connection_message(e, dsn)}",
            "check the database URL (OpenSourceAI(database_url), else PGML_DSN, else DATABASE_URL) and that its "
            "server is running",
        )
    if e.sqlstate is None:  # found on the client's side: a closed connection, a DSN that does not parse
        cls = ConnectionFailedError if isinstance(e, psycopg.InterfaceError) else PgmlError
        return cls(connection_message(e, dsn))
    diag = e.diag
    return error_class(e.sqlstate)(
        diag.message_primary or " ".join(str(e).split()),
        diag.message_hint,
        sqlstate=e.sqlstate,
        detail=diag.message_detail,
    )


@contextmanager
def pgml_errors(dsn: str | None = None) -> Iterator[None]:
    """Run the block with psycopg's errors turned into PgmlErrors (chained: `__cause__` is psycopg's error);
    `dsn` names the server in a connection error (never its password)."""
    try:
        yield
    except psycopg.Error as e:
        raise translated(e, dsn) from e
