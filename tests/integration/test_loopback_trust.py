"""The loopback on a server that does not ask it for a password (pg_hba.conf trust), migrated by a role that is not
a superuser: dblink refuses such a connection to a non-superuser, so `pgml-tuned migrate` says what is wrong and the
pg_hba.conf line that fixes it, and pgml.transform raises the same (not dblink's "password is required"). And the
loopback logins that dropped databases leave behind: migrate and gc drop them. A server of its own (the embedded
PostgreSQL, under the test state dir): these tests edit its pg_hba.conf and its cluster-wide roles."""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgml_tuned import embedded
from tests.conftest import STATE
from tests.integration.test_loopback_scram import dsn
from tests.integration.test_migrate_cli import cli

TRUST = "local all all trust\nhost all all 127.0.0.1/32 trust\n"


@pytest.fixture(scope="module")
def trust_server() -> Iterator[tuple[str, Path]]:
    home = STATE / f"trust-{uuid.uuid4().hex[:6]}"
    su = embedded.ensure(home)
    (home / "pgdata" / "pg_hba.conf").write_text(TRUST)
    with psycopg.connect(su, autocommit=True) as c:
        c.execute("SELECT pg_reload_conf()")
        # the managed-PostgreSQL administrator: creates roles, owns its databases, reads the settings (where the
        # server's socket is); not a superuser
        c.execute("CREATE ROLE migrator LOGIN CREATEROLE")
        c.execute("GRANT pg_read_all_settings TO migrator")
    try:
        yield su, home
    finally:
        embedded.stop(home)
        shutil.rmtree(home, ignore_errors=True)


def managed_database(su: str, name: str) -> str:
    """A database the migrator owns, with dblink installed by the provider (a superuser); the migrator's DSN."""
    with psycopg.connect(su, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}" OWNER migrator')
    with psycopg.connect(dsn(su, dbname=name), autocommit=True) as c:
        c.execute("CREATE EXTENSION dblink")
    return dsn(su, dbname=name, user="migrator")


def migrate(migrator: str, home: Path) -> subprocess.CompletedProcess[str]:
    r = cli("migrate", "--dsn", migrator, "--home", str(home / "cli"))
    assert r.returncode == 0, r.stderr
    return r


def test_a_trust_server_is_named_with_its_fix_by_migrate_and_by_transform(trust_server: tuple[str, Path]) -> None:
    su, home = trust_server
    migrator = managed_database(su, "trusting")
    first = migrate(migrator, home)
    with psycopg.connect(migrator, autocommit=True) as c:
        login = c.execute("SELECT login FROM pgml.loopback_login").fetchone()[0]
        c.execute("CREATE ROLE alice LOGIN")
        c.execute("GRANT pgml_user TO alice")
    line = f"local trusting {login} scram-sha-256"
    assert "synchronous calls (pgml.transform, pgml.load_dataset) fail" in first.stderr
    assert f"lets its login {login} in without asking for a password" in first.stderr
    assert line in first.stderr and "pg_reload_conf()" in first.stderr

    alice = dsn(su, dbname="trusting", user="alice")
    transform = (
        'SELECT pgml.transform(\'{"task": "text-classification", "model": "m"}\'::jsonb, '
        "'{\"timeout\": 1}', ARRAY['x'])"
    )
    with psycopg.connect(alice, autocommit=True) as c:
        with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification) as e:
            c.execute(transform)
    assert "the loopback of database trusting cannot log in" in e.value.diag.message_primary
    # dblink's own words, kept as the detail ("password is required"; 18: "password or GSSAPI ... required")
    assert re.match(r"dblink: password .*required", e.value.diag.message_detail or "")
    assert line in (e.value.diag.message_hint or "")

    # the fix, as the hint says: the line above the trust lines, and a reload
    (home / "pgdata" / "pg_hba.conf").write_text(line + "\n" + TRUST)
    with psycopg.connect(su, autocommit=True) as c:
        c.execute("SELECT pg_reload_conf()")
    again = migrate(migrator, home)
    assert "warning" not in again.stderr and "password" not in again.stderr, again.stderr
    with psycopg.connect(alice, autocommit=True) as c:
        # the request went through the loopback, committed; no serving process here takes it (after 1 s)
        with pytest.raises(psycopg.errors.LockNotAvailable, match="no pgml-tuned worker is serving"):
            c.execute(transform)


def test_migrate_and_gc_drop_the_loopback_logins_of_dropped_databases_only(trust_server: tuple[str, Path]) -> None:
    su, home = trust_server
    logins = {}
    for name in ("gone_a", "gone_c", "kept_b"):
        migrate(managed_database(su, name), home)
        with psycopg.connect(dsn(su, dbname=name), autocommit=True) as c:
            logins[name] = c.execute("SELECT login FROM pgml.loopback_login").fetchone()[0]
    with psycopg.connect(su, autocommit=True) as c:
        # look-alikes that are not a dropped database's loopback login: a name off the pattern, one not in
        # pgml_loopback, one that still owns something
        c.execute("CREATE ROLE pgml_loopback_abc LOGIN IN ROLE pgml_loopback")
        c.execute("CREATE ROLE pgml_loopback_4000000001 LOGIN")
        c.execute("CREATE ROLE pgml_loopback_4000000002 LOGIN IN ROLE pgml_loopback")
        c.execute("CREATE DATABASE owned_by_a_look_alike OWNER pgml_loopback_4000000002")
        c.execute("DROP DATABASE gone_a")
        c.execute("DROP DATABASE gone_c")
        c.execute("CREATE ROLE auditor LOGIN IN ROLE pgml_admin")  # an administrator who may not drop roles

    def roles() -> set[str]:
        with psycopg.connect(su, autocommit=True) as c:
            return {r[0] for r in c.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'pgml_loopback_%'")}

    look_alikes = {"pgml_loopback_abc", "pgml_loopback_4000000001", "pgml_loopback_4000000002"}
    before = roles()
    assert set(logins.values()) | look_alikes <= before

    # one who may not drop roles is told so, and nothing is dropped
    with psycopg.connect(dsn(su, dbname="kept_b", user="auditor"), autocommit=True) as c:
        rows = c.execute("SELECT login, dropped, note FROM pgml._stale_loopback_logins(true)").fetchall()
    assert [(r[0], r[1]) for r in rows] == sorted([(logins["gone_a"], False), (logins["gone_c"], False)])
    assert all("auditor may not drop roles" in r[2] for r in rows)

    # gc lists them (a dry run drops nothing)
    gc = cli("gc", "--dsn", dsn(su, dbname="kept_b", user="migrator"), "--home", str(home / "cli"))
    assert gc.returncode == 0, gc.stderr
    assert re.search(rf"loopback_login .* {logins['gone_a']}: its database is gone \(--apply drops it\)", gc.stdout)
    assert logins["gone_a"] in roles()

    # migrate drops them, as the migrator (CREATEROLE), and says so
    again = migrate(dsn(su, dbname="kept_b", user="migrator"), home)
    for name in ("gone_a", "gone_c"):
        assert f"loopback login {logins[name]}: its database is gone: dropped" in again.stdout
    assert roles() == before - {logins["gone_a"], logins["gone_c"]}
    assert "loopback login" not in migrate(dsn(su, dbname="kept_b", user="migrator"), home).stdout
