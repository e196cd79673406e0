"""The handle of a job's child process: start it, forward its events, signal it, describe how it ended.

The child gets the job spec, its (unsealed) secrets and the DSN on stdin — never on its command line or in
its environment, which is an allow-list of the worker's (child_env) without any credential. With a child user
(settings.child_user, the daemon running as root) it runs as that uid and gid, without supplementary groups, in a
work directory of its own: it cannot read the worker's key or anything else that is only the daemon's
(check_child_user proves it at startup). It runs in its own session, so a Ctrl-C in the worker's terminal
reaches it only through the worker; it dies with the worker (PR_SET_PDEATHSIG). Why the worker stops a child is
the Attempt's business (attempt.py); this module only sends the signals.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from signal import Signals
from typing import Any

import anyio
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

from .. import logconfig
from .scratch import AttemptDir

log = logconfig.get("pgml_tuned.worker.process")

STDERR_TAIL = 40


@dataclass(frozen=True)
class ChildUser:
    """The system user children run as (settings.child_user)."""

    name: str
    uid: int
    gid: int

    @classmethod
    def lookup(cls, name: str) -> ChildUser:
        """The user named `name`; ValueError naming the fix when the daemon cannot run children as it."""
        if os.geteuid() != 0:
            raise ValueError(
                f"child_user {name!r}: only a daemon running as root can start children as another user (this one "
                f"runs as uid {os.geteuid()}); run it as root (systemd: User=root with the unit's hardening), or "
                "leave PGML_CHILD_USER / --child-user unset"
            )
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise ValueError(
                f"child_user {name!r}: no such system user; create it (useradd --system --no-create-home "
                f"--shell /usr/sbin/nologin {name}) or leave PGML_CHILD_USER / --child-user unset"
            ) from None
        if entry.pw_uid == 0:
            raise ValueError(f"child_user {name!r} is root (uid 0): name an unprivileged system user")
        return cls(name, entry.pw_uid, entry.pw_gid)

    def process_args(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


# Run as the child user at startup: can it reach the work directory, and is every secret file closed to it?
_PROBE = """
import json, os, sys
work, *secrets = sys.argv[1:]
out = {"work": os.access(work, os.X_OK), "readable": []}
for path in secrets:
    try:
        open(path, "rb").close()
        out["readable"].append(path)
    except OSError:
        pass
print(json.dumps(out))
"""


async def check_child_user(user: ChildUser, work_dir: Path, secret_files: list[Path]) -> None:
    """Prove, as `user`, that children can start (Python, the package), reach `work_dir`, and read none of
    `secret_files` (the worker key); ValueError naming the fix otherwise."""
    existing = [str(p) for p in secret_files if p.exists()]
    try:
        result = await anyio.run_process(
            [sys.executable, "-c", _PROBE, str(work_dir), *existing],
            check=False,
            env=child_env(str(work_dir), None),
            cwd="/",
            **user.process_args(),
        )
    except OSError as e:
        raise ValueError(f"child_user {user.name!r}: cannot start {sys.executable} as that user: {e}") from e
    if result.returncode != 0:
        raise ValueError(
            f"child_user {user.name!r}: Python ({sys.executable}) does not run as that user: "
            f"{result.stderr.decode(errors='replace').strip()[-500:]} — install pgml-tuned where it can read it "
            "(not under a private home directory)"
        )
    found = json.loads(result.stdout)
    if not found["work"]:
        raise ValueError(
            f"child_user {user.name!r} cannot reach the work directory {work_dir}: make every directory above it "
            "traversable (chmod o+x), or set PGML_WORK_DIR to one that is"
        )
    if found["readable"]:
        raise ValueError(
            f"child_user {user.name!r} can read {', '.join(found['readable'])}: the worker's secrets must be readable "
            "by the daemon's user only (chown root, chmod 600)"
        )


class ChildProcess:
    """One running child process (`python -m pgml_tuned.child`)."""

    def __init__(self, process: Process, workdir: AttemptDir | None = None) -> None:
        self.process = process
        self.workdir = workdir  # the attempt's scratch directory, removed when the child has exited
        self.error: str | None = None  # the message of the child's error event
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL)
        self.lease_lost_reported = False

    @classmethod
    async def start(
        cls, payload: dict[str, Any], env: dict[str, str], *, user: ChildUser | None = None
    ) -> ChildProcess:
        """Start the child of the attempt in `payload` in a scratch directory of its own (scratch.AttemptDir,
        under env's PGML_WORK_DIR), removed when it exits (run())."""
        spec = payload["spec"]
        owner = (user.uid, user.gid) if user is not None else None
        workdir = await anyio.to_thread.run_sync(
            AttemptDir.create, Path(env["PGML_WORK_DIR"]), int(spec["id"]), int(spec["attempt"]), owner
        )
        env = {**env, "PGML_WORK_DIR": str(workdir.path)}
        kwargs: dict[str, Any] = {"cwd": workdir.path}
        if user is not None:
            env = {**env, "HOME": str(workdir.path), "USER": user.name, "LOGNAME": user.name}
            kwargs.update(user.process_args())
        try:
            process = await anyio.open_process(
                [sys.executable, "-m", "pgml_tuned.child"], env=env, start_new_session=True, **kwargs
            )
        except BaseException:
            await anyio.to_thread.run_sync(workdir.remove)
            raise
        child = cls(process, workdir)
        assert process.stdin is not None
        with anyio.CancelScope(shield=True):
            await process.stdin.send(json.dumps(payload, default=str).encode())
            await process.stdin.aclose()
        return child

    async def run(self, on_event: Callable[[dict[str, Any]], None]) -> int:
        """Forward the child's events and stderr until it exits; return its exit code (-N: signal N). However it
        ended, its scratch directory is removed."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read_events, on_event)
                tg.start_soon(self._read_stderr)
            return await self.process.wait()
        finally:
            if self.workdir is not None:
                with anyio.CancelScope(shield=True):
                    if self.process.returncode is None:  # cancelled while it runs: it must not outlive its files
                        self.kill()
                        await self.process.wait()
                    await anyio.to_thread.run_sync(self.workdir.remove)

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

    def terminate(self, sig: Signals = Signals.SIGTERM) -> None:
        """Ask it to stop (SIGTERM, or the SIGINT the daemon got: the child names it in the job's logs): it
        checkpoints what it can and exits with ExitCode.REQUEUE."""
        self.signal(sig)

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
