"""The database a command talks to: --dsn / PGML_DSN, else the embedded PostgreSQL under $PGML_HOME (created,
migrated and given its logins here), checked before a command runs; and the statements of sql/cli.sql.

A user's error is a CliError: main() prints it as one line (no traceback) and exits with its code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Coroutine
from dataclasses import fields
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg.conninfo import conninfo_to_dict

from .. import db, embedded
from ..config import Settings
from ..errors import connection_message, shown_dsn

QUERIES = "cli.sql"


def q(name: str) -> str:
    """The named statement `name` of sql/cli.sql."""
    return db.q(name, file=QUERIES)


def settings_of(args: argparse.Namespace) -> Settings:
    """The Settings of a command: its flags (None where not given) over the environment's PGML_* settings."""
    return Settings.from_env(**{f.name: getattr(args, f.name, None) for f in fields(Settings)})


def run(fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a command's coroutine to its end (asyncio), answering what it answers."""
    return anyio.run(fn, backend="asyncio")


class CliError(Exception):
    """A user's error: main() prints `pgml-tuned: <message>` (no traceback) and exits with `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def check_syntax(dsn: str) -> None:
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as e:
        raise CliError(
            f"--dsn / PGML_DSN is not a PostgreSQL connection string: {connection_message(e, dsn)}", 2
        ) from None


def connect_failure(e: BaseException, dsn: str) -> str:
    """The one line a failed connection prints: the server tried (user@host:port/dbname, never the password),
    libpq's reason as sentences, and the fix."""
    return (
        f"cannot connect to {shown_dsn(dsn)}: {connection_message(e, dsn)} Fix: check --dsn or PGML_DSN "
        "(without either, pgml-tuned uses its embedded PostgreSQL)"
    )


def check_database(dsn: str, *, schema: bool) -> None:
    """Connect once: an unreachable server or a wrong login is a CliError (exit 2) naming the server and the fix;
    with `schema`, so is a database that has no pgml schema."""
    check_syntax(dsn)
    try:
        with db.sync_connect(dsn) as conn:
            found = conn.execute(q("schema_installed")).fetchone()
    except psycopg.OperationalError as e:
        raise CliError(connect_failure(e, dsn), 2) from None
    if schema and found is None:
        raise CliError(
            f"the database {shown_dsn(dsn)} has no pgml schema yet: an administrator installs it with "
            "`pgml-tuned migrate --dsn ...` (or try everything locally: `pgml-tuned demo` without a DSN)",
            2,
        )


def started(pid: int) -> str | None:
    """When process `pid` started (field 22 of /proc/<pid>/stat, in clock ticks since boot); None if it is gone
    or there is no /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def session_key() -> str | None:
    """This terminal session, as a name that outlives no session: the session id (os.getsid: the same for every
    command a shell runs, whatever its pipes and subshells) and its leader's start time (a later session that
    gets the same id is another one). Where the leader is outside this PID namespace (a container or CI runner
    started inside one: getsid answers 0), the parent process stands for the session instead ("p" before its id:
    the shell or program that runs these commands). None where neither can be known."""
    for prefix, pid in (("", os.getsid(0)), ("p", os.getppid())):
        start = started(pid) if pid > 0 else None
        if start is not None:
            return f"{prefix}{pid}-{start}"
    return None


def first_in_session(home: Path, notice: str) -> bool:
    """Whether `notice` was not yet said in this terminal session (then it counts as said): a marker file
    <home>/notices/<notice>-<session>; the markers of ended sessions are removed. True where the session cannot
    be known: a notice said every time rather than never."""
    key = session_key()
    if key is None:
        return True
    folder = home / "notices"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{notice}-{key}").touch(exist_ok=False)
    except FileExistsError:
        return False
    except OSError:
        return True
    for marker in folder.glob(f"{notice}-*-*"):
        sid, start = marker.name.rsplit("-", 2)[1:]
        if sid.removeprefix("p").isdigit() and started(int(sid.removeprefix("p"))) != start:
            marker.unlink(missing_ok=True)
    return True


def resolve_dsn(
    settings: Settings, *, announce: bool = True, role: str = "user", check: str = "reach", setup: bool = True
) -> str:
    """--dsn / PGML_DSN as given; else the embedded server, migrated, as `role`'s login there: "user" (submits),
    "worker" (serves) or "admin" (its superuser) — the same separation as any deployment.

    check: "reach" (connect once first), "schema" (and the pgml schema must be there) or "none" (serve: the
    daemon waits for its database). setup=False (commands that read what was set up: status, logs, cancel,
    download): never create nor migrate an embedded server; say how to start instead."""
    if settings.dsn:
        if check == "none":
            check_syntax(settings.dsn)
        else:
            check_database(settings.dsn, schema=check == "schema")
        return settings.dsn
    pgdata = settings.home / "pgdata"
    if not setup:
        if not pgdata.is_dir():
            raise CliError(
                f"no database: neither --dsn nor PGML_DSN is set, and there is no embedded PostgreSQL in {pgdata} "
                "yet. Set PGML_DSN to your database, or start a local one: `pgml-tuned demo` (a fine-tune on "
                "bundled data) or `pgml-tuned migrate`",
                2,
            )
        admin = embedded.ensure(settings.home)
        try:
            check_database(admin, schema=True)
        except CliError as e:
            raise CliError(
                f"no --dsn / PGML_DSN: the embedded PostgreSQL in {pgdata} has no pgml schema yet "
                "(set PGML_DSN to your database, or run `pgml-tuned migrate` or `pgml-tuned demo`)"
                if "no pgml schema" in str(e)
                else str(e),
                e.code,
            ) from None
        if first_in_session(settings.home, "embedded"):
            print(
                f"pgml-tuned: no --dsn / PGML_DSN: using the embedded PostgreSQL in {pgdata} "
                "(said once per terminal session)",
                file=sys.stderr,
            )
    else:
        admin = embedded.ensure(settings.home)
    run(lambda: db.prepare_local(admin))
    run(lambda: db.local_sealing_key(admin, settings.keyring))
    dsn = embedded.as_login(admin, role)
    if announce:
        print(
            f"embedded PostgreSQL running in {pgdata}\n"
            f"  connect: {embedded.psql_path()} '{embedded.as_login(admin, 'user')}'\n"
            f"  stop:    pgml-tuned db stop",
            file=sys.stderr,
        )
    return dsn


def child_dsn(settings: Settings) -> str | None:
    """The children's login: --child-dsn / PGML_CHILD_DSN; else the embedded server's child login; else None
    (a deployment that did not configure one: the children use the worker's DSN, and the daemon says so)."""
    if settings.child_dsn or settings.dsn:
        return settings.child_dsn
    return embedded.as_login(embedded.ensure(settings.home), "child")


def serving_dsn(settings: Settings) -> str | None:
    """The serving process's login: --serving-dsn / PGML_SERVING_DSN; else the embedded server's serving login;
    else None (the serving process uses the worker's DSN as role pgml_serving)."""
    if settings.serving_dsn or settings.dsn:
        return settings.serving_dsn
    return embedded.as_login(embedded.ensure(settings.home), "serving")


def reading_dsn(args: argparse.Namespace) -> str:
    """The DSN of a command that reads jobs someone submitted: the database must hold the pgml schema."""
    return resolve_dsn(settings_of(args), announce=False, check="schema", setup=False)
