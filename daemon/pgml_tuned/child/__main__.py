"""The child process of one job attempt, started by the worker (worker/process.py):

    python -m pgml_tuned.child      (the job spec, its secrets, the DSN and the ticket arrive as JSON on stdin)

It opens its own connection (children never inherit one) with the children's login, which may only call the
pgml._child_* functions, each with the attempt's ticket (the worker stored only its hash): whatever code the
model runs, it can reach nothing in the database but this attempt's own job. It runs the task's recipe
(imported by name from the task registry), streams log events into pgml.logs as they happen and commits the
results in one fenced transaction. Its stdout is the event channel to the worker (events.py); exit codes are
states.ExitCode.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib
import json
import os
import shutil
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from .. import hub_access
from ..errors import Interrupted, JobError, LeaseLost
from ..states import ExitCode
from ..tasks import recipe_module
from . import dist
from .context import JobContext
from .events import Events


def die_with_parent() -> None:
    """Linux: get SIGKILL when the worker dies, so an orphan never trains on (its writes are fenced anyway)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() == 1:
        os._exit(ExitCode.LEASE_LOST)


def failure_message(e: Exception, spec: dict[str, Any]) -> str:
    """The error a job fails with when its recipe raised something other than a JobError: the exception, or,
    when it says the Hugging Face Hub was out of reach, which step needed the hub and what to do."""
    if hub_access.unreachable(e):
        training_args = (spec.get("hyperparams") or {}).get("training_args") or {}
        if training_args.get("push_to_hub") and not hub_access.hub_offline():
            endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
            return (
                f"training_args.push_to_hub: the worker cannot reach the Hugging Face Hub ({endpoint}) to push the "
                "model: give the worker network access, or leave push_to_hub out (the model is stored in "
                "pgml.files either way; `pgml-tuned download` fetches it)"
            )
        return hub_access.unreachable_message("reach the Hugging Face Hub")
    return f"{type(e).__name__}: {e}"


def hold_workdir() -> int | None:
    """A shared lock on the attempt's scratch directory (PGML_WORK_DIR, made by the worker) while this process
    lives: a daemon's start-up sweep (worker/scratch.py) never removes the directory of a running child."""
    work = os.environ.get("PGML_WORK_DIR")
    if not work:
        return None
    try:
        fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def take_environment(overrides: dict[str, str | None] | None) -> None:
    """A spare child (worker/process.py Spare) was started before its job: the attempt's own part of the environment
    (its work directory, GPUs, HOME) arrives with the payload, before anything of the job reads it."""
    for key, value in (overrides or {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    work = os.environ.get("PGML_WORK_DIR")
    if overrides and work:
        os.chdir(work)


def main() -> int:
    die_with_parent()
    # our stdout is the event channel; everything else that prints goes to stderr
    events = Events(os.fdopen(os.dup(1), "w", buffering=1))
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    stop_requested = False
    ctx: JobContext | None = None

    stop_signal = "SIGTERM"

    def on_stop(signum: int, frame: Any) -> None:
        # the worker forwards the signal that stopped its daemon (SIGTERM from systemd, SIGINT from a Ctrl-C)
        nonlocal stop_requested, stop_signal
        stop_requested, stop_signal = True, signal.Signals(signum).name
        if ctx is not None:
            ctx.stop_signal = stop_signal
            ctx.stop_requested = True

    signal.signal(signal.SIGTERM, on_stop)  # from the start: a rank joining its group takes seconds
    signal.signal(signal.SIGINT, on_stop)
    payload = json.loads(sys.stdin.read())
    take_environment(payload.get("env"))
    hold_workdir()
    spec, secrets = payload["spec"], payload.get("secrets") or {}
    if "rank" not in payload and dist.world_size(spec.get("hyperparams") or {}) > 1:
        # several ranks: this process starts and watches them (as torchrun would) and trains nothing itself
        return dist.launch(payload, events, Path(os.environ.get("PGML_WORK_DIR") or tempfile.gettempdir()))
    try:
        rank = dist.join(payload)
    except dist.RendezvousError as e:
        events.emit({"event": "error", "error": str(e)})
        return ExitCode.ERROR
    except Exception as e:
        events.emit({"event": "error", "error": f"could not join the job's other ranks: {type(e).__name__}: {e}"})
        return ExitCode.ERROR
    ctx = JobContext(spec, secrets, payload["dsn"], payload["ticket"], events, rank)
    ctx.stop_requested, ctx.stop_signal = stop_requested, stop_signal
    try:
        importlib.import_module(recipe_module(spec["task"])).run(ctx)
        return ExitCode.OK
    except Interrupted as e:
        try:
            ctx.info(str(e))  # "stopped by SIGINT at step 26 of 58": a row of pgml.logs, with any still buffered
        except LeaseLost:
            return ExitCode.LEASE_LOST
        return ExitCode.REQUEUE
    except LeaseLost as e:
        events.emit({"event": "lease_lost", "message": str(e)})
        return ExitCode.LEASE_LOST
    except JobError as e:
        events.emit({"event": "error", "error": str(e)})
        return ExitCode.ERROR
    except Exception as e:
        tb = traceback.format_exc()
        sys.stderr.write(tb)
        events.emit({"event": "error", "error": failure_message(e, spec), "traceback": tb[-4000:]})
        return ExitCode.ERROR
    finally:
        with contextlib.suppress(Exception):  # best effort; the worker records the outcome
            ctx.store.flush_logs(wait=False)
        shutil.rmtree(ctx.workdir, ignore_errors=True)
        dist.leave(rank)


if __name__ == "__main__":
    code = main()
    if os.environ.get("PGML_RANK"):
        # a rank of a multi-process job (dist.py): its results are committed and its events flushed; the
        # interpreter's teardown (torch, the process group's store) took seconds more, that the job waited for
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
