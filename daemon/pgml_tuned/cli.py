"""`pgml-tuned`: migrate, serve, demo, status, logs, cancel, download, db, keys.

The DSN comes from --dsn, else PGML_DSN, else the embedded PostgreSQL under $PGML_HOME.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Coroutine
from dataclasses import fields
from pathlib import Path
from typing import Any

import anyio

from . import __version__, db, embedded, logconfig
from .config import Settings, field_type

COMMON_SETTINGS = ("dsn", "home", "log_format", "log_level")  # every command takes these; serve takes all


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(**{f.name: getattr(args, f.name, None) for f in fields(Settings)})


def add_setting_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """A --flag for each named Settings field (all that have one when names is None), typed and helped by it."""
    for f in fields(Settings):
        if not f.metadata.get("flag", True) or (names is not None and f.name not in names):
            continue
        kind = field_type(f)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind if kind in (int, float) else str,
            choices=f.metadata.get("choices"),
            help=f.metadata.get("help"),
            metavar=None if f.metadata.get("choices") else f.name.split("_")[-1].upper(),
        )


def resolve_dsn(settings: Settings, *, announce: bool = True, role: str = "user") -> str:
    """--dsn / PGML_DSN as given; else the embedded server, migrated, as `role`'s login there: "user" (submits),
    "worker" (serves) or "admin" (its superuser) — the same separation as any deployment."""
    if settings.dsn:
        return settings.dsn
    admin = embedded.ensure(settings.home)
    _run(lambda: db.prepare_local(admin))
    dsn = embedded.as_login(admin, role)
    if announce:
        print(
            f"embedded PostgreSQL running in {settings.home / 'pgdata'}\n"
            f"  connect: {embedded.psql_path()} '{embedded.as_login(admin, 'user')}'\n"
            f"  stop:    pgml-tuned db stop",
            file=sys.stderr,
        )
    return dsn


def child_dsn(settings: Settings) -> str | None:
    """The children's login: --child-dsn / PGML_CHILD_DSN; else the embedded server's child login; else None
    (a deployment that did not configure one: the children use the worker's DSN, and the daemon says so)."""
    if settings.child_dsn or settings.dsn:
        return settings.child_dsn
    return embedded.as_login(embedded.ensure(settings.home), "child")


def _run(fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return anyio.run(fn, backend="asyncio")


def cmd_migrate(args: argparse.Namespace) -> int:
    dsn = resolve_dsn(_settings(args), role="admin")
    applied = _run(lambda: db.migrate(dsn))
    print(f"applied {', '.join(applied)}" if applied else "schema pgml is up to date")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """The sealing keys of inline tokens: an administrator's commands (a worker never creates or registers one)."""
    from . import secrets

    if args.action == "generate":
        if not (args.out or args.file):
            raise ValueError("keys generate needs --out FILE: where to write the new private key")
        path = Path(args.out or args.file)
        key = secrets.generate_private_key(args.bits)
        secrets.write_private_key(key, path)
        print(
            f"key {secrets.key_id_of(key)} written to {path} (mode 0600)\n"
            f"  copy it into every worker's keyring directory (PGML_KEYRING_DIR, default $PGML_HOME/keyring),\n"
            f"  then: pgml-tuned keys register {path}"
        )
        return 0
    if args.action != "list" and not args.file:
        what = "the private key file" if args.action == "register" else "the key id (pgml-tuned keys list)"
        raise ValueError(f"keys {args.action} needs {what}")
    dsn = resolve_dsn(_settings(args), announce=False, role="admin")

    async def go() -> None:
        async with await db.connect(dsn) as conn:
            if args.action == "register":
                key = await anyio.to_thread.run_sync(secrets.load_private_key, Path(args.file))
                key_id = await secrets.register_key(conn, key, activate=not args.no_activate)
                state = "registered" if args.no_activate else "registered and active: inline tokens are sealed to it"
                print(f"key {key_id} {state}")
            elif args.action in ("activate", "retire"):
                await conn.execute(f"SELECT pgml.{args.action}_sealing_key(%s)", (args.file,))
                print(f"key {args.file} {args.action}d")
            rows = await (
                await conn.execute(
                    "SELECT key_id, active, created_at, retired_at, pending_jobs FROM pgml.sealing_key_use "
                    "ORDER BY created_at"
                )
            ).fetchall()
            if args.action == "list":
                for r in rows:
                    print("  ".join(f"{k}={v}" for k, v in r.items()))
                if not rows:
                    print("no sealing key is registered (pgml-tuned keys generate --out FILE; keys register FILE)")

    _run(go)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .worker.daemon import serve

    settings = _settings(args)
    logconfig.configure(settings.log_format, settings.log_level)
    dsn = resolve_dsn(settings, role="worker")  # the embedded server is migrated by resolve_dsn
    if args.migrate and settings.dsn:
        _run(lambda: db.migrate(dsn))
    _run(lambda: serve(settings, dsn, child_dsn=child_dsn(settings), drain=args.drain))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    settings = _settings(args)
    logconfig.configure(settings.log_format, settings.log_level)
    admin = resolve_dsn(settings, role="admin")
    user, worker = (
        (admin, admin) if settings.dsn else (embedded.as_login(admin, "user"), embedded.as_login(admin, "worker"))
    )
    return run_demo(settings, admin, user, worker, child_dsn(settings), epochs=args.epochs)


def cmd_status(args: argparse.Namespace) -> int:
    dsn = resolve_dsn(_settings(args), announce=False)

    async def go() -> None:
        async with await db.connect(dsn) as conn:
            if args.job:
                row = await (await conn.execute("SELECT * FROM pgml.job_status WHERE id = %s", (args.job,))).fetchone()
                if row is None:
                    raise SystemExit(f"no job {args.job}")
                print(json.dumps(row, default=str, indent=2))
                return
            summary = await (await conn.execute("SELECT * FROM pgml.queue_summary")).fetchall()
            for r in summary:
                print("  ".join(f"{k}={v}" for k, v in r.items()))
            rows = await (
                await conn.execute(
                    "SELECT id, project, status, attempt, worker, progress_pct, step, max_steps, last_loss, "
                    "heartbeat_age, eta FROM pgml.job_status WHERE status IN ('queued', 'running') "
                    "OR finished_at > now() - interval '1 hour' ORDER BY id DESC LIMIT %s",
                    (args.limit,),
                )
            ).fetchall()
            if rows:
                cols = list(rows[0])
                print("\n" + " | ".join(cols))
                for r in rows:
                    print(" | ".join("" if r[c] is None else str(r[c]) for c in cols))

    _run(go)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    dsn = resolve_dsn(_settings(args), announce=False)

    async def go() -> None:
        last = 0
        async with await db.connect(dsn) as conn:
            while True:
                rows = await (
                    await conn.execute(
                        "SELECT id, created_at, logs FROM pgml.logs WHERE job_id = %s AND id > %s ORDER BY id",
                        (args.job, last),
                    )
                ).fetchall()
                for r in rows:
                    print(json.dumps(r["logs"]), flush=True)
                    last = r["id"]
                job = await (
                    await conn.execute("SELECT status, error FROM pgml.jobs WHERE id = %s", (args.job,))
                ).fetchone()
                if job is None:
                    raise SystemExit(f"no job {args.job}")
                if not args.follow or job["status"] in ("succeeded", "failed", "cancelled"):
                    if args.follow:
                        print(
                            f"job {args.job} {job['status']}" + (f": {job['error']}" if job["error"] else ""),
                            file=sys.stderr,
                        )
                    return
                await anyio.sleep(0.5)

    _run(go)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    dsn = resolve_dsn(_settings(args), announce=False)

    async def go() -> str:
        async with await db.connect(dsn) as conn:
            row = await (await conn.execute("SELECT pgml.cancel(%s) AS status", (args.job,))).fetchone()
            return str(row["status"]) if row else "?"

    print(f"job {args.job}: {_run(go)}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .files import download_model

    dsn = resolve_dsn(_settings(args), announce=False)
    with db.sync_connect(dsn) as conn:
        path = download_model(conn, args.model_id, Path(args.dest))
    print(f"model {args.model_id} written to {path}")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.action == "stop":
        print("stopped" if embedded.stop(settings.home) else "not running")
    elif args.action == "dsn":
        print(resolve_dsn(settings, announce=False))
    else:
        dsn = resolve_dsn(settings, announce=False)
        print(f"{embedded.psql_path()} '{dsn}'")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add_setting_flags(common, COMMON_SETTINGS)

    p = argparse.ArgumentParser(prog="pgml-tuned", description=__doc__)
    p.add_argument("--version", action="version", version=f"pgml-tuned {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("migrate", parents=[common], help="install/upgrade the pgml schema (idempotent)").set_defaults(
        fn=cmd_migrate
    )

    s = sub.add_parser("serve", parents=[common], help="run the training daemon")
    s.add_argument("--drain", action="store_true", help="run queued jobs, exit 0 when the queue is empty")
    add_setting_flags(s, tuple(f.name for f in fields(Settings) if f.name not in COMMON_SETTINGS))
    s.add_argument(
        "--migrate",
        action="store_true",
        help="apply pending migrations first (needs an administrator's DSN; workers normally run with the "
        "pgml_worker role, and an administrator runs `pgml-tuned migrate`)",
    )
    s.set_defaults(fn=cmd_serve)

    d = sub.add_parser("demo", parents=[common], help="end-to-end fine-tune on bundled data, offline")
    d.add_argument("--epochs", type=float, default=3.0)
    d.set_defaults(fn=cmd_demo)

    st = sub.add_parser("status", parents=[common], help="queue summary and recent jobs, or one job")
    st.add_argument("job", type=int, nargs="?")
    st.add_argument("--limit", type=int, default=20)
    st.set_defaults(fn=cmd_status)

    lg = sub.add_parser("logs", parents=[common], help="print a job's log rows")
    lg.add_argument("job", type=int)
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    lg.set_defaults(fn=cmd_logs)

    c = sub.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    c.add_argument("job", type=int)
    c.set_defaults(fn=cmd_cancel)

    dl = sub.add_parser("download", parents=[common], help="reassemble a model's files from pgml.files")
    dl.add_argument("model_id", type=int)
    dl.add_argument("dest")
    dl.set_defaults(fn=cmd_download)

    k = sub.add_parser(
        "keys",
        parents=[common],
        help="sealing keys of inline tokens (administrators): generate --out FILE, register FILE, list, "
        "activate KEY_ID, retire KEY_ID",
    )
    k.add_argument("action", choices=["generate", "register", "list", "activate", "retire"])
    k.add_argument("file", nargs="?", help="register: the private key file; activate/retire: the key id")
    k.add_argument("--out", help="generate: the new private key file (never overwritten)")
    k.add_argument("--bits", type=int, default=3072, help="generate: RSA key size (default 3072)")
    k.add_argument("--no-activate", action="store_true", help="register: do not make it the sealing key yet")
    k.set_defaults(fn=cmd_keys)

    e = sub.add_parser("db", parents=[common], help="the embedded PostgreSQL: psql command, dsn, stop")
    e.add_argument("action", choices=["psql", "dsn", "stop"])
    e.set_defaults(fn=cmd_db)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except ValueError as e:
        print(f"pgml-tuned: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
