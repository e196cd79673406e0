"""The serving process's loop (one root task group):

- listener      LISTEN pgml_requests on a connection of its own: a typed wake-up, never data
- housekeeping  every poll_seconds: renew the leases of the requests it is answering, release those whose serving
                process stopped renewing (any process's: retried once, then failed), delete what nobody will read
- the loop      claim up to max_batch queued requests (FOR UPDATE SKIP LOCKED), group them by the model their
                forward pass runs on (an unmerged LoRA adapter's base: requests for different adapters of one base
                and for the base itself form one group, each row through its own adapter) and by compatible
                args, run each group as one batch in a thread (the event loop stays free to renew
                leases and to stream chunks), answer each request, claim again if a request was queued
                meanwhile (its NOTIFY woke the loop) or the claim was full. Requests that arrive while a batch
                runs form the next batch: dynamic batching without waiting on purpose.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread

from .. import logconfig, model_refs
from ..db import RETRYABLE, Pool, backoff_delays, connect
from ..errors import JobError
from ..listening import ListenUnavailable, listen, polling_instead
from . import cache, inference
from .admission import Admission
from .requests import CHANNEL, Request, Requests

log = logconfig.get("pgml_tuned.serving")

MiB = 1024 * 1024
GENERATE_BATCH = 32  # prompts per generate() call
CLASSIFY_ANSWER_TEXTS = 256  # a classification group is answered this many texts at a time (its first requests first)


@dataclass(frozen=True)
class ServingConfig:
    dsn: str
    serving_id: str
    cache_dir: Path
    model_cache_mb: int = 4096
    lease_seconds: float = 6.0
    poll_seconds: float = 1.0
    max_batch: int = 64
    # texts one claim takes past its first request: a submitter's 1000-text requests do not fill a batch that
    # another's one text waits behind (the claim is fair across submitters: 0033_fair_lanes.sql)
    max_batch_inputs: int = 512
    # after a batch of several requests (callers are concurrent), wait this long before claiming again, so that
    # the next requests of the callers just answered join one batch instead of trickling in one by one (8 sessions
    # on 2 CPUs: 4.4 requests a batch without it, 7.5 with it); a lone caller's requests are claimed at once
    batch_window_seconds: float = 0.012
    # a direct connection (not through a transaction pooler) for LISTEN and the lane's session advisory locks
    listen_dsn: str | None = None
    lora_serving: str = "multi"  # multi: adapters unmerged on one shared base (cache.py); merged: a copy each
    adapter_cache_count: int = 64
    adapter_cache_mb: int = 1024

    @property
    def direct_dsn(self) -> str:
        return self.listen_dsn or self.dsn


class Server:
    def __init__(self, config: ServingConfig, pool: Pool) -> None:
        self.config = config
        self.requests = Requests(pool, config.serving_id, config.lease_seconds, lane_dsn=config.direct_dsn)
        self.cache = cache.ModelCache(config.model_cache_mb * MiB)
        self.adapters = cache.AdapterCache(config.adapter_cache_count, config.adapter_cache_mb * MiB)
        # what /metrics and pgml.worker_status show (each load's log line carries them to the daemon)
        self.stats: dict[str, float] = {
            "base_loads": 0,
            "base_evictions": 0,
            "adapter_loads": 0,
            "adapter_evictions": 0,
            "base_load_seconds": 0.0,
            "adapter_load_seconds": 0.0,
        }
        self.store = cache.SyncStore(config.dsn, config.cache_dir)
        self.admission = Admission(pool, model_refs.Places.from_env())
        self.wake = anyio.Event()
        # LISTEN works: every request queued wakes the loop (otherwise it claims until a claim comes back empty)
        self.listening = False
        self.inflight = False
        self.answered = 0

    async def run(self) -> None:
        self.config.cache_dir.mkdir(parents=True, exist_ok=True)
        log.info(
            "serving.start",
            serving_id=self.config.serving_id,
            model_cache_mb=self.config.model_cache_mb,
            lora_serving=self.config.lora_serving,
            adapter_cache_count=self.config.adapter_cache_count,
            adapter_cache_mb=self.config.adapter_cache_mb,
        )
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._listener)
                tg.start_soon(self._housekeeping)
                await self._loop()
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                with anyio.fail_after(5):
                    released = await self.requests.release_own()
                if released:
                    log.info("serving.released", requests=[r["id"] for r in released])
            with anyio.CancelScope(shield=True):
                await self.requests.close()

    async def _listener(self) -> None:
        delays = backoff_delays(first=0.05, cap=5.0)
        while True:
            try:
                dsn = self.config.direct_dsn
                async with await connect(dsn, app=f"pgml-tuned listen {self.config.serving_id}") as conn:
                    await listen(conn, dsn, (CHANNEL,))
                    delays = backoff_delays(first=0.05, cap=5.0)
                    self.listening = True
                    self.wake.set()  # anything queued while we were not listening
                    try:
                        while True:
                            async for _ in conn.notifies(timeout=10.0):
                                self.wake.set()
                            await conn.execute("SELECT 1")
                    finally:
                        self.listening = False
            except ListenUnavailable as e:  # the loop still claims every poll_seconds
                polling_instead("serving.polling", e, self.config.poll_seconds)
                return
            except RETRYABLE as e:
                delay = next(delays)
                log.warning("serving.listener_reconnect", error=str(e).strip(), retry_in=round(delay, 2))
                await anyio.sleep(delay)

    async def _housekeeping(self) -> None:
        while True:
            await anyio.sleep(self.config.poll_seconds)
            with contextlib.suppress(*RETRYABLE):
                if self.inflight:
                    await self.requests.renew()
                released, expired = await self.requests.housekeeping()
                for row in released:
                    log.warning("request.lease_expired", request_id=row["id"], now=row["status"])
                if expired:
                    log.info("requests.expired", deleted=expired)
            self.wake.set()

    async def _loop(self) -> None:
        while True:
            with anyio.move_on_after(self.config.poll_seconds):
                await self.wake.wait()
            while True:
                self.wake = anyio.Event()  # set by every request queued from here on (the listener's NOTIFY)
                try:
                    batch = await self.requests.claim(self.config.max_batch, self.config.max_batch_inputs)
                except RETRYABLE as e:
                    log.warning("serving.claim_failed", error=str(e).strip())
                    break  # a claim whose reply was lost: its lease runs out and it is retried
                if not batch:
                    break
                self.inflight = True
                try:
                    await self.serve_batch(batch)
                finally:
                    self.inflight = False
                if len(batch) > 1:  # callers are concurrent: let those just answered join the next batch
                    await anyio.sleep(self.config.batch_window_seconds)
                if self.listening and not self.wake.is_set() and not self.filled(batch):
                    # nothing was queued since the claim (a request would have woken us), and the claim left
                    # nothing behind: no claim until one is (it would cost the callers just answered, waking
                    # up now, a millisecond of CPU on a small machine)
                    break

    def filled(self, batch: list[Request]) -> bool:
        """Whether a claim took as much as it may (then more may be queued)."""
        return len(batch) >= self.config.max_batch or (
            sum(len(r.inputs) for r in batch) >= self.config.max_batch_inputs
        )

    # ---- one batch ----
    async def serve_batch(self, batch: list[Request]) -> None:
        groups: dict[tuple[Any, ...], tuple[cache.ModelKey, list[tuple[Request, cache.ModelKey]]]] = {}
        keys: dict[tuple[str, str, str], cache.ModelKey] = {}
        for r in batch:
            try:
                inference.check_args(r.kind, r.args)  # as pgml.request did: nothing else reaches transformers
                who = (r.submitted_by, r.model, cache.family(r.kind))
                key = keys.get(who) or await self.key_for(r)
                keys[who] = key
            except JobError as e:
                await self.requests.fail(r.id, str(e))
                continue
            same_call = inference.batch_key(r.kind, r.args)
            on = key.base_key  # an unmerged adapter's requests run on its base, with the base's own and others'
            group = (on.cache_key, "stream", r.id) if r.stream else (on.cache_key, same_call)
            groups.setdefault(group, (on, []))[1].append((r, key))
        for key, members in groups.values():
            started = time.monotonic()
            for part in by_adapters(members, self.config.adapter_cache_count):
                await self.serve_group(key, part)
            self.answered += len(members)
            log.debug(
                "serving.batch", model=key.name, requests=len(members), ms=round(1000 * (time.monotonic() - started))
            )

    async def serve_group(self, key: cache.ModelKey, members: list[tuple[Request, cache.ModelKey]]) -> None:
        """One forward pass's worth of requests on the model `key` names (each through its own adapter, if any)."""
        reqs = [r for r, _ in members]
        try:
            loaded = await self.model(key)
            names, refused = await self.adapter_names(loaded, members)
            for r, error in refused:
                await self.requests.fail(r.id, error)
            reqs = [r for r in reqs if r.id in names]
            if not reqs:
                return
            if key.family == cache.CLASSIFY:
                await self.classify(loaded, reqs, names)
            elif key.family == cache.EMBED:
                await self.embed(loaded, reqs)
            elif key.family == cache.RANK:
                await self.rank(loaded, reqs)
            else:
                await self.generate(loaded, reqs, names)
        except JobError as e:
            for r in reqs:
                await self.requests.fail(r.id, str(e))
        except Exception as e:  # a bug or a broken model: the requests fail saying so; the process serves on
            log.error("serving.error", model=key.name, error=f"{type(e).__name__}: {e}", tb=traceback.format_exc())
            for r in reqs:
                await self.requests.fail(r.id, f"serving {key.name!r} failed: {type(e).__name__}: {e}")

    async def key_for(self, r: Request) -> cache.ModelKey:
        """The cache key of a request's model, once its submitter passed the checks a load makes (admission.py):
        a hub id, a stored model's id (pgml:<project> is read again for every batch: a new deployment is served at
        once), or a directory's real path."""
        fam = cache.family(r.kind)
        kind = model_refs.kind(r.model)
        if kind == model_refs.DIRECTORY:
            return cache.ModelKey(fam, self.admission.directory(r.model), r.submitted_by)
        if kind == model_refs.HUB:
            await self.admission.check(r.model, r.submitted_by)
            return cache.ModelKey(fam, r.model, r.submitted_by)
        row = await self.requests.stored_model(r.submitted_by, r.model.removeprefix("pgml:"))
        if row is None:
            raise JobError(f"model {r.model!r}: there is no such model that {r.submitted_by} may use")
        if row["status"] != "successful":
            raise JobError(f"model {r.model!r}: model {row['id']} is {row['status']}, not successful")
        name = f"pgml:model:{row['id']}"
        await self.admission.check(name, r.submitted_by)  # for an adapter, the allow-list of its base too
        base = None
        if row["base_model"] and fam in (cache.CLASSIFY, cache.GENERATE) and self.config.lora_serving == "multi":
            base = await self.base_name(row["base_model"], r.submitted_by)
        return cache.ModelKey(fam, name, r.submitted_by, base)

    async def base_name(self, base: str, owner: str) -> str:
        """The cache name of an adapter's recorded base, as a request naming the base itself would key it."""
        kind = model_refs.kind(base)
        if kind == model_refs.DIRECTORY:
            return self.admission.directory(base)
        if kind == model_refs.HUB:
            return base
        row = await self.requests.stored_model(owner, base.removeprefix("pgml:"))
        if row is None:
            raise JobError(f"the base model {base!r} of this adapter: there is no such model that {owner} may use")
        return f"pgml:model:{row['id']}"

    async def adapter_names(
        self, base: cache.Loaded, members: list[tuple[Request, cache.ModelKey]]
    ) -> tuple[dict[int, str], list[tuple[Request, str]]]:
        """Each request's adapter name on `base` (cache.BASE for the base's own requests), loading the adapters not
        loaded yet (each once; those of this batch are never evicted by one another); and the requests whose
        adapter could not be loaded, with why."""
        names: dict[int, str] = {}
        refused: list[tuple[Request, str]] = []
        errors: dict[tuple[str, str], str] = {}
        keep = {k.cache_key for _, k in members if k.base is not None}
        for r, k in members:
            if k.base is None:
                names[r.id] = cache.BASE
                continue
            if k.cache_key not in errors:
                try:
                    names[r.id] = (await self.adapter(base, k, keep)).name
                    continue
                except JobError as e:
                    errors[k.cache_key] = str(e)
            refused.append((r, errors[k.cache_key]))
        return names, refused

    async def adapter(self, base: cache.Loaded, key: cache.ModelKey, keep: set[tuple[str, str]]) -> cache.Adapter:
        loaded = self.adapters.get(key)
        if loaded is not None:
            return loaded
        name = self.adapters.next_name()
        loaded = await anyio.to_thread.run_sync(cache.load_adapter, key, base, self.store, self.store.cache_dir, name)
        evicted = self.adapters.put(loaded, keep)
        for old in evicted:
            owner = self.cache.entries.get(old.base)
            if owner is not None:
                await anyio.to_thread.run_sync(cache.unload_adapter, owner, old.name)
        self.stats["adapter_loads"] += 1
        self.stats["adapter_load_seconds"] += loaded.seconds
        self.stats["adapter_evictions"] += len(evicted)
        self.loaded_line(
            "serving.adapter_loaded",
            model=key.name,
            base=base.key.name,
            kb=round(loaded.nbytes / 1024, 1),
            seconds=round(loaded.seconds, 3),
            evicted=[],
            evicted_adapters=[a.key.name for a in evicted],
        )
        return loaded

    def loaded_line(self, event: str, **fields: Any) -> None:
        """A load's log line: what the cache holds now (the daemon's fleet registry row and /metrics read it)."""
        adapters = [a.key.name for a in self.adapters.entries.values()]
        log.info(
            event,
            **fields,
            cached=[e.key.name for e in self.cache.entries.values()] + adapters,
            loaded={"bases": len(self.cache.entries), "adapters": len(self.adapters.entries)},
            adapter_mb=round(self.adapters.total_bytes / MiB, 2),
            stats={k: round(v, 3) for k, v in self.stats.items()},
        )

    async def model(self, key: cache.ModelKey) -> cache.Loaded:
        loaded = self.cache.get(key)
        if loaded is not None:
            await self.admission.check_private(loaded.hub_ids)
            return loaded
        started = time.monotonic()
        loaded = await anyio.to_thread.run_sync(cache.load, key, self.store, self.store.cache_dir)
        evicted = self.cache.put(loaded)
        dropped = [a for old in evicted for a in self.adapters.drop_base(old.key.cache_key)]  # gone with their base
        seconds = time.monotonic() - started
        self.stats["base_loads"] += 1
        self.stats["base_load_seconds"] += seconds
        self.stats["base_evictions"] += len(evicted)
        self.stats["adapter_evictions"] += len(dropped)
        self.loaded_line(
            "serving.model_loaded",
            model=key.name,
            family=key.family,
            device=loaded.device,
            mb=round(loaded.nbytes / MiB, 1),
            seconds=round(seconds, 3),
            evicted=[e.key.name for e in evicted],
            evicted_adapters=[a.key.name for a in dropped],
        )
        return loaded

    async def classify(self, loaded: cache.Loaded, reqs: list[Request], names: dict[int, str]) -> None:
        async def answers(part: list[Request]) -> list[Any]:
            rows = [names[r.id] for r in part for _ in r.inputs]
            texts = [t for r in part for t in r.inputs]
            got = await anyio.to_thread.run_sync(inference.classify, loaded, texts, part[0].args, rows)
            return split(got, [len(r.inputs) for r in part])

        await self._in_parts(reqs, answers)

    async def embed(self, loaded: cache.Loaded, reqs: list[Request]) -> None:
        """Each request's vectors, a float32 array, sent back in binary (Requests.answer_vectors)."""
        await self._in_parts(
            reqs, lambda part: self._per_text(inference.encode, loaded, part), self.requests.answer_vectors
        )

    async def rank(self, loaded: cache.Loaded, reqs: list[Request]) -> None:
        """inputs are [query, document, ...]: one score per document, in order (pgml.rank sorts and cuts)."""

        async def scores(part: list[Request]) -> list[Any]:
            pairs = [(r.inputs[0], d) for r in part for d in r.inputs[1:]]
            got = await anyio.to_thread.run_sync(inference.rank, loaded, pairs)
            return split(got, [len(r.inputs) - 1 for r in part])

        await self._in_parts(reqs, scores)

    async def _per_text(
        self, run: Callable[[cache.Loaded, list[str], dict[str, Any]], Any], loaded: cache.Loaded, part: list[Request]
    ) -> list[Any]:
        """`run` over the texts of every request of `part` at once (they share their args); per request, its
        texts' results."""
        got = await anyio.to_thread.run_sync(run, loaded, [t for r in part for t in r.inputs], part[0].args)
        return split(got, [len(r.inputs) for r in part])

    async def _in_parts(
        self,
        reqs: list[Request],
        answer: Callable[[list[Request]], Awaitable[list[Any]]],
        send: Callable[[list[tuple[int, Any]]], Awaitable[set[int]]] | None = None,
    ) -> None:
        """In claim order, a few hundred texts at a time, each part answered at once (`send`: answer_all, unless
        given): a short request claimed with a long one is not held until the long one is done."""
        start = 0
        while start < len(reqs):
            end, n = start, 0
            while end < len(reqs) and (end == start or n + len(reqs[end].inputs) <= CLASSIFY_ANSWER_TEXTS):
                n += len(reqs[end].inputs)
                end += 1
            part = reqs[start:end]
            results = await answer(part)
            await (send or self.requests.answer_all)([(r.id, x) for r, x in zip(part, results, strict=True)])
            start = end

    async def generate(self, loaded: cache.Loaded, reqs: list[Request], names: dict[int, str]) -> None:
        kwargs = inference.generation_kwargs(reqs[0].args)  # the group shares its args
        prompts: list[tuple[Request, list[int]]] = []
        for r in reqs:
            try:
                conversations = [r.inputs] if r.kind == "chat" else r.inputs
                tokenizer = self.adapters.tokenizer(names[r.id])
                prompts += [(r, inference.prompt_ids(loaded, r.kind, p, tokenizer)) for p in conversations]
            except JobError as e:
                await self.requests.fail(r.id, str(e))
        answers: dict[int, list[inference.Generated]] = {}
        left = {r.id: 0 for r, _ in prompts}
        for r, _ in prompts:
            left[r.id] += 1
        for i in range(0, len(prompts), GENERATE_BATCH):
            part = prompts[i : i + GENERATE_BATCH]
            on_text = self.streamer(part[0][0]) if part[0][0].stream else None
            rows = [names[r.id] for r, _ in part]
            out = await anyio.to_thread.run_sync(
                inference.generate, loaded, [p for _, p in part], kwargs, on_text, rows
            )
            for (r, _), answer in zip(part, out, strict=True):
                answers.setdefault(r.id, []).append(answer)
                left[r.id] -= 1
                if not left[r.id]:  # its last prompt: answered now, not after the rest of the group
                    await self._answer_generated(r, answers.pop(r.id))

    async def _answer_generated(self, r: Request, got: list[inference.Generated]) -> None:
        if r.kind == "chat":
            result: Any = {"role": "assistant", "content": got[0].text, "finish_reason": got[0].finish_reason}
        else:
            result = [{"generated_text": a.text, "finish_reason": a.finish_reason} for a in got]
        await self.requests.answer(r.id, result, inference.usage(got))

    def streamer(self, r: Request) -> Any:
        """A callback for the generating thread: each piece of text becomes the next chunk row, committed at once
        (the client reads it while generation runs)."""
        seq = 0

        def on_text(text: str) -> None:
            nonlocal seq
            anyio.from_thread.run(self.requests.chunk, r.id, seq, [text])
            seq += 1

        return on_text


def by_adapters(
    members: list[tuple[Request, cache.ModelKey]], limit: int
) -> list[list[tuple[Request, cache.ModelKey]]]:
    """A group cut, in order, into parts of at most `limit` different adapters (the adapter cache holds a part's
    adapters at once)."""
    parts: list[list[tuple[Request, cache.ModelKey]]] = [[]]
    seen: set[tuple[str, str]] = set()
    for r, k in members:
        if k.base is not None and k.cache_key not in seen:
            if len(seen) >= limit:
                parts.append([])
                seen = set()
            seen.add(k.cache_key)
        parts[-1].append((r, k))
    return parts


def split(values: Any, sizes: list[int]) -> list[Any]:
    """`values` (a list, or an array's rows) cut into consecutive parts of these sizes."""
    out, at = [], 0
    for n in sizes:
        out.append(values[at : at + n])
        at += n
    return out
