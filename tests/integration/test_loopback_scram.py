"""The loopback on a server that asks for passwords (scram), migrated by a role that is not a superuser — the
managed-PostgreSQL setup: a provider's administrator installed dblink; the migrating role may create roles and
owns the database, nothing more. A server of its own (the embedded PostgreSQL, under the test state dir)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgml_tuned import db, embedded
from tests.conftest import STATE


@pytest.fixture(scope="module")
def scram_server() -> Iterator[tuple[str, Path]]:
    home = STATE / f"scram-{uuid.uuid4().hex[:6]}"
    su = embedded.ensure(home)
    superuser = conninfo_to_dict(su).get("user", "postgres")
    (home / "pgdata" / "pg_hba.conf").write_text(
        f"local all {superuser} trust\nlocal all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\n"
    )
    with psycopg.connect(su, autocommit=True) as c:
        c.execute("SELECT pg_reload_conf()")
    try:
        yield su, home
    finally:
        embedded.stop(home)
        shutil.rmtree(home, ignore_errors=True)


def dsn(base: str, **kw: str) -> str:
    return make_conninfo("", **{**conninfo_to_dict(base), **kw})


def test_a_non_superuser_migrates_and_the_loopback_logs_in_with_its_password(scram_server: tuple[str, Path]) -> None:
    su, home = scram_server
    with psycopg.connect(su, autocommit=True) as c:
        c.execute("CREATE ROLE migrator LOGIN CREATEROLE PASSWORD 'migrator-pw'")
        c.execute("CREATE DATABASE managed OWNER migrator")
    with psycopg.connect(dsn(su, dbname="managed"), autocommit=True) as c:  # the provider's administrator
        c.execute("CREATE SCHEMA pgml_dblink")
        c.execute("REVOKE ALL ON SCHEMA pgml_dblink FROM PUBLIC")
        c.execute("CREATE EXTENSION dblink SCHEMA pgml_dblink")
        c.execute("GRANT USAGE ON SCHEMA pgml_dblink TO migrator WITH GRANT OPTION")
        c.execute("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgml_dblink TO migrator WITH GRANT OPTION")
        c.execute("REVOKE EXECUTE ON FUNCTION pgml_dblink.dblink_connect_u(text, text) FROM migrator")
    migrator = dsn(su, dbname="managed", user="migrator", password="migrator-pw")
    anyio.run(db.migrate, migrator)
    with psycopg.connect(migrator, autocommit=True) as c:
        assert not c.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
        # this server listens on a socket in its data directory only; the migrator may not read where
        # (pg_read_all_settings), so it says so itself, as an administrator would after moving a server
        c.execute("SELECT pgml._setup_loopback(%s)", (f"host={home / 'pgdata'} port=5432",))
        c.execute("CREATE ROLE alice LOGIN PASSWORD 'alice-pw'")
        c.execute("GRANT pgml_user TO alice")
        c.execute("GRANT EXECUTE ON FUNCTION pgml._loopback(text) TO pgml_user")  # a probe, for this test
        c.execute("GRANT EXECUTE ON FUNCTION pgml._submitter() TO pgml_loopback")
        # dblink_connect (not _u): the server asked for the loopback's password, so dblink lets it through
        assert not c.execute(
            "SELECT has_function_privilege('pgml_owner', 'pgml_dblink.dblink_connect_u(text, text)', 'EXECUTE')"
        ).fetchone()[0]
    with psycopg.connect(dsn(su, dbname="managed", user="alice", password="alice-pw"), autocommit=True) as c:
        assert c.execute("SELECT pgml._loopback('to_jsonb(pgml._submitter())')").fetchone()[0] == "alice"
