"""Many LoRA adapters on one base model: the serving process's multi-LoRA lane against its merged-copy lane.

    python bench/multi_lora.py [--dsn DSN] [--hidden 256] [--layers 4] [--rank 16] [--tokens 16] [--rounds 3]
                               [--many 200] [--model small|1b] [--json out.json]

Without --dsn it starts (or reuses) the embedded PostgreSQL under .pgml-bench/; either way it creates a fresh
migrated database and drops it at the end. The base: a random Llama (tests/support/models.py, --hidden, --layers;
--model 1b: bench/gpu_conversation.py's 1.07B bf16 Llama, for a GPU: bench/gpu_check.sh) in an offline hub cache
as `bench/llama`; 16 + 10 + --many LoRA adapters (rank --rank on q/k/v/o, random non-zero B)
stored in pgml.files as models of the bench's user, base `bench/llama`. A daemon (`pgml-tuned serve`) runs the
serving process; requests go in through pgml._request_submit, 32 in one transaction (32 concurrent callers), each
a chat of --tokens new tokens (min_new_tokens = max_new_tokens: the same work in every lane), greedy.

In one run, printed side by side:
- multi lane (--lora-serving multi): 32 requests for one adapter vs 32 spread over 16 adapters (2 each), warm:
  completion tokens/s (--rounds rounds, median) and their ratio;
- merged lane (--lora-serving merged, a model cache big enough for 16 copies): the same 32 over 16 adapters,
  warm: tokens/s; the multi lane's over it;
- memory of the models (the serving process's own accounting from its load lines: base weights + adapter weights,
  or 16 merged copies) and the serving process's RSS growth from before the first adapter to after the 16th;
- cold load: an adapter never loaded, one request of 1 new token, from the submit to the answer (PostgreSQL fetch,
  load onto the warm base, first token): p50 / max over 10 adapters;
- --many adapters registered and used round-robin (waves of 32 requests over 32 different adapters) through an
  adapter cache of 32: errors, per-request p50 / p99, the serving process's peak RSS against RSS with the cache full.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DaemonProc, admin_dsn, bench_env, fresh_database, main_with_json, percentile

BASE = "bench/llama"
OWNER = "bench_lora_user"
CHAT = [{"role": "user", "content": "Tell me about shares and films."}]


def build(home: Path, hidden: int, layers: int, rank: int, count: int, size: str) -> tuple[Path, list[Path]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pgml_tuned import hub_cache
    from tests.support.models import build_tiny_llama

    if size == "1b":
        from bench.gpu_conversation import build_model

        base = build_model(home, tiny=False)
    else:
        base = build_tiny_llama(home / "llama", hidden=hidden, layers=layers, heads=4, kv_heads=2)
    hub_cache.add(base, BASE, home / "hf")
    model = AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(
        model, LoraConfig(task_type="CAUSAL_LM", r=rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    adapters = []
    for i in range(count):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        peft.save_pretrained(str(home / f"adapter-{i}"))
        adapters.append(home / f"adapter-{i}")
    return base, adapters


def store(dsn: str, adapters: list[Path]) -> list[int]:
    from tests.support.stored import add_model

    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as su:
        su.execute(f"DO $$BEGIN CREATE ROLE {OWNER} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END$$")
        su.execute(f"GRANT pgml_user TO {OWNER}")
        return [add_model(su, OWNER, f"lora{i}", "conversation", base=BASE, path=p) for i, p in enumerate(adapters)]


class Client:
    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True, row_factory=dict_row)

    def wave(self, models: list[str], tokens: int) -> list[tuple[float, dict[str, Any]]]:
        """All at once (one transaction); per request (seconds from the submit to its answer, the answer)."""
        args = {"max_tokens": tokens, "min_new_tokens": tokens, "temperature": 0}
        started = time.monotonic()
        with self.conn.transaction():
            ids = [
                self.conn.execute(
                    "SELECT pgml._request_submit(%s, 'chat', %s, %s, %s) AS id", (OWNER, m, Jsonb(args), Jsonb(CHAT))
                ).fetchone()["id"]  # type: ignore[index]
                for m in models
            ]
        out: dict[int, tuple[float, dict[str, Any]]] = {}
        while len(out) < len(ids):
            # one statement a look for all the answers still awaited (32 statements every 2 ms took CPU the serving
            # process needs, on two cores): an answer is seen within 5 ms of being there
            pending = [i for i in ids if i not in out]
            rows = self.conn.execute(
                "SELECT i AS request_id, a.* FROM unnest(%s::bigint[]) AS i, LATERAL pgml._request_answer(i) a",
                (pending,),
            ).fetchall()
            for row in rows:
                if row["status"] in ("done", "failed"):
                    out[row["request_id"]] = (time.monotonic() - started, row)
            time.sleep(0.005)
        return [out[i] for i in ids]


def tokens_per_s(client: Client, models: list[str], tokens: int, rounds: int) -> float:
    rates = []
    for _ in range(rounds):
        t0 = time.monotonic()
        got = client.wave(models, tokens)
        wall = time.monotonic() - t0
        failed = [a["error"] for _, a in got if a["status"] != "done"]
        if failed:
            raise RuntimeError(f"{len(failed)} requests failed: {failed[0]}")
        rates.append(sum(a["usage"]["completion_tokens"] for _, a in got) / wall)
    return statistics.median(rates)


def serving_process(daemon: DaemonProc) -> psutil.Process:
    ev = daemon.wait_event(lambda e: e.get("event") == "serving.started", 60)
    return psutil.Process(int(ev["pid"]))


class PeakRss:
    def __init__(self, proc: psutil.Process) -> None:
        self.proc, self.peak, self.stop = proc, proc.memory_info().rss, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.05)

    def done(self) -> int:
        self.stop = True
        self.thread.join()
        return self.peak


def last_load(daemon: DaemonProc) -> dict[str, Any]:
    return next(
        e for e in reversed(daemon.events) if e.get("event") in ("serving.model_loaded", "serving.adapter_loaded")
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    admin = admin_dsn(args.dsn)
    home = Path(tempfile.mkdtemp(prefix="pgml-bench-multi-lora-"))
    _, adapters = build(home, args.hidden, args.layers, args.rank, 16 + 10 + args.many, args.model)
    mb = 2**20
    result: dict[str, Any] = {"model": args.model, "hidden": args.hidden, "layers": args.layers}
    result.update(rank=args.rank, tokens=args.tokens)
    with fresh_database(admin, "bench_multi_lora") as dsn:
        ids = store(dsn, adapters)
        names = [f"pgml:model:{i}" for i in ids]
        sixteen, cold, many = names[:16], names[16:26], names[26:]
        spread = [sixteen[i % 16] for i in range(32)]

        # ---- multi ----
        daemon = DaemonProc(dsn, home, "--adapter-cache-count", "32", "--adapter-cache-mb", "256", env=bench_env(home))
        try:
            proc = serving_process(daemon)
            client = Client(dsn)
            client.wave([BASE], 2)  # the base loaded and warm
            rss0 = proc.memory_info().rss
            client.wave(sixteen, 2)  # 16 adapters loaded
            rss16 = proc.memory_info().rss
            loaded = last_load(daemon)
            base_mb = next(e for e in daemon.events if e.get("event") == "serving.model_loaded")["mb"]
            adapter_mb = loaded["adapter_mb"]
            one = tokens_per_s(client, [sixteen[0]] * 32, args.tokens, args.rounds)
            mixed = tokens_per_s(client, spread, args.tokens, args.rounds)
            cold_s = [client.wave([m], 1)[0][0] for m in cold]
            # --many round-robin through an adapter cache of 32
            peak = PeakRss(proc)
            full_rss = proc.memory_info().rss
            latencies, errors = [], 0
            for start in range(0, len(many), 32):
                for seconds, a in client.wave(many[start : start + 32], args.tokens // 2 or 1):
                    latencies.append(seconds)
                    errors += a["status"] != "done"
            peak_rss = peak.done()
            stats = last_load(daemon)["stats"]
        finally:
            daemon.stop()
        result["multi"] = {
            "tokens_per_s_one_adapter": round(one, 1),
            "tokens_per_s_16_adapters": round(mixed, 1),
            "ratio_16_vs_1": round(mixed / one, 3),
            "base_mb": base_mb,
            "adapters_mb_16": adapter_mb,
            "adapter_mb_each": round(adapter_mb / 16, 3),
            "model_memory_mb": round(base_mb + adapter_mb, 2),
            "rss_growth_16_adapters_mb": round((rss16 - rss0) / mb, 1),
            "cold_load_to_first_token_s": {
                "p50": round(statistics.median(cold_s), 3),
                "max": round(max(cold_s), 3),
                "n": len(cold_s),
            },
            f"round_robin_{len(many)}": {
                "requests": len(latencies),
                "errors": errors,
                "p50_s": round(percentile(latencies, 50), 3),
                "p99_s": round(percentile(latencies, 99), 3),
                "rss_cache_full_mb": round(full_rss / mb, 1),
                "rss_peak_mb": round(peak_rss / mb, 1),
                "adapter_loads": stats["adapter_loads"],
                "adapter_evictions": stats["adapter_evictions"],
            },
        }

        # ---- merged (the old lane) ----
        daemon = DaemonProc(dsn, home, "--lora-serving", "merged", "--model-cache-mb", "100000", env=bench_env(home))
        try:
            proc = serving_process(daemon)
            client = Client(dsn)
            client.wave([BASE], 2)
            rss0 = proc.memory_info().rss
            client.wave(sixteen, 2)
            rss16 = proc.memory_info().rss
            merged_mb = sum(e["mb"] for e in daemon.events if e.get("event") == "serving.model_loaded") - base_mb
            merged = tokens_per_s(client, spread, args.tokens, args.rounds)
        finally:
            daemon.stop()
        result["merged"] = {
            "tokens_per_s_16_adapters": round(merged, 1),
            "model_memory_mb_16_copies": round(merged_mb, 2),
            "rss_growth_16_adapters_mb": round((rss16 - rss0) / mb, 1),
        }
    m = result["multi"]
    budget = (m["base_mb"] + 16 * m["adapter_mb_each"]) * 1.10
    result["targets"] = {
        "16 vs 1 adapter tokens/s (>= 0.8)": m["ratio_16_vs_1"],
        "multi vs merged tokens/s": round(m["tokens_per_s_16_adapters"] / merged, 2),
        "multi model memory MB (<= base + 16 adapters + 10 %)": f"{m['model_memory_mb']} <= {budget:.2f}",
        "merged model memory MB": result["merged"]["model_memory_mb_16_copies"] + m["base_mb"],
        "cold load p50 s (< 1)": m["cold_load_to_first_token_s"]["p50"],
    }
    print(f"{'':44} {'multi':>12} {'merged':>12}")
    print(f"{'tokens/s, 32 requests over 16 adapters':44} {m['tokens_per_s_16_adapters']:>12} {merged:>12.1f}")
    print(f"{'tokens/s, 32 requests for 1 adapter':44} {m['tokens_per_s_one_adapter']:>12} {'':>12}")
    print(f"{'model memory MB (base + 16 adapters)':44} {m['model_memory_mb']:>12} {m['base_mb'] + merged_mb:>12.1f}")
    print(
        f"{'RSS growth MB, 16 adapters loaded':44} {m['rss_growth_16_adapters_mb']:>12} "
        f"{result['merged']['rss_growth_16_adapters_mb']:>12}"
    )
    print(f"{'cold load to first token p50 s':44} {m['cold_load_to_first_token_s']['p50']:>12}")
    rr = m[f"round_robin_{len(many)}"]
    print(
        f"{len(many)} adapters round-robin: {rr['requests']} requests, {rr['errors']} errors, p50 {rr['p50_s']} s, "
        f"p99 {rr['p99_s']} s, RSS {rr['rss_cache_full_mb']} MB with the cache full → peak {rr['rss_peak_mb']} MB, "
        f"{rr['adapter_loads']} adapter loads, {rr['adapter_evictions']} evictions"
    )
    for k, v in result["targets"].items():
        print(f"  {k}: {v}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--many", type=int, default=200)
    parser.add_argument("--model", choices=["small", "1b"], default="small", help="1b: a 1.07B bf16 Llama (GPU)")
    main_with_json(parser, run)


if __name__ == "__main__":
    main()
