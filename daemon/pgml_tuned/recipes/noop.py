"""Recipe `noop`: a diagnostic task for queues and operations — no data, no model.

hyperparams: {"seconds": 0.0, "fail": "message", "steps": 0, "expect_token_sha256": "<hex>"}. It logs `steps`
events (spread over `seconds`), then either fails with `fail` or succeeds with metrics {"slept": seconds}.
With `expect_token_sha256` it first checks that the job's token (a named credential's, or an inline one)
reached it: it fails unless the sha256 of the token it was given is that (the token is never shown).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

from ..child.context import JobContext
from ..errors import Interrupted, JobError


def run(ctx: JobContext) -> None:
    expected = ctx.hyperparams.get("expect_token_sha256")
    if expected is not None:
        token = ctx.secret("training_args.hub_token", "hub_token", "token")
        if token is None:
            raise JobError("expect_token_sha256: the job has no token")
        if hashlib.sha256(token.encode()).hexdigest() != str(expected).lower():
            raise JobError("expect_token_sha256: the job's token is not the expected one")
    seconds = float(ctx.hyperparams.get("seconds", 0))
    steps = int(ctx.hyperparams.get("steps", 0))
    for step in range(1, steps + 1):
        if ctx.stop_requested:
            raise Interrupted(f"stopped by SIGTERM at step {step}")
        time.sleep(seconds / steps)
        ctx.log({"loss": 1.0 / step, "step": step, "max_steps": steps})
    if not steps:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if ctx.stop_requested:
                raise Interrupted("stopped by SIGTERM")
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    if ctx.hyperparams.get("fail"):
        raise JobError(str(ctx.hyperparams["fail"]))
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "result.json").write_text('{"noop": true}')
        ctx.save_results(Path(d), {"slept": seconds})
