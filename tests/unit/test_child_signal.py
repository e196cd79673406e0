"""The worker signals its children (job, spare, serving) without reaping them: asyncio's child watcher reads their exit
codes, and a child that exited with its own verdict keeps it even when the worker signals it at that very moment.

CI saw the race once (tests/e2e/test_chaos.py, the 'committing' phase): a worker resumed from SIGSTOP, whose heartbeat
at once stopped its child that had exited meanwhile with ExitCode.LEASE_LOST (76), read 255. anyio's terminate/kill
go through subprocess.Popen.send_signal, which polls first and so reaps a child the watcher thread has not reaped
yet; the watcher then finds no child and reports 255. Here the watcher thread runs late on purpose (as it does
after a SIGCONT, or on a loaded machine), which makes the race certain instead of rare.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import anyio
import pytest

from pgml_tuned.worker.process import send_signal

pytestmark = pytest.mark.anyio


@pytest.fixture
def late_watcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio's watcher thread waits 0.5 s before its blocking waitpid (the loop thread's own calls are untouched)."""
    real = os.waitpid
    loop_thread = threading.get_ident()

    def waitpid(pid: int, options: int) -> Any:
        if threading.get_ident() != loop_thread and options == 0:
            time.sleep(0.5)
        return real(pid, options)

    monkeypatch.setattr(os, "waitpid", waitpid)


def exited(pid: int) -> bool:
    """True once `pid` has exited (looked at, not reaped)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def wait_until_exited(pid: int) -> None:
    """Blocks the event loop on purpose, so that nothing in it reaps the child meanwhile."""
    deadline = time.monotonic() + 10
    while not exited(pid):
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)


def wait_until_reaped(pid: int) -> None:
    """Blocks the event loop on purpose: the watcher thread reaps the child, the loop cannot hear of it yet."""
    deadline = time.monotonic() + 10
    while True:
        try:
            exited(pid)
        except ChildProcessError:
            return
        assert time.monotonic() < deadline, "the watcher did not reap the child"
        time.sleep(0.01)


async def test_a_child_that_exited_keeps_its_exit_code_when_it_is_signalled_before_it_is_reaped(
    late_watcher: None,
) -> None:
    process = await anyio.open_process([sys.executable, "-c", "raise SystemExit(76)"])
    wait_until_exited(process.pid)
    send_signal(process, signal.SIGTERM)
    send_signal(process, signal.SIGKILL)
    with anyio.fail_after(10):
        assert await process.wait() == 76  # anyio's process.terminate() here: 255
    send_signal(process, signal.SIGKILL)  # reaped and known: nothing to signal, no error
    await process.aclose()


async def test_a_running_child_gets_the_signal(late_watcher: None) -> None:
    process = await anyio.open_process([sys.executable, "-c", "import time; time.sleep(60)"])
    send_signal(process, signal.SIGTERM)
    with anyio.fail_after(10):
        assert await process.wait() == -signal.SIGTERM
    await process.aclose()


async def test_a_child_reaped_before_its_exit_code_reached_the_loop_is_not_signalled() -> None:
    """Between the watcher's reap and the loop reading the exit code, returncode is still None: the pid may already
    be free, so the check must see that the child is gone rather than signal whatever holds that pid now."""
    process = await anyio.open_process([sys.executable, "-c", "pass"])
    wait_until_reaped(process.pid)
    assert process.returncode is None
    send_signal(process, signal.SIGKILL)  # must not raise, must not kill anything
    with anyio.fail_after(10):
        assert await process.wait() == 0
    await process.aclose()
