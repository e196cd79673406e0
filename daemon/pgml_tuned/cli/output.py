"""What the commands print: JSON values, aligned tables, a job's progress and final lines, and the lines that
follow jobs live (`wait`, `logs --follow`)."""

from __future__ import annotations

import contextlib
import datetime
import decimal
import io
import os
import re
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any

# What may never reach the operator's terminal raw: C0 controls but tab and newline (ESC among them: colours,
# cursor moves, title and clipboard sequences), DEL, C1 (0x9b is a one-byte CSI), the bidi embeddings, overrides
# and isolates (a name that reads differently than it is), and the line / paragraph separators.
_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def _escaped(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x7F else f"\\u{code:04x}"  # DEL as \\u007f: valid in a JSON line too


def safe(text: str) -> str:
    """`text` with every control character shown escaped (`\\x1b`, `\\u202e`): what the database holds (project
    names, errors, model names, worker ids, log messages) is anyone's, and a terminal obeys what it is sent. A JSON
    line stays valid JSON: json.dumps escapes all of these but DEL, shown here as \\u007f."""
    return _UNSAFE.sub(_escaped, text)


def safe_event(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> dict[str, Any]:
    """A structlog processor: the event's values (and keys) safe() before the console renderer colours them (a
    value that is not text as its repr(), as the renderer shows it; an exception as it is, for its traceback)."""
    return {safe(str(k)): _safe_value(k, v) for k, v in event.items()}


def _safe_value(key: str, value: Any) -> Any:
    if key in ("exc_info", "exception") or value is None or isinstance(value, bool | int | float):
        return value
    return safe(value if isinstance(value, str) else repr(value))


class SafeStream:
    """sys.stdout / sys.stderr while a command runs (app.main): everything printed goes through safe(). What
    draws on purpose (LiveLines' cursor moves) writes to `raw`, its own text made safe first."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def write(self, text: str) -> int:
        self.raw.write(safe(text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, buffer ...
        return getattr(self.raw, name)


@contextlib.contextmanager
def sanitised() -> Iterator[None]:
    """While a command runs: sys.stdout and sys.stderr through safe() (print, errors, the daemon's log lines)."""
    before = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = SafeStream(raw(sys.stdout)), SafeStream(raw(sys.stderr))
    try:
        yield
    finally:
        sys.stdout, sys.stderr = before


def log_options() -> dict[str, Any]:
    """logconfig.configure()'s arguments for a command: console lines made safe before they are coloured, then
    written to the terminal as they are (JSON lines go through sys.stderr, made safe there)."""
    return {"clean": safe_event, "console_stream": raw(sys.stderr)}


def raw(stream: Any) -> Any:
    """The stream under a SafeStream (itself otherwise)."""
    return stream.raw if isinstance(stream, SafeStream) else stream


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
    return safe(str(value))  # escaped before the widths are measured


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Aligned columns under their names (numbers right-aligned), two spaces apart."""
    if not rows:
        return []
    cols = [safe(c) for c in rows[0]]
    cells = [[cell(r[c]) for c in rows[0]] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    numeric = [all(isinstance(r[c], int | float | decimal.Decimal) or r[c] is None for r in rows) for c in rows[0]]
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
    eval_loss for a conversation model, eval_ndcg@10 for a retrieval model (as pgml._key_metric); for other tasks
    the first of these that is there."""
    order = (
        ("eval_loss",)
        if task == "conversation"
        else ("eval_ndcg@10",)
        if task in ("text-embedding", "text-ranking")
        else ("eval_accuracy", "eval_f1", "eval_loss")
    )
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
        self.stream = raw(stream or sys.stdout)  # its own cursor moves pass; every line is made safe()
        self.tty = in_place and bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self.shown = 0  # lines drawn in place (tty)
        self.last: dict[int, tuple[str, float]] = {}

    def update(self, lines: dict[int, str], now: float) -> None:
        if self.tty:
            up = f"\x1b[{self.shown}F" if self.shown else ""
            width = self.width()  # a line that wrapped would take two rows: the next draw would go up too few
            self.stream.write(up + "".join(f"\x1b[2K{safe(line)[:width]}\n" for line in lines.values()))
            self.shown = len(lines)
        else:
            for job, line in lines.items():
                before = self.last.get(job)
                moved = before is not None and before[0].split("  ")[0] != line.split("  ")[0]  # e.g. queued → running
                if before is None or moved or (before[0] != line and now - before[1] >= self.interval):
                    self.stream.write(safe(line) + "\n")
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
            self.stream.write(f"\x1b[{self.shown}F\x1b[2K{safe(line)}\n" + ("\n" * (self.shown - 1)))
            self.shown -= 1
        else:
            self.stream.write(safe(line) + "\n")
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
