"""The serving process's loop (serving/server.py) against a real PostgreSQL: it claims when a request's NOTIFY wakes
it, and claims again after a batch only if a request was queued meanwhile or the claim took all it may. A claim
after every batch, whatever was queued, cost each one-text call's caller a millisecond of CPU on 2 cores, at the
moment it wakes up to read its answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg.types.json import Jsonb

from pgml_tuned.db import Pool
from pgml_tuned.serving.requests import Request
from pgml_tuned.serving.server import Server, ServingConfig
from tests.conftest import USER

Conn = psycopg.Connection[dict[str, Any]]


def submit(ops: Conn, n: int, texts: int = 1) -> list[int]:
    """`n` requests in one transaction (one NOTIFY for all)."""
    with ops.transaction():
        return [
            int(
                ops.execute(
                    "SELECT pgml._request_submit(%s, 'embed', 'm/x', NULL, %s) AS id", (USER, Jsonb(["t"] * texts))
                ).fetchone()["id"]
            )
            for _ in range(n)
        ]


def test_the_loop_claims_when_woken_and_after_a_full_claim_only(
    ops: Conn, su: Conn, worker_dsn: str, tmp_path: Path
) -> None:
    claims: list[int] = []  # how many requests each claim took
    served: list[list[int]] = []
    during: list[list[int]] = []  # requests queued while the first batch was being served

    async def run() -> None:
        pool = Pool(worker_dsn, app="test loop", max_size=2)
        config = ServingConfig(
            dsn=worker_dsn,
            serving_id="w/loop",
            cache_dir=tmp_path / "serving",
            poll_seconds=30.0,  # no timer claims within this test: every claim is a wake-up's or a drain's
            max_batch=2,
            max_batch_inputs=3,
        )
        server = Server(config, pool)
        claim = server.requests.claim

        async def counted_claim(max_n: int, max_inputs: int) -> list[Request]:
            got = await claim(max_n, max_inputs)
            claims.append(len(got))
            return got

        async def serve_batch(batch: list[Request]) -> None:  # answered at once, no model
            served.append([r.id for r in batch])
            if len(served) == 1:
                during.append(await anyio.to_thread.run_sync(submit, ops, 1))
            await server.requests.answer_all([(r.id, {"ok": True}) for r in batch])

        server.requests.claim = counted_claim  # type: ignore[method-assign]
        server.serve_batch = serve_batch  # type: ignore[method-assign]

        async def settle() -> None:  # until the loop listens and is back waiting (0.5 s with no new claim)
            seen = -1
            while seen != len(claims) or not server.listening:
                seen = len(claims)
                await anyio.sleep(0.5)

        async with anyio.create_task_group() as tg:
            tg.start_soon(server.run)
            with anyio.fail_after(20):
                await settle()
                assert claims == [0]  # the listener's first wake-up: nothing queued

                # one request; another queued while it is served: claimed at once (its NOTIFY), then nothing
                first = await anyio.to_thread.run_sync(submit, ops, 1)
                await settle()
                assert served == [first, during[0]], served
                assert claims == [0, 1, 1], claims  # no claim after the second batch: nothing woke the loop

                # three requests at once (one NOTIFY), two a claim: the full claim is followed by another
                three = await anyio.to_thread.run_sync(submit, ops, 3)
                await settle()
                assert served[2:] == [three[:2], three[2:]], served
                assert claims[3:] == [2, 1], claims

                # two requests of two texts each: one claim takes both (the second starts before 3 texts,
                # max_batch_inputs), which is as many texts as a claim may take: one more claim, which finds none
                two = await anyio.to_thread.run_sync(submit, ops, 2, 2)
                await settle()
                assert served[4:] == [two], served
                assert claims[5:] == [2, 0], claims
            tg.cancel_scope.cancel()
        await pool.close()

    anyio.run(run)
    assert su.execute("SELECT count(*) AS n FROM pgml.requests WHERE status <> 'done'").fetchone() == {"n": 0}


def test_an_answers_lock_is_released_only_once_the_answer_is_committed(ops: Conn, su: Conn, worker_dsn: str) -> None:
    """Requests._write sends the answer (BEGIN, answer, COMMIT) and the unlock in one round trip: a caller woken by
    the lock always reads the answer (if the unlock ran first, some would read 'running')."""
    from pgml_tuned.serving.requests import Requests

    seen: list[str] = []

    async def run() -> None:
        pool = Pool(worker_dsn, app="test answer", max_size=1)
        requests = Requests(pool, "w/answer", 5.0)
        try:
            for _ in range(40):
                (rid,) = await anyio.to_thread.run_sync(submit, ops, 1)
                (claimed,) = await requests.claim(1, 10)
                assert claimed.id == rid

                def wait_and_read(rid: int = rid) -> str:  # a caller: waits on the lock, then reads at once
                    su.execute(
                        "SELECT pg_advisory_lock_shared(pgml._request_lock_space(), pgml._request_lock_key(%s))", (rid,)
                    )
                    su.execute(
                        "SELECT pg_advisory_unlock_shared(pgml._request_lock_space(), pgml._request_lock_key(%s))",
                        (rid,),
                    )
                    return str(
                        su.execute("SELECT status FROM pgml.requests WHERE id = %s", (rid,)).fetchone()["status"]
                    )

                async with anyio.create_task_group() as tg:

                    async def caller() -> None:
                        seen.append(await anyio.to_thread.run_sync(wait_and_read))

                    tg.start_soon(caller)
                    await anyio.sleep(0.01)  # the caller is waiting on the lock
                    assert await requests.answer_all([(rid, {"n": 1})]) == {rid}
        finally:
            await requests.close()
            await pool.close()

    anyio.run(run)
    assert seen == ["done"] * 40, seen


def test_a_caller_whose_request_lost_its_lock_polls_instead_of_spinning(conn: Conn, su: Conn, worker_dsn: str) -> None:
    """A request stays `running` after its serving process's lane connection broke (its lock went with it) until the
    lease runs out: its waiting caller sleeps between looks at it (pg_sleep), where it took the free lock and read
    the status in a tight loop; the answer, once there, still reaches it."""
    import threading

    import numpy as np

    from pgml_tuned.db import q
    from pgml_tuned.serving.requests import Float4s
    from tests.conftest import connect

    got: list[Any] = []
    pid = conn.execute("SELECT pg_backend_pid() AS p").fetchone()["p"]
    caller = threading.Thread(
        target=lambda: got.append(conn.execute("SELECT pgml.embed('m/x', 'lost') AS v").fetchone()["v"])
    )
    caller.start()
    try:
        with connect(worker_dsn) as lane:  # claims it, then goes: its lock with it
            for _ in range(200):
                if lane.execute("SELECT id FROM pgml._requests_claim('w/lost', 1, 60)").fetchall():
                    break
                anyio.run(anyio.sleep, 0.02)
            else:
                raise AssertionError("the call's request was never queued")
        samples = []
        for _ in range(40):
            row = su.execute("SELECT state, wait_event FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
            samples.append((row["state"], row["wait_event"]))
            anyio.run(anyio.sleep, 0.025)
        sleeping = sum(1 for state, event in samples if event == "PgSleep")
        assert sleeping >= len(samples) // 2, samples
        assert caller.is_alive()
        rid = su.execute("SELECT id FROM pgml.requests WHERE status = 'running'").fetchone()["id"]
        with connect(worker_dsn) as worker:
            answered = worker.execute(
                q("answer_vectors"),
                {"serving_id": "w/lost", "ids": [rid], "counts": [1], "dim": 3, "flat": Float4s(np.ones(3))},
            ).fetchall()
            assert answered == [{"id": rid}]
    finally:
        caller.join(30)
    assert got == [[1.0, 1.0, 1.0]]
