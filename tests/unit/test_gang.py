"""The gang's pure decisions (worker/gang.py) and a lone worker leading a gang that cannot form (memory backend)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from pgml_tuned.config import Settings
from pgml_tuned.states import requested_nodes
from pgml_tuned.worker import gang
from pgml_tuned.worker.daemon import Daemon
from tests.support.memory import FakeChild, MemoryBackend, fake_launcher


def member(node: int, outcome: str | None, error: str | None = None, at: float | None = None, silent: float = 0.1):
    return gang.Member(node, f"w{node}", outcome, error, at, silent)


def test_the_earliest_failure_on_any_host_is_the_jobs_error() -> None:
    members = [member(1, "error", "rank 1 of 3 failed: boom", at=100.0), member(2, "error", "peer closed", at=100.5)]
    verdict = gang.judge("lead", "rank 0 of 3 failed: connection closed", 100.2, members, silent_limit=2)
    assert verdict == gang.Verdict("fail", "rank 1 of 3 failed: boom (node 1 of 3, worker w1)")
    verdict = gang.judge("lead", "rank 0 of 3 failed: ValueError", 99.0, members, silent_limit=2)
    assert verdict.action == "fail" and verdict.error is not None and "(node 0 of 3, worker lead)" in verdict.error


def test_a_silent_member_loses_the_attempt_whatever_the_others_say() -> None:
    members = [member(1, None, silent=9.0), member(2, "error", "peer closed", at=1.0)]
    verdict = gang.judge("lead", "connection closed", 0.5, members, silent_limit=2)
    assert verdict.action == "lost"
    assert verdict.error is not None and "node 1 of the job's 3-worker gang (worker w1)" in verdict.error


def test_nothing_to_add_when_no_host_failed() -> None:
    assert gang.judge("lead", None, None, [member(1, "stopped")], silent_limit=2) == gang.Verdict()
    # a member still running (and heartbeating) is neither a culprit nor lost: the leader's own error stands
    verdict = gang.judge("lead", "overtime", None, [member(1, None)], silent_limit=2)
    assert verdict.action == "fail"


def test_failing_and_settled() -> None:
    assert gang.failing([member(1, "ok"), member(2, "error", "x")], 2) == member(2, "error", "x")
    assert gang.failing([member(1, None, silent=5)], 2) == member(1, None, silent=5)
    assert gang.failing([member(1, None)], 2) is None
    assert not gang.settled([member(1, None)], 2)
    assert gang.settled([member(1, "ok"), member(2, None, silent=3)], 2)


def test_rendezvous_address_and_nodes() -> None:
    host, _, port = gang.rendezvous_at("127.0.0.1").rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0
    assert requested_nodes({"resources": {"nodes": 3, "gpus": 2}}) == 3
    assert requested_nodes({}) == 1 and requested_nodes(None) == 1


@pytest.mark.anyio
async def test_a_lone_worker_fails_a_gang_it_cannot_form(tmp_path: Any) -> None:
    backend = MemoryBackend()
    started: list[FakeChild] = []
    settings = Settings(home=tmp_path, poll_seconds=0.05, heartbeat_seconds=0.05, gang_seconds=0.3, serving=False)
    daemon = Daemon(settings, backend, fake_launcher(backend, started), drain=True)
    job = backend.submit(resources={"procs": 1, "nodes": 2})
    with anyio.fail_after(10):
        await daemon.serve()
    assert backend.jobs[job].status == "failed"
    assert "needs 2 workers at once and 1 live worker" in (backend.jobs[job].error or "")
    assert not started, "no child starts for a gang that never formed"
