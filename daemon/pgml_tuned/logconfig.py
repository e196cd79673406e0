"""structlog setup: JSON lines under systemd (stdout not a terminal), pretty in a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure(
    fmt: str = "auto",
    level: str = "info",
    *,
    clean: structlog.typing.Processor | None = None,
    console_stream: Any = None,
) -> None:
    """`clean` (the CLI's: cli/output.py) runs before the console renderer, which then writes to `console_stream`
    (default: sys.stderr)."""
    json_mode = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_mode else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if json_mode else structlog.dev.set_exc_info,
            *([clean] if clean is not None and not json_mode else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(
            file=console_stream if console_stream is not None and not json_mode else sys.stderr
        ),
        cache_logger_on_first_use=False,
    )


def get(name: str = "pgml_tuned") -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
