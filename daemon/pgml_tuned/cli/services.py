"""The commands that keep running: serve (the training daemon), demo (a fine-tune on bundled data, end to end)
and dashboard (the read-only web page)."""

from __future__ import annotations

import argparse
import os

from .. import db, embedded, logconfig
from .dsn import CliError, child_dsn, reading_dsn, resolve_dsn, run, serving_dsn, settings_of, shown_dsn
from .output import log_options


def cmd_serve(args: argparse.Namespace) -> int:
    from ..worker.daemon import serve
    from ..worker.pg import LoginRefused

    settings = settings_of(args)
    logconfig.configure(settings.log_format, settings.log_level, **log_options())
    # the embedded server is migrated by resolve_dsn; a daemon waits for a database that is not up yet
    dsn = resolve_dsn(settings, role="worker", check="reach" if args.migrate else "none")
    if args.migrate and settings.dsn:
        run(lambda: db.migrate(dsn))
    try:
        run(
            lambda: serve(
                settings,
                dsn,
                child_dsn=child_dsn(settings),
                serving_dsn=serving_dsn(settings),
                drain=args.drain,
                allow_superuser=args.allow_superuser or os.environ.get("PGML_ALLOW_SUPERUSER") == "1",
            )
        )
    except LoginRefused as e:
        raise CliError(str(e), 2) from None
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    settings = settings_of(args)
    logconfig.configure(settings.log_format, settings.log_level, **log_options())
    admin = resolve_dsn(settings, role="admin")
    user, worker = (
        (admin, admin) if settings.dsn else (embedded.as_login(admin, "user"), embedded.as_login(admin, "worker"))
    )
    return run_demo(settings, admin, user, worker, child_dsn(settings), epochs=args.epochs)


def cmd_dashboard(args: argparse.Namespace) -> int:
    """The read-only web page, reading as the DSN's login (the viewer's own: what it may see, nothing more)."""
    try:
        from ..dashboard.server import bind, serve_dashboard
    except ImportError as e:
        raise CliError(
            f"the dashboard needs the `dashboard` extra ({e.name} is not installed): "
            "pip install 'pgml-tuned[dashboard]'"
        ) from None
    settings = settings_of(args)
    logconfig.configure(settings.log_format, settings.log_level, **log_options())
    dsn = reading_dsn(args)
    sock = bind(args.host, args.port)

    def ready(url: str) -> None:
        print(f"pgml-tuned dashboard: {url}  (reading as {shown_dsn(dsn)}; Ctrl-C stops)", flush=True)

    run(lambda: serve_dashboard(dsn, shown_dsn(dsn), sock, poll_seconds=settings.poll_seconds, on_ready=ready))
    return 0
