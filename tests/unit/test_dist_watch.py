"""The launcher's watch over its ranks (child/dist.py), with small real processes standing in for ranks: rank 0's
events pass through, the first rank to fail fails the job naming it and the others are killed, rank 0's clean
exit ends the job, and ranks stopped by SIGTERM requeue it."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import pytest

from pgml_tuned.child.dist import _Proc, _watch, on_cpu, world_size
from pgml_tuned.child.events import Events
from pgml_tuned.states import ExitCode


def rank(r: int, code: str) -> _Proc:
    """A process that runs `code` (with `emit(event)` writing an event line to stdout)."""
    prelude = "import json, os, signal, sys, time\ndef emit(e): print(json.dumps(e), flush=True)\n"
    return _Proc(r, subprocess.Popen([sys.executable, "-c", prelude + code], stdout=subprocess.PIPE))


def watch(procs: list[_Proc], stopping: bool = False) -> tuple[int, list[dict[str, object]], float]:
    out = io.StringIO()
    t0 = time.monotonic()
    code = _watch(procs, Events(out), lambda: stopping, len(procs))
    for p in procs:
        p.popen.wait(5)
    return code, [json.loads(line) for line in out.getvalue().splitlines()], time.monotonic() - t0


def test_rank_zeros_events_pass_and_its_clean_exit_ends_the_job() -> None:
    code, events, seconds = watch(
        [
            rank(0, "emit({'event': 'log', 'logs': {'step': 1}})"),
            rank(1, "emit({'event': 'log', 'logs': {'step': 1}}); time.sleep(60)"),
        ]
    )
    assert code == ExitCode.OK and events == [{"event": "log", "logs": {"step": 1}}]  # rank 1's log is not passed
    assert seconds < 10, "rank 1 was waited for"


def test_the_first_rank_to_fail_fails_the_job_and_the_others_are_killed() -> None:
    procs = [
        rank(0, "time.sleep(0.5); emit({'event': 'error', 'error': 'ConnectionError: peer gone'}); sys.exit(1)"),
        rank(1, "emit({'event': 'error', 'error': 'RuntimeError: boom'}); sys.exit(1)"),
        rank(2, "time.sleep(60)"),
    ]
    code, events, seconds = watch(procs)
    assert code == ExitCode.ERROR and seconds < 10
    assert [e["error"] for e in events] == ["rank 1 of 3 failed: RuntimeError: boom"]
    assert procs[2].popen.returncode == -9


def test_a_rank_that_dies_without_a_word_is_named() -> None:
    code, events, _ = watch([rank(0, "time.sleep(60)"), rank(1, "os.kill(os.getpid(), signal.SIGKILL)")])
    assert code == ExitCode.ERROR
    assert events[-1]["error"] == "rank 1 of 2 was killed by SIGKILL; the other ranks were stopped"


def test_ranks_stopped_by_sigterm_requeue_the_job() -> None:
    code, events, _ = watch(
        [rank(0, "time.sleep(0.3); sys.exit(75)"), rank(1, "sys.exit(75)")],
        stopping=True,
    )
    assert code == ExitCode.REQUEUE and events == []


def test_a_lost_lease_is_reported_as_such() -> None:
    code, events, _ = watch(
        [rank(0, "emit({'event': 'lease_lost', 'message': 'gone'}); sys.exit(3)"), rank(1, "time.sleep(60)")]
    )
    assert code == ExitCode.LEASE_LOST and events == [{"event": "lease_lost", "message": "gone"}]


@pytest.mark.parametrize(
    ("hyperparams", "size", "cpu"),
    [({}, 1, False), ({"resources": {"gpus": 4}}, 4, False), ({"resources": {"procs": 2, "nodes": 1}}, 2, True)],
)
def test_world_size(hyperparams: dict[str, object], size: int, cpu: bool) -> None:
    assert world_size(hyperparams) == size and on_cpu(hyperparams) == cpu
