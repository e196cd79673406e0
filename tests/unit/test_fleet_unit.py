"""The fleet's pieces without PostgreSQL: sd_notify over a real unix datagram socket, the /metrics responder over
real TCP (parsed with prometheus_client's parser), GPU accounting, resource-aware claims and drains of the real
daemon on the in-memory backend, and the systemd units (systemd-analyze verify, where it exists)."""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgml_tuned.config import Settings
from pgml_tuned.worker import fleet
from pgml_tuned.worker.backend import Notice
from pgml_tuned.worker.daemon import Daemon
from pgml_tuned.worker.metrics import Metrics, serve_metrics
from tests.support.memory import MemoryBackend, fake_launcher

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound unix datagram socket, as systemd's NOTIFY_SOCKET (a short path: sun_path holds 108 bytes)."""
    where = tempfile.mkdtemp(prefix="pgml-sd-", dir="/tmp")
    path = os.path.join(where, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(where, ignore_errors=True)


def test_sd_notify_sends_one_datagram_per_call(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    assert fleet.sd_notify("READY=1", "STATUS=serving", env={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
    assert fleet.sd_notify("WATCHDOG=1", env={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_sd_notify_abstract_socket_and_no_socket() -> None:
    name = f"pgml-sd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert fleet.sd_notify("STOPPING=1", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1"
    assert not fleet.sd_notify("READY=1", env={})  # outside systemd: nothing, and no error
    assert not fleet.sd_notify("READY=1", env={"NOTIFY_SOCKET": "/nonexistent/pgml-notify"})  # a warning, no error


def test_watchdog_enabled_only_for_this_process() -> None:
    assert fleet.watchdog_enabled({"WATCHDOG_USEC": "60000000"})
    assert fleet.watchdog_enabled({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())})
    assert not fleet.watchdog_enabled({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"})
    assert not fleet.watchdog_enabled({})


def test_free_gpus_counts_the_free_slots_devices() -> None:
    devices = [{"index": "0"}, {"index": "1"}]
    assert fleet.free_gpus(["0", "1"], devices, [0, 1]) == 2
    assert fleet.free_gpus(["0", "1"], devices, [1]) == 1
    assert fleet.free_gpus(["0", "1"], devices, []) == 0
    assert fleet.free_gpus([], devices, [0]) == 2  # without --gpus every slot sees every device
    assert fleet.free_gpus([], [], [0]) == 0  # a CPU worker


def test_detect_devices_names_the_gpus_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    found = fleet.detect_devices(["0", "1"])
    assert [d["index"] for d in found] == ["0", "1"]
    assert all(set(d) == {"index", "name", "memory_mb"} for d in found)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CUDA hides every device: none to hand out
    assert fleet.detect_devices([]) == []


async def http_get(port: int, path: str) -> tuple[str, str]:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        data = b""
        while True:
            try:
                data += await stream.receive()
            except anyio.EndOfStream:
                break
    head, _, body = data.decode().partition("\r\n\r\n")
    return head, body


@pytest.mark.anyio
async def test_metrics_responder_serves_what_prometheus_parses() -> None:
    metrics = Metrics()
    metrics.pickup.observe(0.003)
    metrics.on_child_event({"event": "info", "message": "checkpoint at step 20 stored in PostgreSQL", "bytes": 1234})
    metrics.on_child_event({"event": "info", "message": "resuming from the checkpoint", "bytes": 99})  # not a store
    metrics.duration.labels("succeeded").observe(2.5)
    refreshed = []

    async def jobs() -> list[dict[str, Any]]:
        return [{"status": "queued", "jobs": 3}, {"status": "running", "jobs": 1}]

    async def refresh() -> None:
        refreshed.append(1)
        await metrics.refresh(jobs, [])

    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_metrics, "127.0.0.1", 0, metrics, refresh)
        head, body = await http_get(port, "/metrics")
        missing, _ = await http_get(port, "/other")
        tg.cancel_scope.cancel()
    assert head.startswith("HTTP/1.1 200") and "text/plain" in head
    assert missing.startswith("HTTP/1.1 404")
    assert refreshed == [1]
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    assert samples[("pgml_jobs", (("status", "queued"),))] == 3
    assert samples[("pgml_jobs", (("status", "running"),))] == 1
    assert samples[("pgml_job_pickup_seconds_count", ())] == 1
    assert samples[("pgml_checkpoint_bytes_total", ())] == 1234
    assert samples[("pgml_job_duration_seconds_count", (("outcome", "succeeded"),))] == 1
    assert samples[("pgml_lease_takeovers_total", ())] == 0


def make(tmp_path: Path, **settings: Any) -> tuple[Daemon, MemoryBackend]:
    backend = MemoryBackend()
    s = Settings(home=tmp_path, heartbeat_seconds=0.02, lease_seconds=1.0, poll_seconds=0.05, **settings)
    return Daemon(s, backend, fake_launcher(backend, []), drain=True), backend


@pytest.mark.anyio
async def test_a_cpu_worker_drains_past_a_gpu_job_and_registers_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU on this worker, whatever the machine has
    daemon, backend = make(tmp_path)
    gpu_job = backend.submit(seconds=0.01, resources={"gpus": 1})
    cpu_job = backend.submit(seconds=0.01)
    with anyio.fail_after(10):
        await daemon.serve()
    assert backend.statuses() == {gpu_job: "queued", cpu_job: "succeeded"}
    assert backend.registry["gpus"] == 0 and backend.registry["devices"] == []
    assert backend.registry["concurrency"] == 1 and backend.registry["state"] == "stopped"


@pytest.mark.anyio
async def test_a_worker_with_gpus_claims_the_gpu_job(tmp_path: Path) -> None:
    daemon, backend = make(tmp_path, gpus="0,1", concurrency=2)
    job = backend.submit(seconds=0.01, resources={"gpus": 2})
    with anyio.fail_after(10):
        await daemon.serve()
    assert backend.statuses() == {job: "succeeded"}
    assert backend.registry["gpus"] == 2 and [d["index"] for d in backend.registry["devices"]] == ["0", "1"]


UNITS = sorted((REPO / "systemd").glob("*.service"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_units_verify(unit: Path, tmp_path: Path) -> None:
    """The units as shipped, with ExecStart pointing at this checkout's interpreter (the shipped path,
    /opt/pgml-tuned/.venv, does not exist here) and the EnvironmentFile optional."""
    text = unit.read_text()
    assert "Type=notify" in text and re.search(r"^WatchdogSec=\d+", text, re.M)
    for setting in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes"):
        assert setting in text, setting
    assert re.search(r"^ReadWritePaths=/var/lib/pgml-tuned", text, re.M)
    text = text.replace("/opt/pgml-tuned/.venv/bin/pgml-tuned", f"{sys.executable} -m pgml_tuned.cli")
    text = text.replace("EnvironmentFile=/", "EnvironmentFile=-/")
    name = unit.name.replace("@.", "@0.")  # a template is verified as one of its instances
    (tmp_path / name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True, timeout=60
    )
    ours = [line for line in (done.stdout + done.stderr).splitlines() if name in line or "pgml" in line]
    assert done.returncode == 0 and not ours, done.stdout + done.stderr


def test_herd_control_claims_on_about_claim_spread_notices_and_spreads_the_polls(tmp_path: Path) -> None:
    """In a fleet of 1000 idle workers a job_queued NOTIFY wakes each claimer with probability 8/1000, and each
    polls about every 250 s (capped at 60 s, then jittered); a small fleet, or claim_spread 0, behaves as before."""
    daemon, _ = make(tmp_path)
    daemon.settings = daemon.fleet.settings = replace(daemon.settings, poll_seconds=2.0)
    random.seed(7)
    assert daemon.fleet.claims_on_notice() and daemon.poll_delay() == 2.0  # the fleet's size not read yet
    daemon.fleet.idle = daemon.fleet.live = 1000
    woken = 0
    for _ in range(20_000):
        daemon.wake = anyio.Event()
        daemon.dispatch(Notice("job_queued"))
        woken += daemon.wake.is_set()
    assert 100 < woken < 220  # 20000 * 8 / 1000 = 160 expected
    daemon.wake = anyio.Event()
    daemon.dispatch(Notice("listening"))
    assert daemon.wake.is_set()  # a (re)established LISTEN always looks at the queue
    delays = [daemon.poll_delay() for _ in range(1000)]
    assert 30.0 <= min(delays) < 35.0 and 85.0 < max(delays) <= 90.0  # 60 s x 0.5-1.5
    daemon.fleet.idle = 4  # most of the fleet busy: the few idle workers keep polling every poll_seconds
    assert daemon.poll_delay() == 2.0
    daemon.free_slots = []  # a busy worker only reaps: its polls spread over the whole live fleet
    assert 30.0 <= daemon.poll_delay() <= 90.0
    daemon.free_slots = [0]
    daemon.fleet.idle = daemon.fleet.live = 8
    assert all(daemon.fleet.claims_on_notice() for _ in range(100)) and daemon.poll_delay() == 2.0
    old, _ = make(tmp_path, claim_spread=0)
    old.settings = old.fleet.settings = replace(old.settings, poll_seconds=2.0)
    old.fleet.idle = old.fleet.live = 1000
    assert all(old.fleet.claims_on_notice() for _ in range(100)) and old.poll_delay() == 2.0


@pytest.mark.anyio
async def test_a_registered_worker_reads_the_fleet_size_at_its_poll(tmp_path: Path) -> None:
    daemon, backend = make(tmp_path)
    backend.submit(seconds=0.5)
    with anyio.fail_after(10):
        await daemon.serve()
    # read while it ran its job: its registry row (renewed every 0.02 s) had no free slot
    assert (daemon.fleet.idle, daemon.fleet.live) == (0, 1)
