"""Recipe `noop`: a diagnostic task for queues and operations — no data, no model.

hyperparams: {"seconds": 0.0, "fail": "message", "steps": 0, "probe": ["/path", ...], "expect_token_sha256": "<hex>"}.
With `probe` it first logs one row saying who the child runs as (uid, gid, groups) and, for each path, whether it
could read it (never what it holds): an administrator's check of a worker's sandbox (its key file must say
"PermissionError"). With `expect_token_sha256` it checks that the job's token (a named credential's, or an inline
one) reached it: it fails unless the sha256 of the token it was given is that (the token is never shown). It logs
`steps` events (spread over `seconds`), then either fails with `fail` or succeeds with metrics {"slept": seconds}.
With "resources": {"procs": N} it runs as N ranks (child/dist.py); "fail_rank": R makes rank R alone crash at once
with `fail` (an uncaught exception) while the others work on: how a job ends when one of its ranks dies.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

from ..child.context import JobContext
from ..errors import JobError


def probe(paths: list[str]) -> dict[str, object]:
    """Who this process runs as, and for each path True (readable) or why not (the exception's name)."""
    readable: dict[str, str | bool] = {}
    for path in paths:
        try:
            with open(path, "rb") as fh:
                fh.read(1)
            readable[path] = True
        except OSError as e:
            readable[path] = type(e).__name__
    return {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "readable": readable}


def run(ctx: JobContext) -> None:
    fail_rank = ctx.hyperparams.get("fail_rank")
    if fail_rank is not None:
        if ctx.rank.rank == int(fail_rank):
            raise RuntimeError(str(ctx.hyperparams.get("fail") or f"rank {fail_rank} crashed"))
        ctx.hyperparams = {k: v for k, v in ctx.hyperparams.items() if k != "fail"}
    if "probe" in ctx.hyperparams:
        ctx.log(probe([str(p) for p in ctx.hyperparams["probe"] or []]))
    expected = ctx.hyperparams.get("expect_token_sha256")
    if expected is not None:
        token = ctx.secret("training_args.hub_token", "hub_token", "token")
        if token is None:
            raise JobError("expect_token_sha256: the job has no token")
        if hashlib.sha256(token.encode()).hexdigest() != str(expected).lower():
            raise JobError("expect_token_sha256: the job's token is not the expected one")
    seconds = float(ctx.hyperparams.get("seconds", 0))
    steps = int(ctx.hyperparams.get("steps", 0))
    if steps:
        ctx.start_over()  # a later attempt logs its steps again: earlier attempts' move apart
    for step in range(1, steps + 1):
        if ctx.stop_requested:
            raise ctx.interrupted(f"at step {step}")
        time.sleep(seconds / steps)
        ctx.log({"loss": 1.0 / step, "step": step, "max_steps": steps})
    if not steps:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if ctx.stop_requested:
                raise ctx.interrupted("while sleeping")
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    if ctx.hyperparams.get("fail"):
        raise JobError(str(ctx.hyperparams["fail"]))
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "result.json").write_text('{"noop": true}')
        ctx.save_results(Path(d), {"slept": seconds})
