"""The serving process, started (and restarted when it dies) by the daemon (worker/serving.py):

    python -m pgml_tuned.serving      (its settings and the DSN arrive as JSON on stdin)

Its environment is a training child's (worker/process.py child_env: no credential); it opens its own
connections, as its own login (a member of pgml_serving: the inference lane's functions, no table) or, when it has
none, as the worker's login in role pgml_serving; it logs JSON lines on stderr (the daemon forwards them), dies
with the daemon, and on SIGTERM puts the requests it is answering back in the queue and exits.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import anyio

from .. import logconfig
from ..child.__main__ import die_with_parent
from ..db import Pool, act_as
from .server import Server, ServingConfig


async def serve(config: ServingConfig) -> None:
    pool = Pool(config.dsn, app=f"pgml-tuned {config.serving_id}", max_size=4)
    async with anyio.create_task_group() as tg:

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                async for _ in received:
                    tg.cancel_scope.cancel()

        tg.start_soon(stop_on_signal)
        try:
            await Server(config, pool).run()
        finally:
            await pool.close()
            tg.cancel_scope.cancel()


def main() -> int:
    die_with_parent()
    payload = json.loads(sys.stdin.read())
    logconfig.configure("json", payload.get("log_level", "info"))
    if payload.get("role"):  # no login of its own: the worker's, as pgml_serving (worker/serving.py)
        act_as(payload["role"])
    config = ServingConfig(
        dsn=payload["dsn"],
        serving_id=payload["serving_id"],
        cache_dir=Path(payload["cache_dir"]),
        model_cache_mb=int(payload["model_cache_mb"]),
        listen_dsn=payload.get("listen_dsn"),
        lora_serving=payload.get("lora_serving", "multi"),
        adapter_cache_count=int(payload.get("adapter_cache_count", 64)),
        adapter_cache_mb=int(payload.get("adapter_cache_mb", 1024)),
    )
    anyio.run(serve, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
