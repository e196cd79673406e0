"""Jobs with several ranks (hyperparams.resources: {"gpus": N} or {"procs": N}): the launcher and each rank's view.

The worker starts `python -m pgml_tuned.child` as for any job (same sandbox: minimal environment, child user, the
payload on stdin). When the job asks for more than one rank, that process becomes the launcher: it does what
`torchrun --standalone --nproc-per-node N` does — starts N copies of `python -m pgml_tuned.child` with RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set — but hands each rank the payload on its
stdin (torchrun gives its workers no stdin of their own, and the ticket and secrets never go on a command line, in
the environment or on disk). Rank 0's store listens on MASTER_ADDR alone (127.0.0.1 on one host), and only ranks
that prove the attempt's secret use it (rendezvous.py). The ranks run the recipe; the Trainer runs DDP (or FSDP /
DeepSpeed when training_args ask for them) over NCCL on GPUs, gloo on CPUs.

Rank 0 alone talks to the job's bookkeeping (log rows, checkpoints, files, the final commit, all fenced on the
attempt as for one process); its events are the launcher's. The ranks share one directory (`shared`): the
Trainer's output directory (every rank writes its part of a checkpoint there; rank 0 stores it after a barrier)
and the checkpoint a resumed job starts from (rank 0 downloads it, the others wait at a barrier).

The launcher watches its ranks: one that fails (its error event, or its exit) fails the job naming the rank, and the
others are killed at once — nothing of theirs is half written, every write being one fenced transaction of rank
0's. SIGTERM from the worker goes to every rank; they agree on the step to stop at (one all-reduce per step),
checkpoint together and exit with REQUEUE.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..states import ExitCode, requested_nodes
from . import rendezvous
from .events import Events

MAX_RANKS = 64  # as pgml._check_resources


def per_node(hyperparams: dict[str, Any]) -> int:
    """The ranks a job runs on each of its hosts (1 without resources)."""
    resources = hyperparams.get("resources") or {}
    return int(resources.get("gpus") or resources.get("procs") or 1)


def world_size(hyperparams: dict[str, Any]) -> int:
    """The number of ranks a job asks for, over all its hosts (1 without resources)."""
    return per_node(hyperparams) * requested_nodes(hyperparams)


def on_cpu(hyperparams: dict[str, Any]) -> bool:
    """Ranks asked for as processes (gloo on CPUs), not as GPUs."""
    resources = hyperparams.get("resources") or {}
    return "procs" in resources and "gpus" not in resources


@dataclass(frozen=True)
class Rank:
    """This process's place in its job: rank `rank` of `world_size`, sharing directory `shared` with the others."""

    rank: int = 0
    world_size: int = 1
    shared: Path | None = None
    local_rank: int = 0  # its place on its own host
    node: int = 0  # its host's place in the job's gang (0: the leader's, where rank 0 runs)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def local_main(self) -> bool:
        """The first rank on its host: the one that fetches what the host's ranks share (a resumed checkpoint)."""
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait until every rank is here (a no-op for one process)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on one of them (one all-reduce)."""
        if not self.distributed:
            return flag
        import torch
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0])  # a CPU tensor: gloo carries it (beside NCCL on GPUs)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def join(payload: dict[str, Any]) -> Rank:
    """In a rank started by the launcher: join the job's process group (NCCL on GPUs, gloo on CPUs) and return
    this rank; one process on its own: Rank()."""
    place = payload.get("rank")
    if not place:
        return Rank()
    import datetime as dt

    import torch
    import torch.distributed as dist

    me = Rank(
        int(place["rank"]),
        int(place["world_size"]),
        Path(place["shared"]),
        int(place.get("local_rank", place["rank"])),
        int(place.get("node") or 0),
    )
    gpu = not place.get("cpu") and torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(me.local_rank)
    # the Trainer (accelerate) uses this group as it is; ddp_timeout, if given, bounds a collective as there
    training_args = (payload["spec"].get("hyperparams") or {}).get("training_args") or {}
    timeout = dt.timedelta(seconds=int(training_args.get("ddp_timeout") or 1800))
    # NCCL for the GPUs' tensors, gloo beside it for CPU tensors (FSDP's full state dict gathers on the CPU)
    backend = "cuda:nccl,cpu:gloo" if gpu else "gloo"
    # rank 0 hosts the store at MASTER_ADDR:MASTER_PORT — 127.0.0.1 on one host, the leader's rendezvous address in a
    # gang — bound to that address alone; every rank proves the job's secret there before the group forms
    # (rendezvous.py). A gang's ranks wait at most rendezvous_seconds for all the others (a host whose ranks never
    # come fails the job, not after ddp_timeout).
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    wait = float(place.get("rendezvous_seconds") or timeout.total_seconds())
    try:
        raw = rendezvous.open_store(host, port, me.main, wait)
        store = rendezvous.handshake(raw, str(place["secret"]), me.rank, me.world_size)
    except rendezvous.HandshakeError as e:
        raise RendezvousError(f"the rendezvous at {host}:{port} was refused: {e}") from None
    except Exception as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'timed out'}"
        if place.get("rendezvous_seconds"):
            what = f"the job's {place.get('nodes')} hosts"
            cause = (
                "a host of the gang did not start its ranks (its worker stopped or was killed), or this host cannot "
                "reach the leader's address (set gang_address on the workers)"
            )
        else:
            what, cause = "the job's ranks", "a rank did not start, or another process took the port first"
        raise RendezvousError(
            f"the rendezvous of {what} at {host}:{port} did not complete in {wait:.0f} s ({why}): {cause}"
        ) from None
    raw.set_timeout(timeout)
    dist.init_process_group(backend, store=store, rank=me.rank, world_size=me.world_size, timeout=timeout)
    return me


class RendezvousError(Exception):
    """The ranks of a gang did not all arrive at the rendezvous in time."""


def leave(me: Rank) -> None:
    """Leave the process group (a rank that ends without it warns about a leak)."""
    if me.distributed:
        import torch.distributed as dist

        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _Proc:
    rank: int
    popen: subprocess.Popen[bytes]
    buffer: bytes = b""
    error: dict[str, Any] | None = None
    lease_lost: dict[str, Any] | None = None
    exit: int | None = None
    reported_at: float = 0.0  # when its error (or lease_lost) event arrived: the first to fail is the culprit
    reported_wall: float = 0.0  # the same, as wall-clock time (a gang's hosts compare their first failures)


def launch(payload: dict[str, Any], events: Events, workdir: Path) -> int:
    """Run this host's ranks of the job (as torchrun would: --standalone on one host; in a gang, payload["gang"]
    gives this host's node number and the leader's rendezvous address) and return the exit code
    (states.ExitCode)."""
    spec = payload["spec"]
    hyperparams = spec.get("hyperparams") or {}
    n, local = world_size(hyperparams), per_node(hyperparams)
    gang = payload.get("gang") or {}
    node = int(gang.get("node") or 0)
    shared = Path(tempfile.mkdtemp(prefix=f"job{spec['id']}-a{spec['attempt']}-ranks-", dir=workdir))
    if gang:
        addr, _, port_text = str(gang["rendezvous"]).rpartition(":")
        port, secret = int(port_text), str(gang["secret"])  # the leader worker's, the same on every host
    else:
        addr, port, secret = "127.0.0.1", free_port(), rendezvous.new_secret()
    procs: list[_Proc] = []
    stopping = False

    def on_stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:  # the signal the worker forwarded (SIGTERM, or SIGINT after a Ctrl-C): the ranks name it
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.popen.send_signal(signum)

    signal.signal(signal.SIGTERM, on_stop)  # (set by main before anything else; now the launcher's)
    signal.signal(signal.SIGINT, on_stop)
    what = f"{n} ranks"
    if gang:
        what = f"{local} of {n} ranks on node {node} of {requested_nodes(hyperparams)} (rendezvous {addr}:{port})"
    events.info(f"starting {what}", world_size=n, backend="gloo" if on_cpu(hyperparams) else "nccl/gloo")
    loopback = rendezvous.loopback_interface()
    try:
        for lr in range(local):
            r = node * local + lr
            env = {
                **os.environ,
                "PGML_RANK": str(r),
                "RANK": str(r),
                "LOCAL_RANK": str(lr),
                "WORLD_SIZE": str(n),
                "LOCAL_WORLD_SIZE": str(local),
                "GROUP_RANK": str(node),
                "MASTER_ADDR": addr,
                "MASTER_PORT": str(port),
            }
            if not gang:  # one host: the ranks' own connections (gloo's, NCCL's bootstrap) stay on loopback too
                env.setdefault("GLOO_SOCKET_IFNAME", loopback)
                env.setdefault("NCCL_SOCKET_IFNAME", loopback)
            if on_cpu(hyperparams):
                env["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks: no rank grabs a GPU
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // local)))
            popen = subprocess.Popen(
                [sys.executable, "-m", "pgml_tuned.child"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                cwd=os.getcwd(),
            )
            procs.append(_Proc(r, popen))
            place = {
                "rank": r,
                "world_size": n,
                "shared": str(shared),
                "cpu": on_cpu(hyperparams),
                "local_rank": lr,
                "node": node,
                "secret": secret,  # on stdin only (rendezvous.py)
            }
            if gang:
                place.update(rendezvous_seconds=float(gang["rendezvous_seconds"]), nodes=requested_nodes(hyperparams))
            assert popen.stdin is not None
            popen.stdin.write(json.dumps({**payload, "rank": place}, default=str).encode())
            popen.stdin.close()
        return _watch(procs, events, lambda: stopping, n)
    finally:
        _stop(procs)  # none outlives the launcher
        shutil.rmtree(shared, ignore_errors=True)


def _watch(procs: list[_Proc], events: Events, stopping: Any, n: int) -> int:
    """Forward the events of rank 0 (of this host's first rank, on a gang's other hosts); return the job's exit
    code once every rank here has exited, or at the first failure (the others are then killed). `n`: the job's
    world size."""
    sel = selectors.DefaultSelector()
    for p in procs:
        assert p.popen.stdout is not None
        os.set_blocking(p.popen.stdout.fileno(), False)
        sel.register(p.popen.stdout, selectors.EVENT_READ, p)
    first_failure: _Proc | None = None
    while True:
        for key, _ in sel.select(timeout=0.2):
            p = key.data
            stream: IO[bytes] = key.fileobj  # type: ignore[assignment]
            chunk = stream.read()
            if chunk:
                _events_of(p, chunk, events, procs[0])
            elif chunk == b"":
                sel.unregister(stream)
        for p in procs:
            if p.exit is None and p.popen.poll() is not None and not _still_readable(sel, p):
                p.exit = p.popen.returncode
                if p.exit != ExitCode.OK and first_failure is None:
                    first_failure = p
        failed = sorted((p for p in procs if p.error or p.lease_lost), key=lambda p: p.reported_at)
        if failed or (first_failure is not None and not stopping()):
            # a rank that failed: the others would wait for it forever
            return _fail(procs, failed[0] if failed else first_failure, events, n)  # type: ignore[arg-type]
        if first_failure is not None and first_failure.exit != ExitCode.REQUEUE:
            # stopping, and a rank died of the signal before it could heed it (still starting): no rank can
            # checkpoint without it; the job goes back to the queue from its last stored checkpoint
            _stop(procs)
            return ExitCode.REQUEUE
        if procs[0].rank == 0 and procs[0].exit == ExitCode.OK and not failed:
            # rank 0 committed the job (or had nothing to do): what the others do from here changes nothing
            _stop(procs)
            return ExitCode.OK
        if all(p.exit is not None for p in procs):
            return ExitCode.REQUEUE if any(p.exit == ExitCode.REQUEUE for p in procs) else ExitCode.OK


def _still_readable(sel: selectors.BaseSelector, p: _Proc) -> bool:
    assert p.popen.stdout is not None
    try:
        sel.get_key(p.popen.stdout)
    except KeyError:
        return False
    return True


def _events_of(p: _Proc, chunk: bytes, events: Events, first: _Proc) -> None:
    p.buffer += chunk
    *lines, p.buffer = p.buffer.split(b"\n")
    for raw in lines:
        line = raw.decode(errors="replace").strip()
        if not line:
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            sys.stderr.write(f"[rank {p.rank}] {line}\n")
            continue
        kind = event.get("event")
        if kind in ("error", "lease_lost") and not (p.error or p.lease_lost):
            p.reported_at, p.reported_wall = time.monotonic(), time.time()
            if kind == "error":
                p.error = event
            else:
                p.lease_lost = event
        elif p is first:
            events.emit(event)


def _stop(procs: list[_Proc]) -> None:
    """Kill every rank still running (SIGKILL: a rank stuck in a collective would not heed SIGTERM)."""
    for p in procs:
        if p.popen.poll() is None:
            p.popen.kill()
    for p in procs:
        p.popen.wait()


def _fail(procs: list[_Proc], culprit: _Proc, events: Events, n: int) -> int:
    _stop(procs)
    if culprit.lease_lost:
        events.emit(culprit.lease_lost)
        return ExitCode.LEASE_LOST
    if culprit.error:
        error = {**culprit.error, "error": f"rank {culprit.rank} of {n} failed: {culprit.error.get('error')}"}
    else:
        rc = culprit.popen.returncode
        how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with code {rc}"
        error = {"event": "error", "error": f"rank {culprit.rank} of {n} {how}; the other ranks were stopped"}
    # when it failed (a gang's leader compares its hosts' first failures: the earliest is the culprit)
    error["at"] = culprit.reported_wall or time.time()
    events.emit(error)
    return ExitCode.ERROR
