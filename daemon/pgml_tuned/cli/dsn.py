"""The database a command talks to: --dsn / PGML_DSN, else the embedded PostgreSQL under $PGML_HOME (created,
migrated and given its logins here), checked before a command runs; and the statements of sql/cli.sql.

A user's error is a CliError: main() prints it as one line (no traceback) and exits with its code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Coroutine
from dataclasses import fields
from typing import Any

import anyio
import psycopg
from psycopg.conninfo import conninfo_to_dict

from .. import db, embedded
from ..config import Settings

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


def shown_dsn(dsn: str) -> str:
    """The DSN as it may be printed: user@host:port/dbname, never a password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "the DSN given"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    user = f"{params['user']}@" if params.get("user") else ""
    port = f":{params['port']}" if params.get("port") else ""
    return f"{user}{host}{port}/{params.get('dbname') or ''}"


def _reason(e: BaseException, dsn: str) -> str:
    """An error's text on one line, with the DSN and its password taken out (libpq may quote either)."""
    text = " ".join(str(e).split())
    secrets = [dsn]
    try:
        secrets.append(str(conninfo_to_dict(dsn).get("password") or ""))
    except psycopg.ProgrammingError:
        pass
    for secret in filter(None, secrets):
        text = text.replace(secret, "***")
    return text.removeprefix("connection failed: ")


def check_syntax(dsn: str) -> None:
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as e:
        raise CliError(f"--dsn / PGML_DSN is not a PostgreSQL connection string: {_reason(e, dsn)}", 2) from None


def check_database(dsn: str, *, schema: bool) -> None:
    """Connect once: an unreachable server or a wrong login is a CliError (exit 2) naming the server and the fix;
    with `schema`, so is a database that has no pgml schema."""
    check_syntax(dsn)
    try:
        with db.sync_connect(dsn) as conn:
            found = conn.execute(q("schema_installed")).fetchone()
    except psycopg.OperationalError as e:
        raise CliError(
            f"cannot connect to {shown_dsn(dsn)}: {_reason(e, dsn)} (check --dsn or PGML_DSN; without either, "
            "pgml-tuned uses its embedded PostgreSQL)",
            2,
        ) from None
    if schema and found is None:
        raise CliError(
            f"the database {shown_dsn(dsn)} has no pgml schema yet: an administrator installs it with "
            "`pgml-tuned migrate --dsn ...` (or try everything locally: `pgml-tuned demo` without a DSN)",
            2,
        )


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
        print(f"pgml-tuned: no --dsn / PGML_DSN: using the embedded PostgreSQL in {pgdata}", file=sys.stderr)
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
