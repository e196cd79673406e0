"""`pgml-tuned migrate` and the plain-psql path; the operator CLI (status, logs, cancel, download)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgml_tuned import embedded
from pgml_tuned.db import SQL_DIR
from tests.conftest import ADMIN, as_login, scratch_database, wait_job


@pytest.fixture
def empty_db(admin_dsn: str) -> Iterator[str]:
    with scratch_database(admin_dsn) as dsn:
        yield dsn


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgml_tuned.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_migrate_is_idempotent_and_records_versions(empty_db: str, tmp_path: Path) -> None:
    first = cli("migrate", "--dsn", empty_db, "--home", str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert "applied 0001_schema" in first.stdout
    again = cli("migrate", "--dsn", empty_db, "--home", str(tmp_path))
    assert again.returncode == 0 and "up to date" in again.stdout
    with psycopg.connect(empty_db) as c:
        versions = [r[0] for r in c.execute("SELECT version FROM pgml.schema_migrations ORDER BY version")]
        assert versions == sorted(p.stem for p in (SQL_DIR / "migrations").glob("*.sql"))
        # migrate creates no sealing key: an administrator registers one (pgml-tuned keys register)
        assert c.execute("SELECT count(*) FROM pgml.sealing_keys").fetchone()[0] == 0
    assert not (tmp_path / "keyring").exists() and not (tmp_path / "worker.key").exists()


def test_plain_psql_applies_the_migrations(empty_db: str) -> None:
    """sql/install.sql with psql alone (no pgml-tuned), twice: the second run changes nothing and does not fail."""
    psql = embedded.psql_path()
    for _ in range(2):
        r = subprocess.run(
            [str(psql), empty_db, "-v", "ON_ERROR_STOP=1", "-q", "-f", str(SQL_DIR / "install.sql")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
    with psycopg.connect(empty_db) as c:
        assert c.execute("SELECT count(*) FROM pgml.schema_migrations").fetchone()[0] == len(
            list((SQL_DIR / "migrations").glob("*.sql"))
        )


def test_cli_status_logs_cancel_download(
    su_dsn: str, ops: psycopg.Connection[dict[str, Any]], daemon: Any, tmp_path: Path
) -> None:
    conn, conn_dsn = ops, as_login(su_dsn, ADMIN)  # an administrator's CLI session (noop is theirs)
    job = conn.execute(
        "SELECT job_id FROM pgml.tune('cli', task => 'noop', model_name => 'none', "
        'hyperparams => \'{"seconds": 1, "steps": 3}\')'
    ).fetchone()["job_id"]
    queued = conn.execute(
        "SELECT job_id FROM pgml.tune('cli', task => 'noop', model_name => 'none', priority => -1)"
    ).fetchone()["job_id"]
    cancel = cli("cancel", str(queued), "--dsn", conn_dsn)
    assert cancel.returncode == 0 and f"job {queued}: cancelled" in cancel.stdout
    daemon()
    follow = cli("logs", str(job), "--follow", "--dsn", conn_dsn)
    assert follow.returncode == 0, follow.stderr
    printed = [json.loads(line) for line in follow.stdout.splitlines()]
    assert [r["step"] for r in printed if "kind" not in r] == [1, 2, 3]
    assert printed[0]["kind"] == "info" and printed[0]["message"].startswith("claimed by worker ")
    assert f"job {job} succeeded" in follow.stderr
    model = wait_job(conn, job)["model_id"]
    assert f"model {model}: pgml-tuned download {model} ./model-{model}" in follow.stderr  # the final line
    status = cli("status", "--dsn", conn_dsn)
    assert status.returncode == 0 and "succeeded 1," in status.stdout and "cli" in status.stdout
    one = json.loads(cli("status", str(job), "--dsn", conn_dsn).stdout)
    assert one["status"] == "succeeded" and one["step"] == 3
    model_id = wait_job(conn, job)["model_id"]
    dl = cli("download", str(model_id), str(tmp_path / "out"), "--dsn", conn_dsn)
    assert dl.returncode == 0 and (tmp_path / "out" / "result.json").read_text() == '{"noop": true}'


def test_bad_settings_are_reported_not_traced(tmp_path: Path) -> None:
    r = cli("serve", "--dsn", "postgresql://nowhere", "--lease-seconds", "1", "--heartbeat-seconds", "1")
    assert r.returncode == 2 and "more than twice heartbeat_seconds" in r.stderr and "Traceback" not in r.stderr


def test_the_embedded_default_separates_users_from_workers() -> None:
    """No DSN: the embedded server, migrated, with a user login that submits and a worker login that serves —
    what a newcomer sees is the secure setup, not a superuser."""
    from tests.conftest import STATE

    home = STATE / f"embedded-default-{uuid.uuid4().hex[:8]}"  # of its own: other workers, other runs
    env = {"PGML_DSN": "", "PGML_KEYRING_DIR": str(home / "keyring")}  # its own keyring, not the session's
    try:
        user_dsn = cli("db", "dsn", "--home", str(home), env=env)
        assert user_dsn.returncode == 0, user_dsn.stderr
        dsn = user_dsn.stdout.strip()
        assert "pgml_local_user" in dsn
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
            assert row == (False,)
            assert conn.execute("SELECT pg_has_role('pgml_user', 'MEMBER')").fetchone() == (True,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("UPDATE pgml.jobs SET status = 'failed'")
        # its administrator's setup registered a sealing key (the guide's inline hub_token works as written),
        # kept in the local keyring; a second start registers no other
        with psycopg.connect(psycopg.conninfo.make_conninfo(dsn, user="postgres"), autocommit=True) as su:
            active = su.execute("SELECT key_id FROM pgml.sealing_keys WHERE active").fetchall()
        assert len(active) == 1 and (home / "keyring" / f"{active[0][0]}.pem").is_file()
        assert cli("db", "dsn", "--home", str(home), env=env).returncode == 0
        with psycopg.connect(psycopg.conninfo.make_conninfo(dsn, user="postgres"), autocommit=True) as su:
            assert su.execute("SELECT count(*) FROM pgml.sealing_keys").fetchone() == (1,)
        worker = psycopg.conninfo.make_conninfo(dsn, user="pgml_local_worker")
        with psycopg.connect(worker, autocommit=True) as conn:
            assert conn.execute("SELECT pg_has_role('pgml_worker', 'MEMBER')").fetchone() == (True,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("CREATE TABLE pgml.x (a int)")
    finally:
        cli("db", "stop", "--home", str(home), env=env)
        shutil.rmtree(home, ignore_errors=True)
