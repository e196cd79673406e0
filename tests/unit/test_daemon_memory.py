"""The real daemon (slots, drain, shutdown, cancel, lost leases, settling) against the in-memory backend:
no PostgreSQL, no processes, milliseconds per test."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from pgml_tuned.config import Settings
from pgml_tuned.worker.backend import Notice
from pgml_tuned.worker.daemon import Daemon
from tests.support.memory import FakeChild, MemoryBackend, fake_launcher

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make(
    tmp_path: Path, *, concurrency: int = 1, drain: bool = False, grace: float = 5.0, gpus: str | None = None
) -> tuple[Daemon, MemoryBackend, list[FakeChild]]:
    settings = Settings(
        home=tmp_path,
        gpus=gpus,
        concurrency=concurrency,
        heartbeat_seconds=0.02,
        lease_seconds=1.0,
        poll_seconds=0.05,
        grace_seconds=grace,
    )
    backend, started = MemoryBackend(), []
    return Daemon(settings, backend, fake_launcher(backend, started), drain=drain), backend, started


async def until(predicate: Callable[[], bool]) -> None:
    """Poll the daemon's state (it has no event for each of the states the tests look for)."""
    with anyio.fail_after(5):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.005)


async def serving(daemon: Daemon, body: Callable[[], Awaitable[Any]]) -> None:
    """Run the daemon while `body` runs; the daemon must have exited by itself when body returns."""
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.serve)
            await body()


async def test_drain_runs_every_job_within_the_slots_then_exits(tmp_path: Path) -> None:
    daemon, backend, started = make(tmp_path, concurrency=2, drain=True)
    ids = [backend.submit(seconds=0.05) for _ in range(5)]

    async def body() -> None:
        await until(lambda: daemon.stopping and not daemon.attempts)

    await serving(daemon, body)
    assert backend.statuses() == {i: "succeeded" for i in ids}
    assert backend.most_running == 2 and len(started) == 5 and daemon.claimed == 5
    assert daemon.free_slots == [0, 1]


async def test_drain_with_an_empty_queue_exits_at_once(tmp_path: Path) -> None:
    daemon, _, started = make(tmp_path, drain=True)
    with anyio.fail_after(5):
        await daemon.serve()
    assert daemon.claimed == 0 and not started


async def test_shutdown_requeues_running_jobs_and_claims_no_more(tmp_path: Path) -> None:
    daemon, backend, started = make(tmp_path, concurrency=2)
    ids = [backend.submit(seconds=60) for _ in range(3)]

    async def body() -> None:
        await until(lambda: len(started) == 2)
        daemon.shutdown("test")

    await serving(daemon, body)
    assert backend.statuses() == {i: "queued" for i in ids}
    assert [c.signals for c in started] == [["SIGTERM"], ["SIGTERM"]]
    assert [backend.jobs[i].history for i in ids[:2]] == [["claimed", "requeued"]] * 2


async def test_a_sigint_reaches_the_children_as_sigint(tmp_path: Path) -> None:
    """The child names the signal that stopped it in the job's logs: it must get the daemon's own."""
    daemon, backend, started = make(tmp_path)
    job = backend.submit(seconds=60)

    async def body() -> None:
        await until(lambda: len(started) == 1)
        daemon.shutdown("SIGINT")

    await serving(daemon, body)
    assert started[0].signals == ["SIGINT"] and backend.jobs[job].status == "queued"
    assert daemon.stopped_by == "SIGINT"


async def test_a_child_that_fails_by_itself_during_shutdown_fails_its_job(tmp_path: Path) -> None:
    """SIGTERM does not make a job's own error a reason to requeue it: it would only fail again elsewhere."""
    daemon, backend, started = make(tmp_path)
    job = backend.submit(seconds=0.1, ignore_sigterm=True, fail="cannot load model 'nope'")

    async def body() -> None:
        await until(lambda: len(started) == 1)
        daemon.shutdown("test")

    await serving(daemon, body)
    assert backend.jobs[job].status == "failed" and backend.jobs[job].error == "cannot load model 'nope'"


async def test_grace_expired_kills_then_requeues(tmp_path: Path) -> None:
    daemon, backend, started = make(tmp_path, grace=0.1)
    job = backend.submit(seconds=60, ignore_sigterm=True)

    async def body() -> None:
        await until(lambda: len(started) == 1)
        daemon.shutdown("test")

    await serving(daemon, body)
    assert started[0].signals == ["SIGTERM", "SIGKILL"] and backend.jobs[job].status == "queued"


async def test_cancel_is_read_from_the_row_not_the_notice(tmp_path: Path) -> None:
    daemon, backend, started = make(tmp_path, drain=True)
    job = backend.submit(seconds=60)

    async def body() -> None:
        await until(lambda: len(started) == 1)
        daemon.dispatch(Notice("cancel_requested"))
        await anyio.sleep(0.1)
        assert backend.jobs[job].status == "running"  # a notice alone changes nothing
        backend.request_cancel(job)
        await until(lambda: daemon.stopping and not daemon.attempts)

    await serving(daemon, body)
    assert backend.jobs[job].status == "cancelled" and started[0].signals == ["SIGKILL"]


async def test_lost_lease_stops_the_child_and_writes_nothing(tmp_path: Path) -> None:
    daemon, backend, started = make(tmp_path)
    job = backend.submit(seconds=60)

    async def body() -> None:
        await until(lambda: len(started) == 1)
        backend.lose_lease_of.add(job)
        await until(lambda: not daemon.attempts)
        daemon.shutdown("test")

    await serving(daemon, body)
    assert started[0].signals == ["SIGKILL"]
    assert backend.jobs[job].history == ["claimed"] and backend.jobs[job].status == "running"  # the new owner's


async def test_one_renewal_covers_every_running_job(tmp_path: Path) -> None:
    daemon, backend, started = make(tmp_path, concurrency=3)
    for _ in range(3):
        backend.submit(seconds=0.3)

    async def body() -> None:
        await until(lambda: len(started) == 3)
        before = backend.renewals
        await anyio.sleep(0.2)  # ~10 heartbeats of 0.02 s
        assert 3 <= backend.renewals - before <= 12  # one statement per beat for all three, not three
        daemon.shutdown("test")

    await serving(daemon, body)


async def test_failures_and_odd_exits_are_recorded(tmp_path: Path) -> None:
    daemon, backend, _ = make(tmp_path, concurrency=3, drain=True)
    failing = backend.submit(fail="unknown training_args key 'x'")
    silent = backend.submit(exit_code=0)  # exited 0 without committing
    crashed = backend.submit(exit_code=-9)

    async def body() -> None:
        await until(lambda: daemon.stopping and not daemon.attempts)

    await serving(daemon, body)
    assert backend.jobs[failing].error == "unknown training_args key 'x'"
    assert backend.jobs[silent].error == "the training process exited without storing results"
    assert backend.jobs[crashed].error == "the training process exited with code -9"
    assert {backend.jobs[i].status for i in (failing, silent, crashed)} == {"failed"}


async def test_a_job_past_its_runtime_is_stopped_and_failed(tmp_path: Path) -> None:
    daemon, backend, started = make(tmp_path, drain=True)
    job = backend.submit(seconds=60)

    async def body() -> None:
        await until(lambda: len(started) == 1)
        backend.overtime.add(job)
        await until(lambda: daemon.stopping and not daemon.attempts)

    await serving(daemon, body)
    assert backend.jobs[job].status == "failed" and "max_runtime" in (backend.jobs[job].error or "")
    assert started[0].signals == ["SIGKILL"]


async def test_a_job_asking_for_gpus_takes_that_many_slots_and_devices(tmp_path: Path) -> None:
    daemon, backend, started = make(tmp_path, concurrency=3, drain=True, gpus="4,5,6")
    pair = backend.submit(seconds=0.2, resources={"gpus": 2})
    one = backend.submit(seconds=0.2)
    three = backend.submit(seconds=0.05, resources={"gpus": 3})

    async def body() -> None:
        await until(lambda: daemon.stopping and not daemon.attempts)

    await serving(daemon, body)
    assert backend.statuses() == {pair: "succeeded", one: "succeeded", three: "succeeded"}
    devices = {c.spec["id"]: c.env.get("CUDA_VISIBLE_DEVICES") for c in started}
    assert devices == {pair: "4,5", one: "6", three: "4,5,6"}
    assert [c.spec["id"] for c in started] == [pair, one, three]  # three waited for all three GPUs
    assert backend.most_running == 2 and daemon.free_slots == [0, 1, 2]


async def test_without_a_gpu_list_a_job_asking_for_several_gpus_waits(tmp_path: Path) -> None:
    daemon, backend, _ = make(tmp_path, concurrency=2, drain=True)
    many = backend.submit(seconds=0.01, resources={"gpus": 2})
    plain = backend.submit(seconds=0.01, resources={"procs": 2})

    async def body() -> None:
        await until(lambda: daemon.stopping and not daemon.attempts)

    await serving(daemon, body)
    assert backend.statuses() == {many: "queued", plain: "succeeded"}
