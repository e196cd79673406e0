"""An in-memory queue (a Backend) and fake child processes, so unit tests drive the real daemon
(pgml_tuned.worker.daemon.Daemon) in milliseconds, without PostgreSQL or processes.

The jobs follow the same rules as the SQL: claims in id order, every write fenced on (id, attempt, running).
A fake child's behaviour comes from its job's hyperparams:

    seconds          how long it "trains" before it commits (succeeded, exit 0)
    fail             instead of committing: report this error and exit 1
    ignore_sigterm   keep going after SIGTERM (as a child busy loading a model does); otherwise it exits 75
    exit_code        exit with this code (and no error event) instead of committing
"""

from __future__ import annotations

import itertools
import math
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from pgml_tuned.states import Claim, ExitCode, Renewal, Status, requested_gpus
from pgml_tuned.worker.backend import Notice


@dataclass
class Job:
    id: int
    hyperparams: dict[str, Any]
    status: Status = Status.QUEUED
    attempt: int = 0
    cancel_requested: bool = False
    worker: str | None = None
    error: str | None = None
    history: list[str] = field(default_factory=list)
    gang_needed: int = 0


class MemoryBackend:
    def __init__(self, worker: str = "memory") -> None:
        self.worker = worker
        self.jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._send, self._receive = anyio.create_memory_object_stream[Notice](math.inf)
        self.running_now = 0
        self.most_running = 0
        self.renewals = 0
        self.lose_lease_of: set[int] = set()  # renewals of these jobs find them owned by someone else
        self.overtime: set[int] = set()  # renewals of these jobs find them past their max_runtime
        self.registry: dict[str, Any] = {}  # this worker's row of the fleet registry

    # ---- what tests do ----
    def submit(self, **hyperparams: Any) -> int:
        job = Job(next(self._ids), hyperparams)
        self.jobs[job.id] = job
        self._send.send_nowait(Notice("job_queued"))
        return job.id

    def request_cancel(self, job_id: int) -> None:
        self.jobs[job_id].cancel_requested = True
        self._send.send_nowait(Notice("cancel_requested"))

    def statuses(self) -> dict[int, str]:
        return {i: str(j.status) for i, j in self.jobs.items()}

    # ---- the Backend interface ----
    async def prepare(self) -> None:
        pass

    async def notices(self) -> AsyncIterator[Notice]:
        yield Notice("listening")
        async for notice in self._receive:
            yield notice

    async def claim(self, lease_seconds: float, free_gpus: int = 0) -> Claim | None:
        job = next(
            (
                j
                for j in self.jobs.values()
                if j.status == Status.QUEUED and not j.cancel_requested and requested_gpus(j.hyperparams) <= free_gpus
            ),
            None,
        )
        if job is None:
            return None
        job.status, job.attempt, job.worker = Status.RUNNING, job.attempt + 1, self.worker
        self._moved(job, "claimed")
        return Claim(
            id=job.id,
            attempt=job.attempt,
            project_id=1,
            project_name="p",
            model_id=job.id,
            task="noop",
            relation_schema=None,
            relation_table=None,
            model_name="none",
            test_size=0.25,
            test_sampling="random",
            hyperparams=job.hyperparams,
            secrets=None,
        )

    async def sweep_tables(self) -> int:
        return 0  # no tables in memory

    async def release_orphans(self, running: list[int]) -> list[int]:
        return []

    # a lone in-memory worker: a gang it leads never forms (nobody joins), and it joins none
    async def gang_open(self, claim: Claim, rendezvous: str, secret: str, nodes: int) -> bool:
        job = self.jobs[claim.id]
        job.gang_needed = nodes - 1 if self._owned(claim.id, claim.attempt) else 0
        return self._owned(claim.id, claim.attempt)

    async def gang_join(self, free_gpus: int) -> Claim | None:
        return None

    async def gang_state(self, job_id: int) -> dict[str, Any] | None:
        job = self.jobs[job_id]
        nodes = int((job.hyperparams.get("resources") or {}).get("nodes") or 1)
        return {
            "status": str(job.status),
            "attempt": job.attempt,
            "gang_needed": job.gang_needed,
            "cancel_requested": job.cancel_requested,
            "nodes": nodes,
        }

    async def gang_give_back(self, claim: Claim) -> bool:
        if not self._owned(claim.id, claim.attempt) or not self.jobs[claim.id].gang_needed:
            return False
        self.jobs[claim.id].status, self.jobs[claim.id].gang_needed = Status.QUEUED, 0
        self._moved(self.jobs[claim.id], "given back")
        return True

    async def gang_able(self, gpus: int) -> int:
        return 1 if self.registry else 0

    async def gang_set_ticket(self, claim: Claim, ticket_hash: bytes) -> bool:
        return False

    async def gang_member_beat(self, attempts: dict[int, int]) -> set[int]:
        return set()

    async def gang_member_end(
        self, claim: Claim, outcome: str, error: str | None = None, error_at: float | None = None
    ) -> None:
        pass

    async def gang_members(self, claim: Claim) -> list[dict[str, Any]]:
        return []

    async def gang_lost(self, claim: Claim, error: str) -> None:
        await self.fail(claim, error)

    async def renew(self, attempts: dict[int, int], lease_seconds: float) -> dict[int, Renewal]:
        self.renewals += 1
        for job_id in self.lose_lease_of & set(attempts):
            self.jobs[job_id].attempt += 1  # another worker took it over
        return {
            i: Renewal(self.jobs[i].cancel_requested, i in self.overtime)
            for i, a in attempts.items()
            if self._owned(i, a)
        }

    async def status(self, job_id: int, attempt: int) -> Status | None:
        job = self.jobs[job_id]
        return job.status if job.attempt == attempt else None

    async def set_child_ticket(self, claim: Claim, ticket_hash: bytes) -> bool:
        return self._owned(claim.id, claim.attempt)

    async def fail(self, claim: Claim, error: str) -> None:
        if self._owned(claim.id, claim.attempt):
            job = self.jobs[claim.id]
            job.status, job.error = Status.FAILED, error
            self._moved(job, "failed")

    async def cancel(self, claim: Claim, by: str) -> None:
        if self._owned(claim.id, claim.attempt):
            self.jobs[claim.id].status = Status.CANCELLED
            self._moved(self.jobs[claim.id], "cancelled")

    async def requeue(self, claim: Claim) -> None:
        if self._owned(claim.id, claim.attempt):
            self.jobs[claim.id].status = Status.QUEUED
            self._moved(self.jobs[claim.id], "requeued")

    async def reap(self) -> list[dict[str, Any]]:
        return []

    async def queue_empty(self, gpus: int = 0) -> bool:
        return not any(
            j.status == Status.QUEUED and not j.cancel_requested and requested_gpus(j.hyperparams) <= gpus
            for j in self.jobs.values()
        )

    async def idle_workers(self) -> tuple[int, int]:
        live = 1 if self.registry else 0
        return (live if self.registry.get("free_slots", 1) else 0), live

    async def register(self, info: dict[str, Any]) -> None:
        self.registry = {**info, "state": "live", "beats": 0}

    async def beat(self, state: dict[str, Any]) -> bool:
        self.registry.update(state, beats=self.registry["beats"] + 1)
        return True

    async def unregister(self) -> None:
        self.registry["state"] = "stopped"

    async def jobs_by_status(self) -> list[dict[str, Any]]:
        return [{"status": s, "jobs": sum(str(j.status) == s for j in self.jobs.values())} for s in Status]

    async def job_secrets(self, claim: Claim) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        pass

    # ---- what a child does to its job ----
    def commit(self, job_id: int, attempt: int) -> bool:
        if not self._owned(job_id, attempt):
            return False
        self.jobs[job_id].status = Status.SUCCEEDED
        self._moved(self.jobs[job_id], "succeeded")
        return True

    def _owned(self, job_id: int, attempt: int) -> bool:
        job = self.jobs[job_id]
        return job.attempt == attempt and job.status == Status.RUNNING

    def _moved(self, job: Job, what: str) -> None:
        job.history.append(what)
        self.running_now = sum(j.status == Status.RUNNING for j in self.jobs.values())
        self.most_running = max(self.most_running, self.running_now)


class FakeChild:
    """A child process that follows its job's hyperparams (see the module docstring)."""

    def __init__(self, backend: MemoryBackend, spec: dict[str, Any]) -> None:
        self.backend = backend
        self.spec = spec
        self.hp: dict[str, Any] = spec["hyperparams"]
        self.error: str | None = None
        self.lease_lost_reported = False
        self.signals: list[str] = []
        self.env: dict[str, str] = {}  # the environment the daemon gave it
        self._signalled = anyio.Event()
        self._killed = False

    async def run(self, on_event: Callable[[dict[str, Any]], None]) -> int:
        with anyio.move_on_after(float(self.hp.get("seconds", 0))):
            while True:
                await self._signalled.wait()
                self._signalled = anyio.Event()
                if self._killed:
                    return -9
                if not self.hp.get("ignore_sigterm"):
                    on_event({"event": "info", "message": "stopped by SIGTERM"})
                    return ExitCode.REQUEUE
        if self.hp.get("fail"):
            self.error = str(self.hp["fail"])
            on_event({"event": "error", "error": self.error})
            return ExitCode.ERROR
        if "exit_code" in self.hp:
            return int(self.hp["exit_code"])
        if not self.backend.commit(self.spec["id"], self.spec["attempt"]):
            self.lease_lost_reported = True
            return ExitCode.LEASE_LOST
        return ExitCode.OK

    def terminate(self, sig: signal.Signals = signal.SIGTERM) -> None:
        self.signals.append(sig.name)
        self._signalled.set()

    def kill(self) -> None:
        self.signals.append("SIGKILL")
        self._killed = True
        self._signalled.set()

    def describe_exit(self, rc: int) -> str:
        return self.error or f"the training process exited with code {rc}"


def fake_launcher(backend: MemoryBackend, started: list[FakeChild]) -> Callable[..., Any]:
    async def launch(payload: dict[str, Any], env: dict[str, str]) -> FakeChild:
        child = FakeChild(backend, payload["spec"])
        child.env = env
        started.append(child)
        return child

    return launch
