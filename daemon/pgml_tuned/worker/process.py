"""The handle of a job's child process: start it, forward its events, signal it, describe how it ended.

The child gets the job spec and its (unsealed) secrets on stdin — never on its command line or in its
environment — and the DSN in PGML_DSN. It runs in its own session, so a Ctrl-C in the worker's terminal
reaches it only through the worker; it dies with the worker (PR_SET_PDEATHSIG). Why the worker stops a child
is the Attempt's business (attempt.py); this module only sends the signals.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

from .. import logconfig

log = logconfig.get("pgml_tuned.worker.process")

STDERR_TAIL = 40


class ChildProcess:
    """One running child process (`python -m pgml_tuned.child`)."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.error: str | None = None  # the message of the child's error event
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL)
        self.lease_lost_reported = False

    @classmethod
    async def start(cls, payload: dict[str, Any], env: dict[str, str]) -> ChildProcess:
        process = await anyio.open_process([sys.executable, "-m", "pgml_tuned.child"], env=env, start_new_session=True)
        child = cls(process)
        assert process.stdin is not None
        with anyio.CancelScope(shield=True):
            await process.stdin.send(json.dumps(payload, default=str).encode())
            await process.stdin.aclose()
        return child

    async def run(self, on_event: Callable[[dict[str, Any]], None]) -> int:
        """Forward the child's events and stderr until it exits; return its exit code (-N: signal N)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._read_events, on_event)
            tg.start_soon(self._read_stderr)
        return await self.process.wait()

    async def _read_events(self, on_event: Callable[[dict[str, Any]], None]) -> None:
        assert self.process.stdout is not None
        async for line in _lines(self.process.stdout):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                self.stderr_tail.append(line)
                continue
            if event.get("event") == "error":
                self.error = event.get("error")
            elif event.get("event") == "lease_lost":
                self.lease_lost_reported = True
            on_event(event)

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        async for line in _lines(self.process.stderr):
            self.stderr_tail.append(line)
            log.debug("child.stderr", line=line)

    def signal(self, sig: signal.Signals) -> None:
        if self.process.returncode is None:
            try:
                self.process.send_signal(sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        """Ask it to stop: it checkpoints what it can and exits with ExitCode.REQUEUE."""
        self.signal(signal.SIGTERM)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def describe_exit(self, rc: int) -> str:
        """A readable error for an exit that was not a clean result."""
        tail = "\n".join(self.stderr_tail).strip()
        if rc < 0:
            name = signal.Signals(-rc).name
            why = " (the kernel's OOM killer, or an operator)" if -rc == signal.SIGKILL else ""
            msg = f"the training process was killed by {name}{why}"
        else:
            msg = self.error or f"the training process exited with code {rc}"
        if tail and not self.error:
            msg += f"; its last output:\n{tail[-2000:]}"
        return msg


async def _lines(stream: Any) -> Any:
    buffer = ""
    async for chunk in TextReceiveStream(stream, errors="replace"):
        buffer += chunk
        *complete, buffer = buffer.split("\n")
        for line in complete:
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


def child_env(dsn: str, work_dir: str, gpu: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PGML_DSN=dsn, PGML_WORK_DIR=work_dir, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env
