"""Where a job's ranks meet: torch.distributed's TCPStore, bound to one address and closed to strangers.

torch's TCPStore listens on every interface and asks nothing of a client (torch 2.13 has no password option): any
host that reached a worker could read the ranks' keys (their gloo / NCCL addresses) and write its own. So:

bound       rank 0 binds the store's socket itself, to the address the job's ranks use — 127.0.0.1 for a job on
            one host, the gang leader's advertised address (settings.gang_address) for a gang — and hands it to
            the store (master_listen_fd): nothing listens on the other interfaces.
named       every key the ranks (and torch's process group) use lives under a prefix derived from the job's
            secret (HMAC-SHA256): a client without the secret cannot name, so cannot read or overwrite, any of them.
proved      before the process group is created, rank 0 writes a fresh nonce; each other rank proves it holds the
            secret by writing HMAC(secret, nonce/rank) under its own key, and rank 0 checks every proof before it
            answers with its own (HMAC(secret, nonce/ok)), which every rank checks in turn: a rank meets only ranks
            that hold the secret, and only the real rank 0 (a process that took the port first cannot pass).

The secret (32 random bytes, hex) is made per attempt by whoever starts the ranks — the launcher for one host, the
gang's leader worker for a gang (its members read it from pgml.gang_secrets, which only the workers' login reads) —
and reaches each rank in its payload on stdin: never on a command line, in the environment or on disk. The store's
traffic is not encrypted: on a gang's network, a host that can read the packets between the workers sees the key
names (keep the workers on a network of their own, as for NCCL's traffic).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import socket
from typing import Any

PREFIX_LABEL = b"pgml-tuned rendezvous keys"


def new_secret() -> str:
    """A job attempt's rendezvous secret."""
    return secrets.token_hex(32)


def key_prefix(secret: str) -> str:
    """The prefix of every key the job's ranks use in the store (unguessable without the secret)."""
    return "pgml/" + hmac.new(secret.encode(), PREFIX_LABEL, hashlib.sha256).hexdigest()[:40]


def proof(secret: str, nonce: str, who: str) -> str:
    """What a rank (who: its number, or "ok" for rank 0's answer) writes to show it holds the secret."""
    return hmac.new(secret.encode(), f"{nonce}/{who}".encode(), hashlib.sha256).hexdigest()


class HandshakeError(Exception):
    """A peer at the rendezvous did not prove it holds the job's secret."""


def listen(host: str, port: int) -> socket.socket:
    """Rank 0's listening socket for the store, bound to `host` only (an IPv6 address may come in brackets)."""
    host = host.strip("[]")
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def open_store(host: str, port: int, main: bool, wait: float) -> Any:
    """The job's TCPStore: hosted by rank 0 on a socket bound to `host` only, joined by the others (who retry for up
    to `wait` seconds while rank 0 starts)."""
    import torch.distributed as dist

    timeout = dt.timedelta(seconds=wait)
    if not main:
        return dist.TCPStore(host.strip("[]"), port, None, False, timeout=timeout)
    sock = listen(host, port)
    try:
        store = dist.TCPStore(
            host.strip("[]"), port, None, True, timeout=timeout, wait_for_workers=False, master_listen_fd=sock.fileno()
        )
    except Exception:
        sock.close()
        raise
    sock.detach()  # the store's server owns the descriptor now (it closes it): Python must not close it too
    return store


def handshake(store: Any, secret: str, rank: int, world_size: int) -> Any:
    """Prove and check the job's secret at the rendezvous (see the top); returns the store every later key goes
    through (the secret's prefix). Waits as long as the store's timeout; raises HandshakeError on a wrong proof."""
    import torch.distributed as dist

    ns = dist.PrefixStore(key_prefix(secret), store)
    if rank == 0:
        nonce = secrets.token_hex(16)
        ns.set("nonce", nonce)
        keys = [f"proof/{r}" for r in range(1, world_size)]
        if keys:
            ns.wait(keys)
        for r in range(1, world_size):
            if not hmac.compare_digest(bytes(ns.get(f"proof/{r}")), proof(secret, nonce, str(r)).encode()):
                raise HandshakeError(f"rank {r} did not prove it holds the job's rendezvous secret")
        ns.set("ok", proof(secret, nonce, "ok"))
        return ns
    ns.wait(["nonce"])
    nonce = bytes(ns.get("nonce")).decode()
    ns.set(f"proof/{rank}", proof(secret, nonce, str(rank)))
    ns.wait(["ok"])
    if not hmac.compare_digest(bytes(ns.get("ok")), proof(secret, nonce, "ok").encode()):
        raise HandshakeError("rank 0 did not prove it holds the job's rendezvous secret")
    return ns


def loopback_interface() -> str:
    """The name of this host's loopback interface (for GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME of a one-host job)."""
    for _, name in socket.if_nameindex():
        try:
            with open(f"/sys/class/net/{name}/flags") as fh:
                if int(fh.read().strip(), 16) & 0x8:  # IFF_LOOPBACK
                    return name
        except (OSError, ValueError):
            continue
    return "lo"
