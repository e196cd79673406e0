"""What the commands print: JSON values, aligned tables, a job's progress and final lines, and the lines that
follow jobs live (`wait`, `logs --follow`)."""

from __future__ import annotations

import datetime
import decimal
import io
import os
import sys
from typing import Any


def plain(value: Any) -> Any:
    """A database value as JSON keeps it: numbers stay numbers (numeric a float), intervals are seconds."""
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def cell(value: Any) -> str:
    """A table cell: `-` for nothing, 4 significant digits for a float, whole seconds for an interval."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, datetime.timedelta):
        return str(value - datetime.timedelta(microseconds=value.microseconds))
    return str(value)


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Aligned columns under their names (numbers right-aligned), two spaces apart."""
    if not rows:
        return []
    cols = list(rows[0])
    cells = [[cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    numeric = [all(isinstance(r[c], int | float | decimal.Decimal) or r[c] is None for r in rows) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append(
            "  ".join(
                v.rjust(w) if num else v.ljust(w) for v, w, num in zip(row, widths, numeric, strict=True)
            ).rstrip()
        )
    return lines


def first_line(text: str | None, width: int = 60) -> str | None:
    if not text:
        return None
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def key_metric(task: str | None, metrics: dict[str, Any] | None) -> tuple[str, float] | None:
    """The one number that says how good a job's model is: eval_accuracy (else eval_f1) for a classifier,
    eval_loss for a conversation model; for other tasks the first of these that is there."""
    order = ("eval_loss",) if task == "conversation" else ("eval_accuracy", "eval_f1", "eval_loss")
    for name in order:
        value = (metrics or {}).get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return name, float(value)
    return None


def eval_part(metrics: dict[str, Any] | None) -> str:
    """`eval_accuracy 0.91 eval_f1 0.9 eval_loss 0.31`: the numeric eval_* values (no runtimes)."""
    skip = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_epoch")
    return " ".join(
        f"{k} {cell(float(v))}"
        for k, v in sorted((metrics or {}).items())
        if k.startswith("eval_") and k not in skip and isinstance(v, int | float) and not isinstance(v, bool)
    )


def progress_line(job: dict[str, Any]) -> str:
    """One line of a job's live progress, from job_progress(): `job 12 running  step 40/120  33.3%  ETA 0:01:05
    loss 0.4123  eval_loss 0.39 eval_accuracy 0.81`. `pgml-tuned wait` prints it; `logs --follow` may too."""
    parts = [f"job {job['id']} {job['status']}"]
    if job["step"] is not None:
        parts.append(f"step {job['step']}/{job['max_steps'] if job['max_steps'] is not None else '?'}")
    if job["progress_pct"] is not None:
        parts.append(f"{float(job['progress_pct']):.1f}%")
    if job["eta"] is not None:
        parts.append(f"ETA {cell(job['eta'])}")
    if job["last_loss"] is not None:
        parts.append(f"loss {cell(float(job['last_loss']))}")
    evals = eval_part(job.get("last_eval"))
    if evals:
        parts.append(evals)
    return "  ".join(parts)


def final_line(job: dict[str, Any]) -> str:
    """The line a finished job ends with: its metrics, its model id and how to download the model; or why it
    failed."""
    if job["status"] == "succeeded":
        evals = eval_part(job["metrics"])
        model = job["model_id"]
        fetch = f"; model {model}: pgml-tuned download {model} ./model-{model}" if model is not None else ""
        return f"job {job['id']} succeeded" + (f": {evals}" if evals else "") + fetch
    if job["status"] == "failed":
        return f"job {job['id']} failed: {first_line(job['error'], 300) or 'no reason recorded'}"
    return f"job {job['id']} {job['status']}"


class LiveLines:
    """Lines that follow jobs: on a terminal rewritten in place (one line a job); elsewhere (a pipe, a file, CI)
    printed as plain lines: a job's line at once when its status changed, else when it changed and at most every
    `interval` seconds."""

    def __init__(self, stream: Any = None, interval: float = 10.0, *, in_place: bool = True) -> None:
        self.stream = stream or sys.stdout
        self.tty = in_place and bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self.shown = 0  # lines drawn in place (tty)
        self.last: dict[int, tuple[str, float]] = {}

    def update(self, lines: dict[int, str], now: float) -> None:
        if self.tty:
            up = f"\x1b[{self.shown}F" if self.shown else ""
            width = self.width()  # a line that wrapped would take two rows: the next draw would go up too few
            self.stream.write(up + "".join(f"\x1b[2K{line[:width]}\n" for line in lines.values()))
            self.shown = len(lines)
        else:
            for job, line in lines.items():
                before = self.last.get(job)
                moved = before is not None and before[0].split("  ")[0] != line.split("  ")[0]  # e.g. queued → running
                if before is None or moved or (before[0] != line and now - before[1] >= self.interval):
                    self.stream.write(line + "\n")
                    self.last[job] = (line, now)
        self.stream.flush()

    def width(self) -> int:
        try:
            return max(20, os.get_terminal_size(self.stream.fileno()).columns - 1)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            return 200

    def finish(self, job: int, line: str) -> None:
        """Print a job's final line; on a terminal it takes the place of the job's live line."""
        if self.tty and self.shown:
            self.stream.write(f"\x1b[{self.shown}F\x1b[2K{line}\n" + ("\n" * (self.shown - 1)))
            self.shown -= 1
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def fleet_lines(workers: list[dict[str, Any]]) -> list[str]:
    """`pgml-tuned status`'s workers section: one line of counts, then a row per worker."""
    if not workers:
        return ["workers: none registered (start one: pgml-tuned serve)"]
    states = [s for s in ("live", "late", "gone", "stopped") if any(w["state"] == s for w in workers)]
    counts = ", ".join(f"{sum(w['state'] == s for w in workers)} {s}" for s in states)
    shown = [
        {
            "worker": w["id"],
            "state": w["state"],
            "heartbeat": f"{w['heartbeat_age']}s ago",
            "slots": f"{w['free_slots']}/{w['concurrency']} free",
            "gpus": f"{w['free_gpus']}/{w['gpus']} free" if w["gpus"] else None,
            "devices": ", ".join(
                f"{d.get('index')}:{d.get('name') or '?'}" + (f" {d['memory_mb']} MB" if d.get("memory_mb") else "")
                for d in w["devices"]
            ),
            "running": ",".join(str(j) for j in w["running"]),
            "models": ", ".join(w["models_cached"] or []),  # NULL: not shown to users
            "version": w["version"],
        }
        for w in workers
    ]
    return [f"workers: {counts}", *table(shown)]
