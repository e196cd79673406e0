"""The inference lane vs the same pipeline in-process: per-request latency, and 8 concurrent clients vs 1.

    python bench/serving.py [--dsn DSN] [--requests 200] [--seconds 15] [--clients 8] [--json out.json]

Without --dsn it starts (or reuses) the embedded PostgreSQL under .pgml-bench/; either way it creates a fresh
migrated database and drops it at the end. The model is the bundled all-MiniLM-L6-v2 with a 2-label
classification head (negative/positive), installed in an offline hub cache as `bench/minilm-classifier`, so
both sides load the same files. A daemon (`pgml-tuned serve`) runs its serving process; the model is warmed
first.

Latency, one request at a time with the guide's 2 inputs, the two sides interleaved (random order per round):
- in-process: `pipeline("text-classification")(texts)` in this process;
- lane: `SELECT pgml._request_submit(...)` (autocommit) → wait for a NOTIFY on pgml_answers (LISTEN on the same
  connection, as the Python client does; a notice names no request, so each one makes the client look again) →
  `SELECT * FROM pgml._request_answer(id)` (consumes it). The time
  from before the submit to the answer in hand.

Throughput: `--clients` threads, each with its own connection, send requests back to back for `--seconds`;
then one client alone for as long. Reported: answers/s of each, their ratio (dynamic batching makes it > 1 on a
machine whose CPUs the single client leaves idle), and the per-request p50/p99 under load.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DaemonProc, admin_dsn, bench_env, fresh_database, main_with_json, summary_ms

MODEL = "bench/minilm-classifier"
TEXTS = ["I love how amazingly simple ML has become!", "I hate doing mundane and thankless tasks. ☹️"]


def build_model(home: Path) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pgml_tuned import hub_cache
    from pgml_tuned.demo import minilm_path

    path = home / "minilm-classifier"
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}
    )
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    hub_cache.add(path, MODEL, home / "hf")
    return path


class Client:
    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True, row_factory=dict_row)
        self.conn.execute("LISTEN pgml_answers")

    def ask(self, texts: list[str]) -> Any:
        row = self.conn.execute(
            "SELECT pgml._request_submit(current_user, 'classify', %s, '{}', %s) AS id", (MODEL, Jsonb(texts))
        ).fetchone()
        assert row is not None
        rid = row["id"]
        while True:
            got = self.conn.execute("SELECT * FROM pgml._request_answer(%s)", (rid,)).fetchone()
            if got is None:
                raise RuntimeError(f"request {rid} vanished")
            if got["status"] == "done":
                return got["result"]
            if got["status"] == "failed":
                raise RuntimeError(got["error"])
            for _ in self.conn.notifies(timeout=1.0, stop_after=1):
                pass  # some request was answered (a notice names none): look at ours again

    def close(self) -> None:
        self.conn.close()


def throughput(dsn: str, clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    errors: list[BaseException] = []

    def run() -> None:
        c = Client(dsn)
        mine = []
        try:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                c.ask(TEXTS)
                mine.append(time.perf_counter() - t0)
        except BaseException as e:
            errors.append(e)
        finally:
            c.close()
            with lock:
                latencies.extend(mine)

    started = time.monotonic()
    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    elapsed = time.monotonic() - started
    return {
        "clients": clients,
        "answers": len(latencies),
        "per_second": len(latencies) / elapsed,
        "latency_ms": summary_ms(latencies),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    import torch
    from transformers import pipeline

    admin = admin_dsn(args.dsn)
    home = Path(tempfile.mkdtemp(prefix="pgml-bench-serving-"))
    path = build_model(home)
    with fresh_database(admin, "bench_serving") as dsn:
        daemon = DaemonProc(dsn, home, "--poll-seconds", "2", env=bench_env(home))
        try:
            daemon.wait_event(lambda e: e.get("event") == "serving.start", 120)
            client = Client(dsn)
            for _ in range(10):
                client.ask(TEXTS)  # load and warm the model in the serving process
            pipe = pipeline("text-classification", model=str(path), tokenizer=str(path))
            for _ in range(10):
                pipe(TEXTS)
            same = client.ask(TEXTS)
            want = pipe(TEXTS)
            assert [a["label"] for a in same] == [w["label"] for w in want]
            assert all(abs(a["score"] - w["score"]) < 1e-4 for a, w in zip(same, want, strict=True))
            lane: list[float] = []
            local: list[float] = []
            for _ in range(args.requests):
                order = [0, 1]
                random.shuffle(order)
                for side in order:
                    t0 = time.perf_counter()
                    if side == 0:
                        client.ask(TEXTS)
                        lane.append(time.perf_counter() - t0)
                    else:
                        pipe(TEXTS)
                        local.append(time.perf_counter() - t0)
                time.sleep(random.uniform(0.005, 0.02))
            client.close()
            del pipe
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            one = throughput(dsn, 1, args.seconds)
            many = throughput(dsn, args.clients, args.seconds)
        finally:
            daemon.stop()
    lane_ms, local_ms = summary_ms(lane), summary_ms(local)
    result = {
        "latency": {
            "lane_ms": lane_ms,
            "in_process_ms": local_ms,
            "p50_overhead_ms": lane_ms["p50"] - local_ms["p50"],
            "p99_overhead_ms": lane_ms["p99"] - local_ms["p99"],
        },
        "throughput": {"one": one, "many": many, "ratio": many["per_second"] / one["per_second"]},
    }
    print(f"latency, 2 inputs, {args.requests} requests each side, interleaved:")
    print(f"  in-process pipeline  p50 {local_ms['p50']:.2f} ms  p99 {local_ms['p99']:.2f} ms")
    print(
        f"  lane (submit+answer) p50 {lane_ms['p50']:.2f} ms  p99 {lane_ms['p99']:.2f} ms  "
        f"(+{result['latency']['p50_overhead_ms']:.2f} / +{result['latency']['p99_overhead_ms']:.2f} ms)"
    )
    print(
        f"throughput: 1 client {one['per_second']:.1f}/s (p99 {one['latency_ms']['p99']:.1f} ms); "
        f"{args.clients} clients {many['per_second']:.1f}/s (p99 {many['latency_ms']['p99']:.1f} ms); "
        f"ratio {result['throughput']['ratio']:.2f}x"
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="a server to create the benchmark database on (default: embedded)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=8)
    main_with_json(parser, run)
