"""Checkpoint I/O: store and restore MB/s of pgml checkpoints against plain COPY of the same bytes.

    python bench/checkpoint_io.py [--dsn DSN] [--mb 200] [--reps 5] [--json out.json]

Without --dsn it uses (starting if needed) the embedded PostgreSQL under .pgml-bench/; either way it works in
a fresh database (pgml_tuned.db.migrate), dropped at the end.

The data: a checkpoint-shaped directory of --mb MB of random bytes (incompressible, like weights and optimizer
state): model.safetensors (60 %), optimizer.pt (38 %), the rest in small files (scheduler, RNG, trainer state).

Measured in the same run, alternating (random order within each rep), --reps times:

- pgml store:    JobStore.store_checkpoint(step, dir, keep) — the child's own code: one fenced transaction
                 (lock_owned_job, insert_checkpoint, files.copy_dir_in → COPY pgml.checkpoint_files FROM STDIN
                 (FORMAT BINARY) in 8 MB parts, finish_checkpoint). keep is large: pruning is timed apart.
- plain store:   COPY bench_plain (path, part, data) FROM STDIN (FORMAT BINARY), one row per 8 MB part, one
                 transaction; bench_plain is a bare (path text, part int, data bytea) table, default storage.
- pgml restore:  JobContext.resume_checkpoint() of a fresh context (attempt 2) on its own new connection —
                 latest_checkpoint, then files.copy_dir_out: COPY (the child's query) TO STDOUT (FORMAT BINARY),
                 rows written to files. Removing the restored files afterwards is not timed (as for plain).
- plain restore: COPY (SELECT path, part, data FROM bench_plain ORDER BY path, part) TO STDOUT (FORMAT BINARY),
                 rows parsed by psycopg and written to files.

Between reps (untimed) both tables are emptied and VACUUMed, so each rep starts from the same state.

Diagnostics, also in the same run: restore variants (a named cursor with text vs binary results; COPY binary
straight out of pgml.checkpoint_files; the plain restore on a fresh connection, as a resuming child has; the
child's own query on the bench's long-lived connection), where the pgml restore's time goes (connect, the
latest-checkpoint lookup, the COPY TO with its file writes, and the time inside write() alone), the cost of
pruning one stored checkpoint (what keep=N does inside the next store's transaction), and WAL bytes per store.
MB here is 10^6 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from common import admin_dsn, fresh_database, main_with_json
from psycopg.rows import dict_row

from pgml_tuned import files
from pgml_tuned.child.context import JobContext
from pgml_tuned.child.events import Events
from pgml_tuned.db import q

TICKET = "bench-ticket"  # the child's ticket for the bench's job (the job row keeps its sha256)
LATEST_CHECKPOINT = "SELECT id, step, bytes FROM pgml.checkpoints WHERE job_id = %(id)s ORDER BY step DESC LIMIT 1"
CHECKPOINT_FILES = (
    "SELECT path, part, data FROM pgml.checkpoint_files WHERE checkpoint_id = %(checkpoint_id)s ORDER BY path, part"
)

FILES = [
    ("model.safetensors", 0.60),
    ("optimizer.pt", 0.38),
    ("scheduler.pt", 0.0002),
    ("rng_state.pth", 0.0004),
    ("trainer_state.json", 0.0001),
    ("training_args.bin", 0.0001),
]


def make_checkpoint(root: Path, total_bytes: int) -> int:
    root.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, share in FILES:
        size = max(1024, int(total_bytes * share))
        with open(root / name, "wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(left, 16 << 20))
                f.write(chunk)
                left -= len(chunk)
        n += size
    return n


def wal_lsn(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn AS b").fetchone()["b"])


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


writes: list[float] = []  # seconds inside file write() calls of the restore being timed


class TimedFile:
    """A file opened for writing whose write() calls add their time to `writes`."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh

    def write(self, data: bytes) -> int:
        t0 = time.perf_counter()
        n = self.fh.write(data)
        writes.append(time.perf_counter() - t0)
        return n

    def __enter__(self) -> TimedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()


def timed_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    fh = open(path, mode, *args, **kwargs)
    return TimedFile(fh) if "w" in mode else fh


@contextlib.contextmanager
def timing(module: Any, name: str, into: list[float]) -> Any:
    """module.name wrapped: each call's seconds appended to `into`."""
    fn = getattr(module, name)

    def wrapper(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            into.append(time.perf_counter() - t0)

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, fn)


# ---- plain COPY, the reference ----


def plain_store(conn: psycopg.Connection[Any], src: Path) -> None:
    with (
        conn.transaction(),
        conn.cursor() as cur,
        cur.copy("COPY bench_plain (path, part, data) FROM STDIN (FORMAT BINARY)") as cp,
    ):
        cp.set_types(["text", "int4", "bytea"])
        for rel, path in files.walk(src):
            with open(path, "rb") as fh:
                part = 0
                while True:
                    chunk = fh.read(files.PART_BYTES)
                    if not chunk and part > 0:
                        break
                    cp.write_row((rel, part, chunk))
                    part += 1
                    if len(chunk) < files.PART_BYTES:
                        break


def copy_out(conn: psycopg.Connection[Any], query: str, params: dict[str, Any] | None, dest: Path) -> int:
    """COPY (query) TO STDOUT (FORMAT BINARY): rows (path, part, data) ordered by path, part → files."""
    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    current, out = None, None
    with (
        contextlib.ExitStack() as stack,
        conn.cursor() as cur,
        cur.copy(f"COPY ({query}) TO STDOUT (FORMAT BINARY)", params) as cp,
    ):
        cp.set_types(["text", "int4", "bytea"])
        for path, _part, data in cp.rows():
            if path != current:
                stack.close()
                target = dest / path
                target.parent.mkdir(parents=True, exist_ok=True)
                out = stack.enter_context(timed_open(target, "wb"))
                current = path
            out.write(data)
            n += len(data)
    return n


def fresh_plain_restore(dsn: str, dest: Path) -> int:
    """The plain restore as a resuming child does it: its own new connection (a new server backend)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return copy_out(conn, "SELECT path, part, data FROM bench_plain ORDER BY path, part", None, dest)


def cursor_out(conn: psycopg.Connection[Any], query: str, params: dict[str, Any], dest: Path, binary: bool) -> int:
    """files.copy_dir_out's loop (named cursor, itersize 4), with text or binary results."""
    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    current, out = None, None
    with contextlib.ExitStack() as stack, conn.transaction(), conn.cursor(name="bench_out", binary=binary) as cur:
        cur.itersize = 4
        cur.execute(query, params)
        for row in cur:
            if row["path"] != current:
                stack.close()
                out = stack.enter_context(open(dest / row["path"], "wb"))
                current = row["path"]
            out.write(row["data"])
            n += len(row["data"])
    return n


def empty_tables(admin_conn: psycopg.Connection[Any], job: int) -> None:
    admin_conn.execute("DELETE FROM pgml.checkpoints WHERE job_id = %s", (job,))
    admin_conn.execute("DELETE FROM bench_plain")
    admin_conn.execute("VACUUM pgml.checkpoint_files, pgml.checkpoints, bench_plain")
    admin_conn.execute("CHECKPOINT")  # each rep pays the same full-page writes


def run(args: argparse.Namespace) -> dict[str, Any]:
    admin = admin_dsn(args.dsn)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="pgml-bench-ckpt-"))
    os.environ["PGML_WORK_DIR"] = str(work)
    files.open = timed_open  # type: ignore[attr-defined]  # copy_dir_out's file writes are timed too
    try:
        src = work / "checkpoint-src"
        nbytes = make_checkpoint(src, int(args.mb * 1e6))
        mb = nbytes / 1e6
        with (
            fresh_database(admin, "pgml_bench_ckpt") as dsn,
            psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn,
        ):
            conn.execute("CREATE TABLE bench_plain (path text, part int, data bytea)")
            job_row = conn.execute(
                "SELECT job_id, model_id FROM pgml.tune('ckpt', task => 'noop', model_name => 'none')"
            ).fetchone()
            job, model = job_row["job_id"], job_row["model_id"]
            conn.execute(
                "UPDATE pgml.jobs SET status = 'running', attempt = 1, worker = 'bench', "
                "lease_expires_at = now() + interval '1 day', heartbeat_at = now(), "
                "child_ticket = sha256(convert_to(%s, 'UTF8')) WHERE id = %s",
                (TICKET, job),
            )
            spec = {"id": job, "attempt": 1, "model_id": model, "hyperparams": {}}
            devnull = open(os.devnull, "w")
            sink = Events(devnull)
            writer = JobContext(spec, {}, dsn, TICKET, sink)
            plain_conn = psycopg.connect(dsn, autocommit=True, row_factory=dict_row)
            storage = conn.execute(
                "SELECT attstorage FROM pg_attribute WHERE attrelid = 'bench_plain'::regclass AND attname = 'data'"
            ).fetchone()["attstorage"]
            t: dict[str, list[float]] = {
                k: []
                for k in (
                    "pgml store",
                    "plain store",
                    "pgml restore",
                    "plain restore",
                    "restore: copy_dir_out text cursor",
                    "restore: same cursor, binary",
                    "restore: COPY binary of checkpoint_files",
                    "restore: plain, on a fresh connection",
                    "restore: the child's query, on the bench's connection",
                    "prune 1 checkpoint",
                )
            }
            wal: dict[str, list[int]] = {"pgml store": [], "plain store": []}
            phases: dict[str, list[float]] = {
                k: []
                for k in (
                    "connect",
                    "lookup (latest checkpoint)",
                    "COPY TO + file writes",
                    "  of which file writes",
                    "plain: file writes",
                )
            }
            downloads: list[float] = []
            readers: list[JobContext] = []
            print(
                f"{mb:.0f} MB in {len(FILES)} files, {args.reps} reps; bench_plain.data storage {storage!r}", flush=True
            )
            for rep in range(args.reps):
                empty_tables(conn, job)
                step = rep + 1
                stores = [
                    ("pgml store", lambda step=step: writer.store.store_checkpoint(step, src, keep=1000)),
                    ("plain store", lambda: plain_store(plain_conn, src)),
                ]
                rng.shuffle(stores)
                for name, fn in stores:
                    w0 = wal_lsn(conn)
                    secs, _ = timed(fn)
                    wal[name].append(wal_lsn(conn) - w0)
                    t[name].append(secs)
                ckpt = conn.execute(LATEST_CHECKPOINT, {"id": job}).fetchone()
                assert ckpt["bytes"] == nbytes, (ckpt, nbytes)

                def pgml_restore() -> None:
                    # phases of what a taken-over job waits for (the workdir's removal is not timed, as for plain)
                    t0 = time.perf_counter()
                    reader = JobContext({**spec, "attempt": 2}, {}, dsn, TICKET, sink)
                    readers.append(reader)
                    reader.store.conn()
                    t1 = time.perf_counter()
                    writes.clear()
                    with timing(files, "copy_dir_out", downloads):
                        got = reader.resume_checkpoint()
                    assert got is not None and (got / "model.safetensors").stat().st_size > 0
                    t2 = time.perf_counter()
                    phases["connect"].append(t1 - t0)
                    phases["lookup (latest checkpoint)"].append(t2 - t1 - downloads[-1])
                    phases["COPY TO + file writes"].append(downloads[-1])
                    phases["  of which file writes"].append(sum(writes))

                ck = {"checkpoint_id": ckpt["id"]}
                restores: list[tuple[str, Callable[[], Any]]] = [
                    ("pgml restore", pgml_restore),
                    (
                        "plain restore",
                        lambda: copy_out(
                            plain_conn,
                            "SELECT path, part, data FROM bench_plain ORDER BY path, part",
                            None,
                            work / "o1",
                        ),
                    ),
                    (
                        "restore: copy_dir_out text cursor",
                        lambda ck=ck: cursor_out(plain_conn, CHECKPOINT_FILES, ck, work / "o2", binary=False),
                    ),
                    (
                        "restore: same cursor, binary",
                        lambda ck=ck: cursor_out(plain_conn, CHECKPOINT_FILES, ck, work / "o3", binary=True),
                    ),
                    (
                        "restore: COPY binary of checkpoint_files",
                        lambda ck=ck: copy_out(plain_conn, CHECKPOINT_FILES, ck, work / "o4"),
                    ),
                    ("restore: plain, on a fresh connection", lambda: fresh_plain_restore(dsn, work / "o6")),
                    (
                        "restore: the child's query, on the bench's connection",
                        lambda ck=ck: files.copy_dir_out(
                            plain_conn, q("child_checkpoint_files"), {**ck, "id": job, "ticket": TICKET}, work / "o7"
                        ),
                    ),
                ]
                rng.shuffle(restores)
                for name, fn in restores:
                    secs, _ = timed(fn)
                    t[name].append(secs)
                    if name == "plain restore":
                        phases["plain: file writes"].append(sum(writes))
                    writes.clear()
                    for reader in readers:
                        if reader.store._conn is not None:
                            reader.store._conn.close()
                        shutil.rmtree(reader.workdir, ignore_errors=True)
                    readers.clear()
                    for o in ("o1", "o2", "o3", "o4", "o6", "o7"):
                        shutil.rmtree(work / o, ignore_errors=True)
                # what keep=N costs the next store: deleting one stored checkpoint (cascade, TOAST chunks)
                secs, _ = timed(lambda c=ckpt["id"]: conn.execute("DELETE FROM pgml.checkpoints WHERE id = %s", (c,)))
                t["prune 1 checkpoint"].append(secs)
                print(
                    f"  rep {rep + 1}: "
                    + ", ".join(f"{k} {mb / v[-1]:.0f}" for k, v in t.items() if k != "prune 1 checkpoint")
                    + " MB/s",
                    flush=True,
                )
            empty_tables(conn, job)
            plain_conn.close()
            writer.store.conn().close()
            devnull.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in t.items()}
    rate = {k: mb / v for k, v in med.items()}
    print(f"\ncheckpoint I/O, {mb:.0f} MB incompressible, median of {args.reps} (MB/s)")
    print(f"{'':10s} {'pgml':>8s} {'plain COPY':>11s} {'ratio':>7s}   (target >= 0.8)")
    for what in ("store", "restore"):
        r = rate[f"pgml {what}"] / rate[f"plain {what}"]
        print(f"{what:10s} {rate[f'pgml {what}']:8.0f} {rate[f'plain {what}']:11.0f} {r:7.2f}")
    print("\nrestore variants (MB/s):")
    for k in (
        "restore: copy_dir_out text cursor",
        "restore: same cursor, binary",
        "restore: COPY binary of checkpoint_files",
        "restore: plain, on a fresh connection",
        "restore: the child's query, on the bench's connection",
    ):
        print(f"  {k[9:]:44s} {rate[k]:6.0f}   ({rate[k] / rate['plain restore']:.2f}x plain)")
    print("\npgml restore, where the time goes (median s; file writes: time inside write() calls):")
    for k, v in phases.items():
        print(f"  {k:40s} {statistics.median(v):7.3f}")
    print(f"\nprune 1 checkpoint (keep=N, inside the next store's transaction): {med['prune 1 checkpoint']:.2f} s")
    print("WAL per store (MB): " + ", ".join(f"{k} {statistics.median(v) / 1e6:.0f}" for k, v in wal.items()))
    return {
        "mb": mb,
        "reps": args.reps,
        "at": dt.datetime.now().isoformat(),
        "seconds": t,
        "median_mb_s": rate,
        "ratio": {w: rate[f"pgml {w}"] / rate[f"plain {w}"] for w in ("store", "restore")},
        "wal_bytes": wal,
        "plain_storage": storage,
        "restore_phases": phases,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", help="a server to create the benchmark database on (default: embedded)")
    p.add_argument("--mb", type=float, default=200)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    main_with_json(p, run)


if __name__ == "__main__":
    main()
