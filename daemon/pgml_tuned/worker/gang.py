"""Jobs across several workers: hyperparams.resources.nodes = N runs the job's ranks on N workers at once, a gang.

leader (node 0)     claims the job as any job (claim_job), records the rendezvous address of its attempt — host
                    (settings.gang_address) and a free port, where its rank 0 hosts torch.distributed's store,
                    bound to that address alone — and the attempt's rendezvous secret (pgml.gang_secrets, read by
                    the workers' login only: every rank proves it there, child/rendezvous.py), and opens the gang
                    (gang_open: jobs.gang_needed = N - 1, NOTIFY gang_forming).
members (1..N-1)    idle workers join it (gang_join, before they claim: one statement takes the next node
                    number, FOR UPDATE SKIP LOCKED; each join NOTIFYs again while members are missing), each with
                    a child ticket of its own that only reads (the job's rows, the models its submitter may start
                    from, its stored checkpoints: pgml._child_reader, 0027_gangs).
formed              when gang_needed is 0 every member starts its launcher (child/dist.py) with its node number:
                    ranks node * per_node .. + per_node - 1 of nodes * per_node, meeting at the rendezvous within
                    gang_seconds. The leader's rank 0 alone writes the job's logs, checkpoints, files and final
                    commit, fenced on the attempt as on one host; every rank reads the same stored rows.
not formed          the leader gives the job back untouched after gang_seconds (queued again, nothing counted
                    against max_attempts) — or fails it when fewer live workers are registered than it needs
                    (waiting could not help). A member being stopped while the gang forms gives it back too.
the end             each member reports how its ranks ended on its row (ok, error with when its launcher saw the
                    first failure, stopped); the leader alone settles the job (judge below): the earliest failure
                    on any host is the job's error; a member whose worker died (silent, no report) loses the
                    attempt for the whole gang as a dead worker does (requeued, failed after max_attempts).
watching            every heartbeat, a member stops its ranks when the job no longer runs its attempt, and the
                    leader stops its own when a member failed or went silent: no rank waits on a dead one.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass
from secrets import token_hex
from typing import Any

from ..config import Settings
from ..states import Claim, requested_nodes

POLL_SECONDS = 0.1  # how often the leader and the members look at a forming gang


def default_address() -> str:
    """This host's address as the other workers should reach it: its name resolved, else loopback."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def new_secret() -> str:
    """A gang attempt's rendezvous secret (child/rendezvous.py makes a one-host job's the same way): its ranks prove
    it at the rendezvous; the members read it from pgml.gang_secrets, which only the workers' login reads."""
    return token_hex(32)


def rendezvous_at(address: str) -> str:
    """host:port for a job's rendezvous: a port free on `address` now (its rank 0 listens there soon after)."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.bind((address, 0))
        port = int(s.getsockname()[1])
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@dataclass(frozen=True)
class Plan:
    """This worker's part in a gang: its node (0: the leader), how long the gang may take to form and its ranks to
    meet, and after how long a member's silence means its worker is gone."""

    node: int
    nodes: int
    form_seconds: float
    silent_seconds: float
    address: str = "127.0.0.1"  # the leader's: where its rank 0 hosts the rendezvous (a member's is in its Claim)

    @classmethod
    def of(cls, claim: Claim, settings: Settings) -> Plan | None:
        """This worker's part in the job it claimed or joined; None for a job on one host."""
        nodes = requested_nodes(claim.hyperparams)
        if nodes <= 1:
            return None
        return cls(
            node=claim.node,
            nodes=nodes,
            form_seconds=settings.gang_seconds,
            silent_seconds=2 * settings.heartbeat_seconds + 1,
            address=settings.gang_address or default_address(),
        )

    @property
    def leader(self) -> bool:
        return self.node == 0

    def payload(self, rendezvous: str, secret: str) -> dict[str, Any]:
        """What the job's launcher (child/dist.py) needs to start this host's ranks (on its stdin, with the rest of
        the payload: the secret never goes on a command line)."""
        wait = self.form_seconds
        return {
            "node": self.node,
            "nodes": self.nodes,
            "rendezvous": rendezvous,
            "rendezvous_seconds": wait,
            "secret": secret,
        }


@dataclass(frozen=True)
class Member:
    """A member's row (queries.sql gang_members) as the leader reads it."""

    node: int
    worker: str
    outcome: str | None  # ok, error, stopped; None while its ranks run (or when its worker died)
    error: str | None
    error_at: float | None  # when its launcher saw its first failure (epoch seconds)
    silent_seconds: float  # since its worker last renewed its row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Member:
        return cls(
            int(row["node"]),
            str(row["worker"]),
            row["outcome"],
            row["error"],
            row["error_at"],
            float(row["silent_seconds"]),
        )


@dataclass(frozen=True)
class Verdict:
    """How the leader ends a gang's attempt that its rank 0 did not commit: fail it with `error`, lose it (a member
    died: requeued as for a dead worker, failed after max_attempts) with `error`, or None: as for one host."""

    action: str | None = None  # "fail", "lost" or None
    error: str | None = None


def failing(members: list[Member], silent_limit: float) -> Member | None:
    """A member whose ranks failed, or whose worker went silent without a report: the gang cannot go on."""
    for m in members:
        if m.outcome == "error" or (m.outcome is None and m.silent_seconds > silent_limit):
            return m
    return None


def settled(members: list[Member], silent_limit: float) -> bool:
    """Every member has reported, or is silent for longer than `silent_limit` (its worker is gone)."""
    return all(m.outcome is not None or m.silent_seconds > silent_limit for m in members)


def judge(
    leader: str,
    leader_error: str | None,
    leader_error_at: float | None,
    members: list[Member],
    silent_limit: float,
) -> Verdict:
    """The one decision of a gang's end (pure): what happened to the attempt, from the leader's own failure (its
    launcher's error and when it saw it) and its members' reports.

    A member that went silent without a report lost its worker (killed, crashed, cut off): the other hosts' errors
    are the consequence (a peer closed the connection, the rendezvous timed out), so the attempt is lost as when the
    job's own worker dies. Otherwise the earliest failure on any host is the cause: that error names its rank, and
    the job's error adds its node and worker. None: nothing to add (the leader settles as on one host)."""
    lost = [m for m in members if m.outcome is None and m.silent_seconds > silent_limit]
    if lost:
        m = lost[0]
        return Verdict(
            "lost",
            f"node {m.node} of the job's {len(members) + 1}-worker gang (worker {m.worker}) stopped renewing its part "
            f"{m.silent_seconds:.0f} s ago without reporting how its ranks ended (killed, crashed or cut off); the "
            "other ranks were stopped",
        )
    failures = [(m.error_at or math.inf, m.node, m.worker, m.error) for m in members if m.outcome == "error"]
    if leader_error:
        failures.append((leader_error_at or math.inf, 0, leader, leader_error))
    if not failures:
        return Verdict()
    _, node, worker, error = min(failures, key=lambda f: (f[0], f[1]))
    return Verdict("fail", f"{error} (node {node} of {len(members) + 1}, worker {worker})")
