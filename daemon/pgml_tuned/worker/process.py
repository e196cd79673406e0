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

import contextlib
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

from .. import logconfig, model_refs
from .scratch import AttemptDir

log = logconfig.get("pgml_tuned.worker.process")

STDERR_TAIL = 40


def send_signal(process: Process, sig: Signals) -> None:
    """Signal `process` unless it has exited, without reaping it.

    asyncio's child watcher, a thread per child blocked in waitpid(), reaps our children and reads their exit codes.
    anyio's send_signal, terminate and kill call subprocess.Popen.send_signal, which first polls the child with a
    waitpid() of its own: a child that has exited and that the watcher has not reaped yet is reaped there, and the
    watcher then reports 255 for it ("Unknown child process pid"), not its exit code. That happens where the watcher
    thread runs late: a worker resumed from a pause (SIGSTOP, a frozen VM) whose heartbeat at once stops a child that
    exited meanwhile with its own verdict (ExitCode.LEASE_LOST at a fenced commit), or a loaded machine. So this
    looks without reaping (waitid WNOWAIT) and leaves an exited child to the watcher; a running one gets the signal,
    the check-then-kill that Popen itself does (its pid cannot be another process's until it is reaped)."""
    if process.returncode is not None:
        return
    if not hasattr(os, "waitid"):  # macOS before Python 3.13: Popen's own check, with its race
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        return
    try:
        exited = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return  # reaped by the watcher: its exit code is on its way to process.returncode
    if exited is not None:
        return  # exited, not reaped yet: the watcher reads its exit code
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, sig)


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


# What differs between one attempt's child environment and another's: given to a spare child with its payload
# (None: unset), applied before it reads anything of its job.
PER_ATTEMPT = ("PGML_WORK_DIR", "CUDA_VISIBLE_DEVICES", "HOME", "USER", "LOGNAME")


class Spare:
    """One child process started ahead of its job: Python up and the child's modules imported (~0.4 s of a no-op
    job's start, bench/pickup.py), blocked reading its payload. It is started with the environment the daemon's
    children share (in the scratch root, as the child user) and told its attempt's own part — the work directory,
    its GPUs, HOME — in its payload (the child applies it before anything else). The next job takes it if its
    environment matches, and a new spare is started at once for the one after; else the job's child starts fresh."""

    def __init__(self, user: ChildUser | None = None) -> None:
        self.user = user
        self.process: Process | None = None
        self.base: dict[str, str] = {}  # its environment, PER_ATTEMPT keys left out
        self.stale: list[Process] = []  # spares that did not fit, killed, to be reaped

    @staticmethod
    def base_of(env: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in env.items() if k not in PER_ATTEMPT}

    def take(self, env: dict[str, str]) -> tuple[Process, dict[str, str | None]] | None:
        """The waiting spare and the environment overrides that make it `env`'s child; None when there is none
        that fits (none started, it died, another environment)."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.returncode is not None or self.base != self.base_of(env):
            self.stale.append(process)  # killed and reaped by the next refill (or close)
            send_signal(process, signal.SIGKILL)
            return None
        return process, {k: env.get(k) for k in PER_ATTEMPT}

    async def refill(self, env: dict[str, str], root: Path) -> None:
        """Start the spare for the next job like `env` (its per-attempt part left for the payload), in `root`."""
        while self.stale:
            await _discard(self.stale.pop())
        if self.process is not None:
            return
        base = self.base_of(env)
        spare_env = {**base, "PGML_WORK_DIR": str(root)}
        kwargs: dict[str, Any] = {"cwd": root}
        if self.user is not None:
            spare_env.update(HOME=str(root), USER=self.user.name, LOGNAME=self.user.name)
            kwargs.update(self.user.process_args())
        try:
            self.process = await anyio.open_process(
                [sys.executable, "-m", "pgml_tuned.child"], env=spare_env, start_new_session=True, **kwargs
            )
        except OSError as e:
            log.warning("child.spare_failed", error=str(e))
            return
        self.base = base

    async def close(self) -> None:
        process, self.process = self.process, None
        for p in [*self.stale, *([process] if process is not None else [])]:
            await _discard(p)
        self.stale.clear()


async def _send(process: Process, payload: dict[str, Any]) -> bool:
    """The payload on the child's stdin, which is then closed; False when the child is gone."""
    assert process.stdin is not None
    with anyio.CancelScope(shield=True):
        try:
            await process.stdin.send(json.dumps(payload, default=str).encode())
            await process.stdin.aclose()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return False
    return True


async def _discard(process: Process) -> None:
    with anyio.CancelScope(shield=True):
        send_signal(process, signal.SIGKILL)
        await process.wait()
        await process.aclose()


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
        cls,
        payload: dict[str, Any],
        env: dict[str, str],
        *,
        user: ChildUser | None = None,
        spare: Spare | None = None,
    ) -> ChildProcess:
        """Start the child of the attempt in `payload` in a scratch directory of its own (scratch.AttemptDir,
        under env's PGML_WORK_DIR), removed when it exits (run()). With `spare`: hand the job to the spare child if
        it fits, and start the spare for the next job."""
        spec = payload["spec"]
        owner = (user.uid, user.gid) if user is not None else None
        root = Path(env["PGML_WORK_DIR"])
        workdir = await anyio.to_thread.run_sync(AttemptDir.create, root, int(spec["id"]), int(spec["attempt"]), owner)
        env = {**env, "PGML_WORK_DIR": str(workdir.path)}
        kwargs: dict[str, Any] = {"cwd": workdir.path}
        if user is not None:
            env = {**env, "HOME": str(workdir.path), "USER": user.name, "LOGNAME": user.name}
            kwargs.update(user.process_args())
        taken = spare.take(env) if spare is not None else None
        try:
            process = None
            if taken is not None:
                process = taken[0]
                if not await _send(process, {**payload, "env": taken[1]}):
                    log.warning("child.spare_gone", job_id=spec["id"], note="starting a fresh child")
                    await _discard(process)
                    process = None
            if process is None:
                process = await anyio.open_process(
                    [sys.executable, "-m", "pgml_tuned.child"], env=env, start_new_session=True, **kwargs
                )
                await _send(process, payload)
        except BaseException:
            await anyio.to_thread.run_sync(workdir.remove)
            raise
        child = cls(process, workdir)
        if spare is not None:
            await spare.refill(env, root)
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
        send_signal(self.process, sig)

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
    work_dir: str,
    gpu: str | None,
    parent: dict[str, str] | None = None,
    datasets_dir: str | None = None,
    model_dirs: list[Path] | None = None,
    state_dirs: list[Path] | None = None,
) -> dict[str, str]:
    """The whole environment of a child: an allow-list of the worker's, and its own settings (the only directory
    of local files pgml.load_dataset may read: PGML_DATASETS_DIR; the directories models may be loaded from,
    PGML_MODEL_DIRS, and the worker's own state they may never be, PGML_STATE_IDS: by identity, so that a child learns
    no path of the worker's keyring or credentials; never inherited)."""
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
    env["PGML_MODEL_DIRS"] = os.pathsep.join(str(d) for d in model_dirs or [])
    env["PGML_STATE_IDS"] = model_refs.identities(state_dirs or [])
    return env
