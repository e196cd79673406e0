"""The handle of a job's child process: start it, forward its events, signal it, describe how it ended.

The child gets the job spec, its (unsealed) secrets and the DSN on stdin — never on its command line or in
its environment, which is an allow-list of the worker's (child_env) without any credential. It runs in its own
session, so a Ctrl-C in the worker's terminal reaches it only through the worker; it dies with the worker
(PR_SET_PDEATHSIG). Why the worker stops a child is the Attempt's business (attempt.py); this module only
sends the signals.
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
        async for line in lines(self.process.stdout):
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
        async for line in lines(self.process.stderr):
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


MAX_LINE = 64 * 1024  # a child's output line longer than this is cut (a line never grows the worker's memory)


async def lines(stream: Any) -> Any:
    """The non-blank lines of a byte stream, each cut to MAX_LINE characters (the rest of a longer line is
    dropped as it arrives: the worker's memory never grows with a child's output)."""
    buffer = ""
    skipping = False  # inside the rest of a line that was cut
    async for chunk in TextReceiveStream(stream, errors="replace"):
        buffer += chunk
        *complete, buffer = buffer.split("\n")
        for line in complete:
            if skipping:
                skipping = False
            elif line.strip():
                yield line[:MAX_LINE]
        if len(buffer) > MAX_LINE:
            if not skipping:
                yield buffer[:MAX_LINE] + " [cut]"
            skipping, buffer = True, ""
    if buffer.strip() and not skipping:
        yield buffer[:MAX_LINE]


# What a child inherits of the worker's environment: what Python, torch, CUDA and the Hugging Face libraries need to
# find their files, devices and network. Never credentials: no DSN or password (the DSN travels on stdin), no
# cloud keys, no hub token (a job's own token travels on stdin), not the worker's key file.
INHERITED = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "PYTHONPATH",
        "PYTHONHASHSEED",
        "VIRTUAL_ENV",
        "LD_LIBRARY_PATH",
        "XDG_CACHE_HOME",
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_HUB_OFFLINE",
        "HF_DATASETS_CACHE",
        "HF_DATASETS_OFFLINE",
        "HF_ENDPOINT",
        "TRANSFORMERS_OFFLINE",
        "TORCH_HOME",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "PGML_DB_RETRY_SECONDS",
    }
)
INHERITED_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "NCCL_", "PYTORCH_", "OMP_", "MKL_")


def child_env(
    work_dir: str, gpu: str | None, parent: dict[str, str] | None = None, datasets_dir: str | None = None
) -> dict[str, str]:
    """The whole environment of a child: an allow-list of the worker's, and its own settings (the only directory
    of local files pgml.load_dataset may read: PGML_DATASETS_DIR, never inherited)."""
    parent = dict(os.environ) if parent is None else parent
    env = {k: v for k, v in parent.items() if k in INHERITED or k.startswith(INHERITED_PREFIXES)}
    env.update(
        PGML_WORK_DIR=work_dir,
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_DISABLE_IMPLICIT_TOKEN="1",  # only the job's own token, never the worker's hub login
    )
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if datasets_dir:
        env["PGML_DATASETS_DIR"] = datasets_dir
    return env
