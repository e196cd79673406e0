"""An administrator's commands: migrate (the pgml schema), keys (the sealing keys of inline tokens), gc (what old
jobs hold) and db (the embedded PostgreSQL)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anyio
import psycopg

from .. import db, embedded
from .dsn import CliError, q, resolve_dsn, run, settings_of, shown_dsn


def cmd_migrate(args: argparse.Namespace) -> int:
    dsn = resolve_dsn(settings_of(args), role="admin")
    applied = run(lambda: db.migrate(dsn))
    print(f"applied {', '.join(applied)}" if applied else "schema pgml is up to date")
    for r in run(lambda: db.stale_loopback_logins(dsn, apply=True)):
        print(f"loopback login {r['login']}: {r['note']}")
    problem = run(lambda: db.loopback_problem(dsn))
    if problem:  # the schema is migrated: a warning, not a failure (the asynchronous calls work)
        print(
            "warning: the synchronous calls (pgml.transform, pgml.load_dataset) fail in this database:\n  "
            + problem.replace("\n", "\n  "),
            file=sys.stderr,
        )
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """The sealing keys of inline tokens: an administrator's commands (a worker never creates or registers one)."""
    from .. import secrets

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
    dsn = resolve_dsn(settings_of(args), announce=False, role="admin", check="schema")

    async def go() -> None:
        async with await db.connect(dsn) as conn:
            if args.action == "register":
                key = await anyio.to_thread.run_sync(secrets.load_private_key, Path(args.file))
                key_id = await secrets.register_key(conn, key, activate=not args.no_activate)
                state = "registered" if args.no_activate else "registered and active: inline tokens are sealed to it"
                print(f"key {key_id} {state}")
            elif args.action in ("activate", "retire"):
                await conn.execute(q(f"{args.action}_sealing_key"), {"key_id": args.file})
                print(f"key {args.file} {args.action}d")
            rows = await (await conn.execute(q("sealing_keys"))).fetchall()
            if args.action == "list":
                for r in rows:
                    print("  ".join(f"{k}={v}" for k, v in r.items()))
                if not rows:
                    print("no sealing key is registered (pgml-tuned keys generate --out FILE; keys register FILE)")

    run(go)
    return 0


# the tables each kind of pgml.gc row frees space in
GC_TABLES: dict[str, str | None] = {
    "model_files": "pgml.file_parts",
    "logs": "pgml.logs",
    "checkpoints": "pgml.checkpoint_files",
    "job_rows": "pgml.job_rows",
    "job_table": None,  # dropped: its space is returned at once
    "submitting": None,  # a job never queued: deleted with its table
    "loopback_login": None,  # a role of the cluster whose database is gone (no space: a login)
}


AGE_UNITS = {"m": "minutes", "min": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> str:
    """--logs-older-than 30d / 12h / 2w / 90min → a PostgreSQL interval ('30 days')."""
    import re

    m = re.fullmatch(r"\s*(\d+)\s*(min|m|h|d|w)\s*", text or "")
    if not m:
        raise CliError(f"--logs-older-than {text!r}: give an age such as 30d, 12h, 2w or 90min", 2)
    return f"{m.group(1)} {AGE_UNITS[m.group(2)]}"


def human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"


def cmd_gc(args: argparse.Namespace) -> int:
    """What old jobs hold (pgml.gc, an administrator's function): a table of it; --apply frees it."""
    if args.keep_last < 1:
        raise CliError(f"--keep-last {args.keep_last}: keep at least 1 model per project", 2)
    age = parse_age(args.logs_older_than) if args.logs_older_than else None
    dsn = resolve_dsn(settings_of(args), announce=False, role="admin", check="schema", setup=False)
    with db.sync_connect(dsn) as conn:
        try:
            rows = conn.execute(
                q("gc"),
                {
                    "keep_last": args.keep_last,
                    "logs_older_than": age,
                    "include_kept": args.include_kept,
                    "apply": args.apply,
                },
            ).fetchall()
            # loopback logins of dropped databases: dropped as the connecting role, which must be allowed to
            logins = conn.execute(db.q("stale_loopback_logins", file="migrate.sql"), {"apply": args.apply}).fetchall()
        except psycopg.errors.InsufficientPrivilege as e:
            if "function gc" not in str(e) and "pgml_admin" not in str(e) and "stale_loopback" not in str(e):
                raise
            raise CliError(
                f"gc frees what every user's jobs left: it needs an administrator's login (a member of pgml_admin), "
                f"and {shown_dsn(dsn)} is not one; run it with such a --dsn (GRANT pgml_admin TO <login>)"
            ) from None
        conn.commit()
    rows += [
        {
            "kind": "loopback_login",
            "project": None,
            "job_id": None,
            "model_id": None,
            "items": 1,
            "bytes": 0,
            "note": f"{r['login']}: {r['note']}",
        }
        for r in logins
    ]
    header = ("kind", "project", "job", "model", "items", "size", "why")
    table = [
        (
            r["kind"],
            r["project"] or "-",
            str(r["job_id"] or "-"),
            str(r["model_id"] or "-"),
            str(r["items"]),
            human_bytes(int(r["bytes"])),
            r["note"],
        )
        for r in rows
    ]
    if not table:
        print("nothing to free: no unused model files, old logs or leftovers of ended jobs")
        return 0
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    total = sum(int(r["bytes"]) for r in rows)
    tables = sorted({t for r in rows if (t := GC_TABLES.get(r["kind"]))})
    if args.apply:
        print(f"\nfreed {human_bytes(total)} in {len(rows)} rows above.")
        if tables:
            print(
                "The space is reusable by new rows now; it returns to the operating system only after VACUUM FULL "
                "(which locks each table while it rewrites it), e.g.:\n"
                f"  psql -c 'VACUUM (FULL, ANALYZE) {', '.join(tables)}'"
            )
    else:
        print(f"\nwould free {human_bytes(total)} (dry run: nothing was deleted; --apply deletes it)")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    if args.action == "stop":
        print("stopped" if embedded.stop(settings.home) else "not running")
    elif args.action == "dsn":
        print(resolve_dsn(settings, announce=False))
    else:
        dsn = resolve_dsn(settings, announce=False)
        print(f"{embedded.psql_path()} '{dsn}'")
    return 0
