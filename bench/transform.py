"""The guide's `SELECT pgml.transform(...)` (through the dblink loopback) and OpenSourceAI's chat completions vs the
same model run in-process, side by side in one run.

    python bench/transform.py [--dsn DSN] [--requests 200] [--seconds 10] [--clients 8] [--json out.json]

Without --dsn it starts (or reuses) the embedded PostgreSQL under .pgml-bench/; a fresh migrated database either
way, dropped at the end. One daemon (`pgml-tuned serve`) runs its serving process.

1. Latency, one call at a time, the two sides interleaved in random order: the guide's real-time call
   `SELECT pgml.transform(task => '{"task": "text-classification", "model": ...}', inputs => ARRAY[2 texts])`
   in a psql-like session (the loopback stays open for the session) vs `pipeline("text-classification")(texts)`
   in this process, on the same files (bundled all-MiniLM-L6-v2 with a 2-label head, from an offline hub cache).
   Targets (issue 9): p50 ≤ in-process + 5 ms, p99 ≤ in-process + 15 ms.
2. Concurrency: `--clients` sessions calling pgml.transform back to back for `--seconds`, then one session alone
   as long: answers/s of each, their ratio (target ≥ 3×: dynamic batching), p99 under load.
3. Chat completions: `OpenSourceAI.chat_completions_create` with 64 new tokens (min = max, greedy) on a small
   random Llama (hidden 256, 4 layers) vs `model.generate` in-process with the same settings: generated tokens/s
   (target ≥ 0.9×).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DaemonProc, admin_dsn, bench_env, fresh_database, main_with_json, summary_ms
from bench.serving import MODEL, TEXTS, build_model

CHAT_MODEL = "bench/small-llama"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What moves share prices?"}]
NEW_TOKENS = 64
TASK = json.dumps({"task": "text-classification", "model": MODEL})


def transform(conn: psycopg.Connection[Any]) -> Any:
    row = conn.execute("SELECT pgml.transform(task => %s::jsonb, inputs => %s::text[])", (TASK, TEXTS)).fetchone()
    assert row is not None
    return row[0]


def throughput(dsn: str, clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    stop = time.monotonic() + seconds

    def run() -> None:
        mine: list[float] = []
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                transform(conn)  # opens the session's loopback
                while time.monotonic() < stop:
                    t0 = time.perf_counter()
                    transform(conn)
                    mine.append(time.perf_counter() - t0)
        except BaseException as e:
            errors.append(e)
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
    return {
        "clients": clients,
        "answers": len(latencies),
        "per_second": len(latencies) / (time.monotonic() - started),
        "latency_ms": summary_ms(latencies),
    }


def build_llama(home: Path, size: str) -> Path:
    """small: hidden 256, 4 layers (CPU); 1b: bench/gpu_conversation.py's 1.07B Llama in bf16 (GPU)."""
    from pgml_tuned import hub_cache
    from tests.support.models import build_tiny_llama

    if size == "1b":
        from bench.gpu_conversation import build_model

        path = build_model(home, tiny=False)
    else:
        path = build_tiny_llama(home / "small-llama", hidden=256, layers=4, heads=8, kv_heads=4)
    hub_cache.add(path, CHAT_MODEL, home / "hf")
    return path


def chat_rates(dsn: str, path: Path, rounds: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pgml_tuned
    from pgml_tuned.serving.cache import device

    client = pgml_tuned.OpenSourceAI(dsn)
    options = {"model": CHAT_MODEL, "temperature": 0, "min_new_tokens": NEW_TOKENS}
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).to(device()).eval()  # where the serving process puts it
    ids = torch.tensor(
        [tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)],
        device=device(),
    )
    client.chat_completions_create(options, MESSAGES, max_tokens=NEW_TOKENS)  # warm
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    lane: list[float] = []
    local: list[float] = []
    for _ in range(rounds):
        for side in random.sample([0, 1], 2):
            t0 = time.perf_counter()
            if side == 0:
                got = client.chat_completions_create(options, MESSAGES, max_tokens=NEW_TOKENS)
                assert got["usage"]["completion_tokens"] == NEW_TOKENS, got["usage"]
                lane.append(time.perf_counter() - t0)
            else:
                with torch.inference_mode():
                    out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
                assert out.shape[1] - ids.shape[1] == NEW_TOKENS
                local.append(time.perf_counter() - t0)
    lane_rate = NEW_TOKENS / sorted(lane)[len(lane) // 2]
    local_rate = NEW_TOKENS / sorted(local)[len(local) // 2]
    return {
        "lane_tokens_per_s": lane_rate,
        "in_process_tokens_per_s": local_rate,
        "ratio": lane_rate / local_rate,
        "dtype": str(model.dtype),
        "device": device(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from transformers import pipeline

    admin = admin_dsn(args.dsn)
    home = Path(tempfile.mkdtemp(prefix="pgml-bench-transform-"))
    from pgml_tuned.serving.cache import device

    path, llama = build_model(home), build_llama(home, args.chat_model)
    where = device()
    if where == "cuda":
        import torch

        where = f"cuda ({torch.cuda.get_device_name()})"
    print(f"both sides on {where}", flush=True)
    with fresh_database(admin, "bench_transform") as dsn:
        daemon = DaemonProc(dsn, home, "--poll-seconds", "2", env=bench_env(home))
        try:
            daemon.wait_event(lambda e: e.get("event") == "serving.start", 120)
            pipe = pipeline("text-classification", model=str(path), tokenizer=str(path), device=device())
            with psycopg.connect(dsn, autocommit=True) as conn:
                for _ in range(10):  # the model warm in the serving process, the loopback open, the pipeline warm
                    got = transform(conn)
                    want = pipe(TEXTS)
                assert [g["label"] for g in got] == [w["label"] for w in want]
                assert all(abs(g["score"] - w["score"]) < 1e-4 for g, w in zip(got, want, strict=True))
                sql: list[float] = []
                local: list[float] = []
                for _ in range(args.requests):
                    for side in random.sample([0, 1], 2):
                        t0 = time.perf_counter()
                        if side == 0:
                            transform(conn)
                            sql.append(time.perf_counter() - t0)
                        else:
                            pipe(TEXTS)
                            local.append(time.perf_counter() - t0)
                    time.sleep(random.uniform(0.005, 0.02))
            one = throughput(dsn, 1, args.seconds)
            many = throughput(dsn, args.clients, args.seconds)
            chat = chat_rates(dsn, llama, args.chat_rounds)
        finally:
            daemon.stop()
    sql_ms, local_ms = summary_ms(sql), summary_ms(local)
    result = {
        "latency": {
            "transform_ms": sql_ms,
            "in_process_ms": local_ms,
            "p50_overhead_ms": sql_ms["p50"] - local_ms["p50"],
            "p99_overhead_ms": sql_ms["p99"] - local_ms["p99"],
        },
        "throughput": {"one": one, "many": many, "ratio": many["per_second"] / one["per_second"]},
        "chat": chat,
        "device": where,
    }
    print(f"pgml.transform, the guide's 2 inputs, {args.requests} calls each side, interleaved:")
    print(f"  in-process pipeline   p50 {local_ms['p50']:.2f} ms  p99 {local_ms['p99']:.2f} ms")
    print(
        f"  SELECT pgml.transform p50 {sql_ms['p50']:.2f} ms  p99 {sql_ms['p99']:.2f} ms  "
        f"(+{result['latency']['p50_overhead_ms']:.2f} / +{result['latency']['p99_overhead_ms']:.2f} ms)"
    )
    print(
        f"throughput: 1 session {one['per_second']:.1f}/s (p99 {one['latency_ms']['p99']:.1f} ms); "
        f"{args.clients} sessions {many['per_second']:.1f}/s (p99 {many['latency_ms']['p99']:.1f} ms); "
        f"ratio {result['throughput']['ratio']:.2f}x"
    )
    print(
        f"chat completions ({args.chat_model} Llama, {chat['dtype']}), {NEW_TOKENS} tokens: "
        f"OpenSourceAI {chat['lane_tokens_per_s']:.1f} tokens/s vs "
        f"in-process generate {chat['in_process_tokens_per_s']:.1f} tokens/s: {chat['ratio']:.2f}x"
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="a server to create the benchmark database on (default: embedded)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--chat-rounds", type=int, default=10)
    parser.add_argument(
        "--chat-model", choices=["small", "1b"], default="small", help="1b: a 1.07B bf16 Llama (for a GPU)"
    )
    main_with_json(parser, run)
