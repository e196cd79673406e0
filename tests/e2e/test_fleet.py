"""The fleet, with real `pgml-tuned serve` processes on a real PostgreSQL: the registry (pgml.workers /
pgml.worker_status), resource-aware claims, pgml.tune's NOTICE and pgml.wait's INFO when no worker can run a job
or its worker died, a drain that takes over a dead worker's job, /metrics and systemd's notify protocol."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.rows import dict_row

from pgml_tuned import cli
from tests.conftest import DaemonProc, job_row, wait_for, wait_job

Conn = psycopg.Connection[dict[str, Any]]
NO_SERVING = ("--serving", "false")  # the inference lane is not what these tests look at


def worker(conn: Conn, worker_id: str) -> dict[str, Any] | None:
    return conn.execute("SELECT * FROM pgml.worker_status WHERE id = %s", (worker_id,)).fetchone()


def live(conn: Conn, worker_id: str) -> dict[str, Any]:
    return wait_for(
        lambda: (w := worker(conn, worker_id)) is not None and w["state"] == "live" and w,
        60,
        what=f"worker {worker_id} to register",
    )


def noop(conn: Conn, project: str, **hyperparams: Any) -> int:
    row = conn.execute(
        "SELECT job_id FROM pgml.tune(%s, task => 'noop', model_name => 'none', hyperparams => %s::jsonb)",
        (project, json.dumps(hyperparams)),
    ).fetchone()
    assert row is not None
    return int(row["job_id"])


def collect(conn: Conn) -> list[str]:
    """Every NOTICE / INFO the session receives from now on."""
    seen: list[str] = []
    conn.add_notice_handler(lambda d: seen.append(f"{d.severity}: {d.message_primary}"))
    return seen


def test_registry_row_appears_then_goes_stale_after_kill(
    conn: Conn, ops: Conn, su: Conn, daemon: Any, worker_dsn: str, conn_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    d = daemon("--worker-id", "fleet-a", "--concurrency", "2", *NO_SERVING, env={"CUDA_VISIBLE_DEVICES": ""})
    row = live(conn, "fleet-a")  # a user sees the fleet
    assert row["concurrency"] == 2 and row["free_slots"] == 2 and row["gpus"] == 0 and row["devices"] == []
    assert row["running"] == [] and row["pid"] == d.proc.pid and row["version"]
    summary = ops.execute("SELECT * FROM pgml.queue_summary WHERE status = 'queued'").fetchone()
    assert summary is not None and summary["live_workers"] >= 1 and summary["free_slots"] >= 2
    # a running job shows in its row, and the free slots go down
    job = noop(ops, "fleet-reg", seconds=30, steps=300)
    wait_for(
        lambda: (w := worker(ops, "fleet-a")) and w["running"] == [job] and w["free_slots"] == 1,
        30,
        what="the heartbeat to report the running job",
    )
    # a user sees the fleet, but not another user's job ids nor the models it keeps warm
    seen_by_user = worker(conn, "fleet-a")
    assert seen_by_user is not None and seen_by_user["running"] == [] and seen_by_user["models_cached"] is None
    assert seen_by_user["serving"] is None
    assert seen_by_user["free_slots"] == 1
    cli.main(["status", "--dsn", conn_dsn])
    out = capsys.readouterr().out
    assert "workers: 1 live" in out and "fleet-a" in out and "1/2 free" in out, out
    cli.main(["status", "--dsn", conn_dsn, "--json"])
    shown = json.loads(capsys.readouterr().out)["workers"]
    assert [(w["id"], w["state"], w["free_slots"]) for w in shown] == [("fleet-a", "live", 1)]
    # only the daemon itself can write its row: not the table, not its functions without its token
    with psycopg.connect(worker_dsn, autocommit=True) as w:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            w.execute("UPDATE pgml.workers SET free_slots = 99")
        forged = w.execute(
            "SELECT pgml._worker_heartbeat('fleet-a', 'not-the-token-of-fleet-a', 99, 0, '{}', '[]') AS owned"
        ).fetchone()
        assert forged == (False,)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT pgml._worker_stop('fleet-a', 'x')")
    # killed: its row goes stale (gone) once its lease has run out
    d.signal(signal.SIGKILL)
    d.wait(10)
    gone = wait_for(
        lambda: (w := worker(conn, "fleet-a")) and w["state"] == "gone" and w, 30, what="the row to go stale"
    )
    assert gone["heartbeat_age"] >= 3
    # a clean exit marks it stopped
    d2 = daemon("--worker-id", "fleet-b", *NO_SERVING)
    live(conn, "fleet-b")
    # up, not still starting: a heartbeat after its registration (its SIGTERM handler is set up by then)
    registered = su.execute("SELECT heartbeat_at FROM pgml.workers WHERE id = 'fleet-b'").fetchone()["heartbeat_at"]
    wait_for(
        lambda: su.execute(
            "SELECT heartbeat_at > %s AS beat FROM pgml.workers WHERE id = 'fleet-b'", (registered,)
        ).fetchone()["beat"],
        30,
        what="worker fleet-b's first heartbeat",
    )
    d2.signal(signal.SIGTERM)
    assert d2.wait(30) == 0
    stopped = worker(conn, "fleet-b")
    assert stopped is not None and stopped["state"] == "stopped" and stopped["free_slots"] == 0
    # the same worker id while that worker lives, from another login, is refused
    d3 = daemon("--worker-id", "fleet-c", *NO_SERVING)
    live(conn, "fleet-c")
    with pytest.raises(psycopg.errors.UniqueViolation, match="in use by a live worker"):
        su.execute("SELECT pgml._worker_register('fleet-c', 'another-token-0123456789', 'h', 1, 'v', '[]', 0, 1, 1, 3)")
    d3.stop()


def test_a_gpu_job_on_cpu_workers_notice_info_and_no_claim(ops: Conn, daemon: Any) -> None:
    cpu = daemon("--worker-id", "fleet-cpu", *NO_SERVING, env={"CUDA_VISIBLE_DEVICES": ""})
    live(ops, "fleet-cpu")
    seen = collect(ops)
    gpu_job = noop(ops, "fleet-gpu", seconds=0, resources={"gpus": 1})
    assert any(m.startswith("NOTICE: ") and f"job {gpu_job} is queued" in m and "asks for 1 GPU" in m for m in seen), (
        seen
    )
    assert job_row(ops, gpu_job)["status"] == "queued"  # warned, still queued
    cpu_job = noop(ops, "fleet-gpu", seconds=0)  # behind it in the queue, and runnable here
    assert wait_job(ops, cpu_job, 60)["status"] == "succeeded"
    assert job_row(ops, gpu_job)["status"] == "queued" and job_row(ops, gpu_job)["attempt"] == 0
    # CALL pgml.wait says why instead of waiting silently
    seen.clear()
    with pytest.raises(psycopg.errors.QueryCanceled):
        ops.execute("CALL pgml.wait(%s, 0.2, 1.5)", (gpu_job,))
    said = [m for m in seen if m.startswith("INFO: ")]
    assert len(said) == 1 and "asks for 1 GPU and no live worker has that many" in said[0], seen
    # a bad resources value is refused, nothing queued
    before = ops.execute("SELECT count(*) AS n FROM pgml.jobs").fetchone()
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"resources\.gpus must be a positive whole number"):
        noop(ops, "fleet-gpu", resources={"gpus": -1})
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"unknown key hyperparams\.resources\.gpu"):
        noop(ops, "fleet-gpu", resources={"gpu": 1})
    assert ops.execute("SELECT count(*) AS n FROM pgml.jobs").fetchone() == before
    # a worker that has a GPU (--gpus 0: its slot's device) claims it
    cpu.stop()
    gpu = daemon("--worker-id", "fleet-gpu0", "--gpus", "0", *NO_SERVING)
    row = live(ops, "fleet-gpu0")
    assert row["gpus"] == 1 and row["devices"][0]["index"] == "0"
    done = wait_job(ops, gpu_job, 60)
    assert done["status"] == "succeeded" and done["worker"] == "fleet-gpu0"
    gpu.stop()


def test_a_dead_workers_job_wait_says_so_and_a_drain_takes_it_over(ops: Conn, daemon: Any) -> None:
    doomed = daemon("--worker-id", "fleet-doomed", *NO_SERVING)
    live(ops, "fleet-doomed")
    job = noop(ops, "fleet-dead", seconds=4, steps=40)
    wait_job(ops, job, 60, statuses=("running",))
    doomed.signal(signal.SIGKILL)
    doomed.wait(10)
    wait_for(
        lambda: ops.execute(
            "SELECT lease_expires_at < clock_timestamp() AS expired FROM pgml.jobs WHERE id = %s", (job,)
        ).fetchone()["expired"],
        30,
        what="the dead worker's lease to expire",
    )
    seen = collect(ops)
    with pytest.raises(psycopg.errors.QueryCanceled):
        ops.execute("CALL pgml.wait(%s, 0.2, 1.0)", (job,))
    said = [m for m in seen if m.startswith("INFO: ") and "stopped heartbeating" in m]  # (after the job's own lines)
    assert said and "fleet-doomed stopped heartbeating" in said[0] and "no live worker is left" in said[0], seen
    assert "INFO: claimed by worker fleet-doomed (attempt 1)" in seen, seen
    assert job_row(ops, job)["status"] == "running"  # nobody reaped it: no daemon is left
    # a drain does not exit while that job is stranded: it reaps it, runs it, then exits
    rescuer = daemon("--drain", "--worker-id", "fleet-rescuer", *NO_SERVING)
    assert rescuer.wait(90) == 0, rescuer.output()[-3000:]
    done = job_row(ops, job)
    assert done["status"] == "succeeded" and done["attempt"] == 2 and done["worker"] == "fleet-rescuer"
    assert done["errors"][0]["worker"] == "fleet-doomed"
    assert "job.lease_expired" in rescuer.output()


def test_a_drain_waits_for_a_late_worker_whose_lease_has_not_expired(ops: Conn, daemon: Any) -> None:
    """Started right after the worker died (its lease still valid): the drain still waits for the job."""
    doomed = daemon("--worker-id", "fleet-late", "--lease-seconds", "8", *NO_SERVING)
    live(ops, "fleet-late")
    job = noop(ops, "fleet-late", seconds=2, steps=20)
    wait_job(ops, job, 60, statuses=("running",))
    doomed.signal(signal.SIGKILL)
    doomed.wait(10)
    wait_for(lambda: worker(ops, "fleet-late")["state"] == "late", 10, what="the worker to miss heartbeats")
    assert job_row(ops, job)["lease_expires_at"] is not None
    rescuer = daemon("--drain", "--worker-id", "fleet-late-rescuer", *NO_SERVING)
    assert rescuer.wait(90) == 0, rescuer.output()[-3000:]
    done = job_row(ops, job)
    assert done["status"] == "succeeded" and done["worker"] == "fleet-late-rescuer"


def metrics_port(d: DaemonProc) -> int:
    def port() -> int | None:
        for line in d.output().splitlines():
            if '"metrics.listening"' in line:
                return int(json.loads(line)["port"])
        return None

    return int(wait_for(port, 60, what="the metrics listener"))


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def test_metrics_are_served_and_parse(ops: Conn, daemon: Any) -> None:
    d = daemon("--worker-id", "fleet-metrics", "--metrics-port", "0", *NO_SERVING)
    port = metrics_port(d)
    job = noop(ops, "fleet-metrics", seconds=0)
    assert wait_job(ops, job, 60)["status"] == "succeeded"
    samples = wait_for(
        lambda: (s := scrape(port)).get(("pgml_job_duration_seconds_count", (("outcome", "succeeded"),))) and s,
        30,
        what="the attempt's duration",
    )
    assert samples[("pgml_jobs", (("status", "succeeded"),))] >= 1
    assert samples[("pgml_job_pickup_seconds_count", ())] >= 1
    assert 0 < samples[("pgml_job_pickup_seconds_sum", ())] < 60
    assert 0 <= samples[("pgml_worker_heartbeat_age_seconds", ())] < 5
    assert samples[("pgml_lease_takeovers_total", ())] == 0
    assert ("pgml_checkpoint_bytes_total", ()) in samples
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
    assert e.value.code == 404


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    where = tempfile.mkdtemp(prefix="pgml-sd-", dir="/tmp")  # sun_path holds 108 bytes: pytest's tmp_path may not fit
    path = os.path.join(where, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(60)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(where, ignore_errors=True)


def test_sd_notify_ready_watchdog_stopping(notify_socket: tuple[socket.socket, str], ops: Conn, daemon: Any) -> None:
    sock, path = notify_socket
    d = daemon("--worker-id", "fleet-systemd", *NO_SERVING, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000"})
    first = sock.recv(4096).decode()
    assert first.splitlines()[0] == "READY=1", first
    assert worker(ops, "fleet-systemd") is not None  # registered before it said ready
    t0 = time.monotonic()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert time.monotonic() - t0 < 5  # from the heartbeat loop (0.5 s in the tests)
    d.signal(signal.SIGTERM)
    while (message := sock.recv(4096).decode()).startswith("WATCHDOG=1"):
        pass
    assert message.splitlines()[0] == "STOPPING=1", message
    assert d.wait(30) == 0


def test_idle_workers_counts_the_live_workers_with_a_free_slot(worker_dsn: str) -> None:
    """The herd control's fleet size (queries.sql idle_workers), read as the worker's own role."""
    from psycopg.types.json import Jsonb

    from pgml_tuned.db import q

    TOKEN = "herd-test-token-0123456789"
    with psycopg.connect(worker_dsn, autocommit=True, row_factory=dict_row) as w:
        for name, free in (("herd-a", 1), ("herd-b", 0), ("herd-c", 2)):
            info = {"host": "h", "pid": 1, "version": "t", "devices": Jsonb([]), "gpus": 0, "concurrency": 2, "cpus": 2}
            w.execute(
                q("worker_register"),
                {"worker": name, "token": TOKEN, **info, "heartbeat_seconds": 5, "lease_seconds": 30},
            )
            w.execute(
                q("worker_heartbeat"),
                {
                    "worker": name,
                    "token": TOKEN,
                    "free_slots": free,
                    "free_gpus": 0,
                    "running": [],
                    "models_cached": Jsonb([]),
                    "serving": Jsonb({}),
                },
            )
        assert w.execute(q("idle_workers")).fetchone() == {"idle": 2, "live": 3}
        w.execute(q("worker_stop"), {"worker": "herd-c", "token": TOKEN})
        assert w.execute(q("idle_workers")).fetchone() == {"idle": 1, "live": 2}
