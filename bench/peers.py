"""The queues a user would pick instead of pgml-tuned, for bench/pickup.py --peers: procrastinate (psycopg 3) and
pgqueuer (asyncpg driver). Each runs as its own worker subprocess (`python bench/peers.py SYSTEM DSN`) with a
no-op task that prints {"id": job id, "t_body": time.time()} when its body starts, on the same server and
database as the pgml-tuned daemon.

Measured like pgml-tuned's jobs, so the numbers compare:
- enqueue: an INSERT of one job row in its own transaction (each system's NOTIFY trigger fires on it), a client
  timestamp right before COMMIT;
- claim ("owned"): a trigger added by this benchmark on the system's job table writes clock_timestamp() into
  bench_claims when the worker's UPDATE sets the job's status to picked/doing (pgml-tuned: the `at` of its own
  job_events 'running' row, also clock_timestamp() in a trigger of the claim statement);
- body started: the worker's task prints time.time() first thing (pgml-tuned: the child running the noop
  recipe, whose first log entry carries its timestamp).

Workers listen (LISTEN/NOTIFY) with a 30 s fallback poll, concurrency 1, as the daemon does here. Install with
`pip install -e '.[bench]'`.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import psycopg

SYSTEMS = ("procrastinate", "pgqueuer")

# the job table, the status that means "claimed", and the INSERT a producer's enqueue amounts to
TABLES = {
    "procrastinate": (
        "procrastinate_jobs",
        "doing",
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args) VALUES ('default', 'noop', '{}') RETURNING id",
    ),
    "pgqueuer": (
        "pgqueuer",
        "picked",
        "INSERT INTO pgqueuer (priority, entrypoint, payload, status) VALUES (0, 'noop', NULL, 'queued') RETURNING id",
    ),
}

CLAIM_MARK = """
CREATE TABLE IF NOT EXISTS bench_claims (system text, job_id bigint, at timestamptz);
CREATE OR REPLACE FUNCTION bench_claim_mark() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_claims VALUES (TG_ARGV[0], NEW.id, clock_timestamp());
    RETURN NULL;
END $$;
"""


def install(dsn: str, system: str) -> None:
    """The system's own schema (its own installer), then the claim-marking trigger on its job table."""
    import anyio

    if system == "procrastinate":
        app = procrastinate_app(dsn)

        async def go() -> None:
            async with app.open_async():
                await app.schema_manager.apply_schema_async()

    else:

        async def go() -> None:
            from pgqueuer import Queries
            from pgqueuer.db import AsyncpgDriver

            conn = await asyncpg_connect(dsn)
            try:
                await Queries(AsyncpgDriver(conn)).install()
            finally:
                await conn.close()

    anyio.run(go)
    table, status, _ = TABLES[system]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(CLAIM_MARK)
        conn.execute(
            f"CREATE TRIGGER bench_claim_mark AFTER UPDATE OF status ON {table} FOR EACH ROW "
            f"WHEN (NEW.status = '{status}' AND OLD.status IS DISTINCT FROM NEW.status) "
            f"EXECUTE FUNCTION bench_claim_mark('{system}')"
        )


async def asyncpg_connect(dsn: str) -> Any:
    """asyncpg takes URLs, not libpq's key=value strings: the same parameters, by name."""
    import asyncpg
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    names = {"host": "host", "port": "port", "user": "user", "password": "password", "dbname": "database"}
    return await asyncpg.connect(**{names[k]: v for k, v in params.items() if k in names})


def procrastinate_app(dsn: str) -> Any:
    import procrastinate

    return procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))


def body_started(job_id: int) -> None:
    print(json.dumps({"id": int(job_id), "t_body": time.time()}), flush=True)


def worker_main(system: str, dsn: str) -> int:
    import asyncio

    if system == "procrastinate":
        app = procrastinate_app(dsn)

        @app.task(name="noop", queue="default", pass_context=True)
        async def noop(context: Any) -> None:
            body_started(context.job.id)

        async def run() -> None:
            async with app.open_async():
                print("ready", flush=True)
                await app.run_worker_async(
                    queues=["default"], concurrency=1, listen_notify=True, fetch_job_polling_interval=30
                )

    else:

        async def run() -> None:
            from pgqueuer import PgQueuer
            from pgqueuer.db import AsyncpgDriver

            conn = await asyncpg_connect(dsn)
            pgq = PgQueuer(AsyncpgDriver(conn))

            @pgq.entrypoint("noop")
            async def noop(job: Any) -> None:
                body_started(job.id)

            print("ready", flush=True)
            await pgq.run(batch_size=1)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1], sys.argv[2]))
