"""The inference lane's own cost: a one-text pgml.embed answered by a serving loop that answers at once (no model).

    python bench/lane.py [--dsn DSN] [--calls 400]

Without --dsn it starts (or reuses) the embedded PostgreSQL under .pgml-bench/; either way it creates a fresh
migrated database and drops it at the end. A real serving loop (serving.server.Server: LISTEN, the claim, the
answer with its lock's release) runs in a thread of this process with its batches answered by zero vectors at once,
so what a call costs beyond its forward pass is measured without the model's time and noise. Printed side by side,
p50 of each, interleaved: `SELECT 1` (a round trip), `pgml._loopback('to_jsonb(1)')` (one statement through the
loopback), `pgml._serve_submit` (a request submitted through it), and the whole `pgml.embed(model, text)`; the
whole call's ratio to the submit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import psycopg
from psycopg.rows import dict_row

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import admin_dsn, fresh_database, main_with_json

CALLS = {
    "round trip": "SELECT 1",
    "loopback": "SELECT pgml._loopback('to_jsonb(1)')",
    "submit": "SELECT pgml._serve_submit('embed', 'bench/none', '{}'::jsonb, '[\"x\"]'::jsonb)",
    "embed": "SELECT pgml.embed('bench/none', 'one short text')",
}


def answering(dsn: str, ready: threading.Event, stop: threading.Event) -> None:
    """A serving loop whose batches are answered at once with zero vectors of 384 dimensions."""
    from pgml_tuned.db import Pool
    from pgml_tuned.serving.requests import Request
    from pgml_tuned.serving.server import Server, ServingConfig

    async def run() -> None:
        pool = Pool(dsn, app="bench lane", max_size=2)
        config = ServingConfig(dsn=dsn, serving_id="bench/lane", cache_dir=Path(tempfile.mkdtemp()), poll_seconds=5)
        server = Server(config, pool)

        async def serve_batch(batch: list[Request]) -> None:
            await server.requests.answer_vectors(
                [(r.id, np.zeros((len(r.inputs), 384), dtype=np.float32)) for r in batch]
            )

        server.serve_batch = serve_batch  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.run)
            while not stop.is_set():
                if server.listening:
                    ready.set()
                await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        await pool.close()

    anyio.run(run)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("PGML_ALLOW_SUPERUSER", "1")  # the benchmark's session is the server's superuser
    with fresh_database(admin_dsn(args.dsn), "bench_lane") as dsn:
        ready, stop = threading.Event(), threading.Event()
        serving = threading.Thread(target=answering, args=(dsn, ready, stop))
        serving.start()
        try:
            if not ready.wait(60):
                raise SystemExit("the serving loop did not start listening within 60 s")
            times: dict[str, list[float]] = {k: [] for k in CALLS}
            with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
                for sql in CALLS.values():  # warm: plans, the loopback connection
                    for _ in range(30):
                        conn.execute(sql).fetchall()
                for _ in range(args.calls):
                    for name, sql in CALLS.items():
                        t0 = time.perf_counter()
                        conn.execute(sql).fetchall()
                        times[name].append(time.perf_counter() - t0)
                        time.sleep(0.002)
                conn.execute("DELETE FROM pgml.requests")  # the submits nobody waited for
        finally:
            stop.set()
            serving.join()
    p50 = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {"calls": args.calls, "p50_ms": p50, "embed_over_submit": p50["embed"] / p50["submit"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    result = measure(args)
    p50 = result["p50_ms"]
    print(
        f"p50 of {result['calls']} each, interleaved: round trip {p50['round trip']:.2f} ms, loopback statement "
        f"{p50['loopback']:.2f} ms, submit {p50['submit']:.2f} ms, whole pgml.embed answered at once "
        f"{p50['embed']:.2f} ms ({result['embed_over_submit']:.2f}x the submit)"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", help="a server to create the scratch database on (default: the embedded one)")
    parser.add_argument("--calls", type=int, default=400, help="calls of each kind")
    main_with_json(parser, run)


if __name__ == "__main__":
    main()
