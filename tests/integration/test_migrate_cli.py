"""`pgml-tuned migrate` and the plain-psql path; the operator CLI (status, logs, cancel, download)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgml_tuned import embedded
from pgml_tuned.db import SQL_DIR
from tests.conftest import scratch_database, wait_job


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
        assert c.execute("SELECT count(*) FROM pgml.worker_keys").fetchone()[0] == 1  # key registered


def test_plain_psql_applies_the_migrations(empty_db: str) -> None:
    psql = embedded.psql_path()
    for f in sorted((SQL_DIR / "migrations").glob("*.sql")):
        for _ in range(2):  # idempotent: a second run changes nothing and does not fail
            r = subprocess.run(
                [str(psql), empty_db, "-v", "ON_ERROR_STOP=1", "-q", "-f", str(f)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0, r.stderr
    with psycopg.connect(empty_db) as c:
        assert c.execute("SELECT count(*) FROM pgml.schema_migrations").fetchone()[0] == len(
            list((SQL_DIR / "migrations").glob("*.sql"))
        )


def test_cli_status_logs_cancel_download(
    conn_dsn: str, conn: psycopg.Connection[dict[str, Any]], daemon: Any, tmp_path: Path
) -> None:
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
    assert [json.loads(line)["step"] for line in follow.stdout.splitlines()] == [1, 2, 3]
    assert f"job {job} succeeded" in follow.stderr
    status = cli("status", "--dsn", conn_dsn)
    assert status.returncode == 0 and "status=succeeded  jobs=1" in status.stdout and "cli" in status.stdout
    one = json.loads(cli("status", str(job), "--dsn", conn_dsn).stdout)
    assert one["status"] == "succeeded" and one["step"] == 3
    model_id = wait_job(conn, job)["model_id"]
    dl = cli("download", str(model_id), str(tmp_path / "out"), "--dsn", conn_dsn)
    assert dl.returncode == 0 and (tmp_path / "out" / "result.json").read_text() == '{"noop": true}'


def test_bad_settings_are_reported_not_traced(tmp_path: Path) -> None:
    r = cli("serve", "--dsn", "postgresql://nowhere", "--lease-seconds", "1", "--heartbeat-seconds", "1")
    assert r.returncode == 2 and "more than twice heartbeat_seconds" in r.stderr and "Traceback" not in r.stderr
