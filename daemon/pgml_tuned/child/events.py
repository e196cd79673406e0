"""The child's channel to its worker: JSON lines on the child's original stdout.

    {"event": "log", "logs": {...}}            a Trainer log event (also stored in pgml.logs)
    {"event": "info", "level": "...", "message": "..."}
    {"event": "error", "error": "...", "traceback": "..."}   the job failed (then exit code ERROR)
    {"event": "lease_lost", "message": "..."}  a fenced write matched nothing (then exit code LEASE_LOST)

Anything else a library prints goes to stderr, which the worker keeps the tail of for error messages.
"""

from __future__ import annotations

import json
import threading
from typing import IO, Any


class Events:
    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._lock = threading.Lock()  # the checkpoint uploader's thread emits too: one whole line at a time

    def emit(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, default=str) + "\n"
        with self._lock:
            self.stream.write(line)
            self.stream.flush()

    def info(self, message: str, level: str = "info", **fields: Any) -> None:
        self.emit({"event": "info", "level": level, "message": message, **fields})
