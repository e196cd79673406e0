"""`pgml-tuned`, the command line: migrate, serve, demo, status, wait, logs, cancel, download, dashboard, gc, db,
keys. The DSN comes from --dsn, else PGML_DSN, else the embedded PostgreSQL under $PGML_HOME.

- dsn: the database a command talks to (the embedded server set up here), CliError, the statements of sql/cli.sql
- output: what the commands print (tables, JSON values, progress lines)
- jobs (status, wait, logs, cancel), models (download), admin (migrate, keys, gc, db), services (serve, demo,
  dashboard): the commands
- parser: the argument parser, its flags made from the Settings (config.py); app: main()
"""

from __future__ import annotations

from .app import main
from .parser import build_parser

__all__ = ["build_parser", "main"]
