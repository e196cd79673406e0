"""A database of the last release upgrades in place: `migrate` of the new code over the release's schema (0031,
tests/data/release_0031_migrations.json.gz: the migrations as that release shipped them) makes exactly the schema
a new database gets (sql/schema.sql), keeps every row (jobs, models, files, checkpoints, credentials, keys), and
the upgraded database then trains the job it had queued and serves the model it had stored."""

from __future__ import annotations

import contextlib
import gzip
import json
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from pgml_tuned import catalog, db, secrets
from pgml_tuned.db import SQL_DIR
from tests.conftest import ADMIN, CHILD, REPO, USER, WORKER, DaemonProc, as_login, connect, scratch_database, wait_for
from tests.e2e.test_serving import TEXTS, ask
from tests.e2e.test_text_classification import submit, tiny_bert
from tests.support.stored import add_model

__all__ = ["tiny_bert"]  # the fixture, used here too

RELEASE = REPO / "tests/data/release_0031_migrations.json.gz"
# what a database holds that an upgrade must keep, row for row
KEPT = ["projects", "models", "jobs", "job_rows", "job_events", "logs", "file_parts", "checkpoints", "checkpoint_files",
        "credentials", "credential_grants", "sealing_keys", "hub_allowlist", "deployments"]  # fmt: skip


def released() -> list[tuple[str, str]]:
    data = json.loads(gzip.decompress(RELEASE.read_bytes()))
    return [(version, text) for version, text in data["migrations"]]


def rows_of(su: psycopg.Connection[dict[str, Any]]) -> dict[str, tuple[int, str]]:
    out = {}
    for table in KEPT:
        row = su.execute(
            psycopg.sql.SQL(
                "SELECT count(*) AS n, md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) AS md5 FROM {} t"
            ).format(psycopg.sql.Identifier("pgml", table))
        ).fetchone()
        assert row is not None
        out[table] = (row["n"], row["md5"])
    return out


@pytest.mark.slow
def test_a_database_of_the_last_release_upgrades_in_place(
    admin_dsn: str, template_db: str, session_env: Path, tiny_bert: Path, tmp_path: Path
) -> None:
    with scratch_database(admin_dsn) as dsn:
        su = connect(dsn)
        loopback = None
        try:
            # the release's `migrate`: each file in a transaction of its own
            for _version, text in released():
                with su.transaction():
                    su.execute(text.encode())
            assert su.execute("SELECT count(*) AS n FROM pgml.schema_migrations").fetchone() == {"n": 31}
            loopback = su.execute("SELECT login FROM pgml.loopback_login").fetchone()
            su.execute(f'GRANT CREATE ON SCHEMA public TO "{USER}"')

            # what such a database holds: a sealing key, a credential, a stored model with its files, a job that
            # ran and checkpointed, and a job still queued (its rows copied at submit)
            key = secrets.generate_private_key(2048)

            async def register() -> None:
                async with await db.connect(dsn) as c:
                    await secrets.register_key(c, key)

            anyio.run(register)
            admin = connect(as_login(dsn, ADMIN))
            admin.execute("SELECT pgml.allow_credential('hf-org', %s)", (USER,))
            stored = add_model(su, USER, "stored", "text-classification", path=tiny_bert)
            user = connect(as_login(dsn, USER))
            user.execute("CREATE TABLE reviews (text text, class text)")
            user.execute(
                "INSERT INTO reviews SELECT 'review number ' || i, CASE WHEN i % 2 = 0 THEN 'good' ELSE 'bad' END "
                "FROM generate_series(1, 24) i"
            )
            ran = submit(user, "ran", "reviews", str(tiny_bert))
            su.execute("UPDATE pgml.jobs SET status = 'cancelled' WHERE id = %s", (ran,))
            checkpoint = su.execute(
                "INSERT INTO pgml.checkpoints (job_id, attempt, step, files, bytes) VALUES (%s, 1, 10, 1, 4) "
                "RETURNING id",
                (ran,),
            ).fetchone()["id"]
            su.execute(
                "INSERT INTO pgml.checkpoint_files (checkpoint_id, path, part, data) VALUES (%s, 'state.pt', 0, "
                "'\\x00010203')",
                (checkpoint,),
            )
            queued = submit(user, "queued", "reviews", str(tiny_bert))
            before = rows_of(su)

            # the upgrade: the migrations added since the release applied, every function, view, trigger and grant
            # re-applied
            shipped = {version for version, _ in released()}
            added = sorted(p.stem for p in (SQL_DIR / "migrations").glob("*.sql") if p.stem not in shipped)
            assert anyio.run(db.migrate, dsn) == added
            assert catalog.dump(su) == (SQL_DIR / "schema.sql").read_text()
            assert rows_of(su) == before

            # and it works: the queued job trains, the stored model serves
            d = DaemonProc(as_login(dsn, WORKER), tmp_path, "--child-dsn", as_login(dsn, CHILD))
            try:
                done = wait_for(
                    lambda: (
                        (r := user.execute("SELECT status, error FROM pgml.jobs WHERE id = %s", (queued,)))
                        and (row := r.fetchone())
                        and row["status"] in ("succeeded", "failed")
                        and row
                    ),
                    240,
                    what=f"job {queued}",
                )
                assert done["status"] == "succeeded", (done, d.output()[-3000:])
                # (tiny_bert is a base whose classification head is initialised at each load: labels and scores
                # are not comparable with another load's, the shape of the answer is)
                got = ask(admin, "classify", f"pgml:model:{stored}", TEXTS)["result"]
                assert len(got) == len(TEXTS) and all(
                    set(g) == {"label", "score"} and 0 <= g["score"] <= 1 for g in got
                )
                trained = user.execute("SELECT model_id FROM pgml.jobs WHERE id = %s", (queued,)).fetchone()["model_id"]
                got = ask(admin, "classify", f"pgml:model:{trained}", TEXTS)["result"]
                assert {g["label"] for g in got} <= {"good", "bad"}  # the labels the upgraded job trained on
            finally:
                d.stop()
        finally:
            su.close()
            if loopback:  # roles outlive databases
                with psycopg.connect(admin_dsn, autocommit=True) as c, contextlib.suppress(psycopg.Error):
                    c.execute(f'DROP ROLE IF EXISTS "{loopback["login"]}"')
