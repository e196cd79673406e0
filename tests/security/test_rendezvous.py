"""The rendezvous of a job's ranks (torch.distributed's TCPStore): bound to the address the job uses (loopback for a
one-host job), and closed to anyone without the attempt's secret (child/rendezvous.py).

The attack (issue 20, class 6): rank 0's store of a {"procs": 2} job listened on every interface, and any process
that reached it could read the ranks' keys (their gloo addresses) and write its own."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import threading
from typing import Any

import psycopg
import pytest

from pgml_tuned.child import rendezvous
from pgml_tuned.states import Claim
from pgml_tuned.worker import gang
from tests.conftest import wait_for, wait_job

Conn = psycopg.Connection[dict[str, Any]]

# the keys torch's default process group writes over gloo (rank r's address), with and without init_process_group's
# own "default_pg" prefix: what a stranger at the store would read
GLOO_KEYS = ["default_pg/0//cpu//0/0", "default_pg/0//cpu//0/1", "0//cpu//0/0", "0//cpu//0/1"]


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (the source address of a route out), or None."""
    for target in ("198.51.100.1", "10.255.255.255", "8.8.8.8"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((target, 9))  # no packet is sent: this only picks the source address
            except OSError:
                continue
            address = str(s.getsockname()[0])
        if not ipaddress.ip_address(address).is_loopback and address != "0.0.0.0":
            return address
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ranks(world: int, secrets: list[str], port: int) -> list[Any]:
    """Run the handshake of `world` ranks in threads (rank r with secrets[r]); each result: the store or the error."""
    results: list[Any] = [None] * world

    def rank(r: int) -> None:
        try:
            store = rendezvous.open_store("127.0.0.1", port, r == 0, 5)
            results[r] = rendezvous.handshake(store, secrets[r], r, world)
        except Exception as e:  # the test looks at what each rank got
            results[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


# ---- the handshake, in-process ---------------------------------------------------------------------------------
def test_ranks_with_the_secret_meet_and_their_keys_are_out_of_a_strangers_reach() -> None:
    import torch.distributed as dist

    secret, port = rendezvous.new_secret(), free_port()
    master = rendezvous.open_store("127.0.0.1", port, True, 5)
    results: list[Any] = [None, None]

    def rank(r: int) -> None:
        store = master if r == 0 else dist.TCPStore("127.0.0.1", port, None, False, timeout=dt.timedelta(seconds=5))
        results[r] = rendezvous.handshake(store, secret, r, 2)
        results[r].set(f"addr/{r}", f"address of rank {r}")

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(isinstance(r, dist.PrefixStore) for r in results), results
    assert bytes(results[1].get("addr/0")) == b"address of rank 0"
    # a stranger at the port: the names it can guess hold nothing; the keys are under the secret's prefix
    stranger = dist.TCPStore("127.0.0.1", port, None, False, timeout=dt.timedelta(seconds=2))
    assert not stranger.check(["addr/0", "nonce", "ok", "proof/1"])
    assert rendezvous.key_prefix(secret) != rendezvous.key_prefix(rendezvous.new_secret())
    assert secret not in rendezvous.key_prefix(secret)


def test_a_rank_without_the_secret_is_refused_before_the_group_forms() -> None:
    good = rendezvous.new_secret()
    results = ranks(2, [good, rendezvous.new_secret()], free_port())
    # the stranger's keys are under another prefix: rank 0 never sees its proof (timeout) and it never sees a nonce
    assert all(isinstance(r, Exception) for r in results), results


def test_a_wrong_proof_under_the_right_prefix_is_refused() -> None:
    """Someone who learned the key prefix (not the secret) and writes a proof: rank 0 checks it."""
    import torch.distributed as dist

    secret, port = rendezvous.new_secret(), free_port()
    out: list[Any] = [None]

    def rank0() -> None:
        store = rendezvous.open_store("127.0.0.1", port, True, 5)
        try:
            out[0] = rendezvous.handshake(store, secret, 0, 2)
        except Exception as e:
            out[0] = e

    t = threading.Thread(target=rank0)
    t.start()
    intruder = dist.PrefixStore(
        rendezvous.key_prefix(secret),
        dist.TCPStore("127.0.0.1", port, None, False, timeout=dt.timedelta(seconds=5)),
    )
    intruder.wait(["nonce"])
    intruder.set("proof/1", "0" * 64)
    t.join(30)
    assert isinstance(out[0], rendezvous.HandshakeError), out[0]
    assert "rank 1 did not prove" in str(out[0])


def test_the_store_listens_on_the_given_address_only() -> None:
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try the store on")
    port = free_port()
    sock = rendezvous.listen("127.0.0.1", port)
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=2).close()
    finally:
        sock.close()


def test_the_gang_secret_travels_in_the_payload_never_in_a_repr() -> None:
    plan = gang.Plan(node=1, nodes=2, form_seconds=5, silent_seconds=5)
    assert plan.payload("10.0.0.1:5000", "s3cret")["secret"] == "s3cret"
    claim = Claim(1, 1, 1, "p", 1, "noop", None, None, "m", 0.25, "random", {}, None, rendezvous_secret="s3cret")
    assert "s3cret" not in repr(claim)
    assert "rendezvous_secret" not in claim.spec()


def test_only_the_workers_read_the_gang_secrets(conn: Conn, ops: Conn) -> None:
    for who in (conn, ops):  # a user, and an administrator
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            who.execute("SELECT * FROM pgml.gang_secrets")
        who.rollback()


def test_a_gang_attempts_secret_is_forgotten_once_the_attempt_is_over(ops: Conn, su: Conn) -> None:
    job = ops.execute("SELECT job_id FROM pgml.tune('gs', task => 'noop', model_name => 'none')").fetchone()["job_id"]
    su.execute("INSERT INTO pgml.gang_secrets (job_id, attempt, secret) VALUES (%s, 1, 'x')", (job,))
    su.execute("SELECT pgml._job_tables_sweep()")  # the workers' periodic pass: the job is not running attempt 1
    assert not su.execute("SELECT 1 FROM pgml.gang_secrets WHERE job_id = %s", (job,)).fetchone()


# ---- a real {"procs": 2} job -------------------------------------------------------------------------------------
def job_processes(daemon_pid: int) -> list[Any]:
    import psutil

    found = []
    for p in psutil.Process(daemon_pid).children(recursive=True):
        try:
            if "pgml_tuned.child" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def rank_zero_port(procs: list[Any]) -> int | None:
    for p in procs:
        try:
            env = p.environ()
        except Exception:
            continue
        if env.get("RANK") == "0" and env.get("MASTER_PORT"):
            return int(env["MASTER_PORT"])
    return None


def listeners(procs: list[Any]) -> list[tuple[str, int]]:
    out = []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except Exception:
            continue
        out += [(c.laddr.ip, c.laddr.port) for c in conns if c.status == "LISTEN"]
    return out


def test_a_two_rank_job_listens_on_loopback_only_and_a_stranger_reads_nothing(ops: Conn, daemon: Any) -> None:
    import torch.distributed as dist

    job = ops.execute(
        "SELECT job_id FROM pgml.tune('rdv', task => 'noop', model_name => 'none', hyperparams => %s::jsonb)",
        (json.dumps({"resources": {"procs": 2}, "seconds": 20, "steps": 40}),),
    ).fetchone()["job_id"]
    d = daemon()
    # the ranks formed their group once rank 0 logs its first step
    wait_for(
        lambda: ops.execute("SELECT 1 FROM pgml.logs WHERE job_id = %s AND logs ? 'loss'", (job,)).fetchone(),
        120,
        what="the job's first step",
    )
    procs = job_processes(d.proc.pid)
    port = wait_for(lambda: rank_zero_port(job_processes(d.proc.pid)), 10, what="rank 0's MASTER_PORT")
    listening = listeners(procs)
    assert port in {p for _, p in listening}, (port, listening)
    exposed = [(ip, p) for ip, p in listening if not ipaddress.ip_address(ip).is_loopback]
    assert not exposed, f"the job's ranks listen beyond loopback: {exposed}"
    address = non_loopback_address()
    if address is not None:
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=2).close()
    # a stranger on this host, at the store's port: the keys the ranks wrote are not where it can name them
    stranger = dist.TCPStore("127.0.0.1", port, None, False, timeout=dt.timedelta(seconds=3))
    assert not any(stranger.check([k]) for k in GLOO_KEYS), "a stranger read the ranks' keys"
    for k in ("nonce", "ok", "proof/1", *GLOO_KEYS):  # and what it writes reaches no rank
        stranger.set(k, "garbage")
    done = wait_job(ops, job, 120)
    assert done["status"] == "succeeded", done["error"]
