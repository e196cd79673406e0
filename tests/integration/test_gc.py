"""`pgml-tuned gc` (pgml.gc, migration 0019): what old jobs hold, listed (dry run) and freed (--apply), against
real PostgreSQL, as an administrator's login — and never a deployed, best, newest or base model's files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import ADMIN, USER, as_login, connect
from tests.integration.test_migrate_cli import cli
from tests.support.stored import add_model

TASK = "text-classification"


def model_files(su: psycopg.Connection[dict[str, Any]], model: int) -> int:
    return int(su.execute("SELECT count(*) AS n FROM pgml.file_parts WHERE model_id = %s", (model,)).fetchone()["n"])


def ended_job(su: psycopg.Connection[dict[str, Any]], model: int, status: str, *, keep: bool) -> int:
    """A job of `model` in `status` with a checkpoint (two file parts) and three copied training rows, as a job
    kept by materialize_snapshot (keep) or an older version left them."""
    job = su.execute(
        "INSERT INTO pgml.jobs (project_id, model_id, task, model_name, test_size, test_sampling, submitted_by, "
        "keep_snapshot) SELECT project_id, id, task, 'test', 0.25, 'last', %s, %s FROM pgml.models WHERE id = %s "
        "RETURNING id",
        (USER, keep, model),
    ).fetchone()["id"]
    su.execute("UPDATE pgml.jobs SET status = 'running' WHERE id = %s", (job,))
    ckpt = su.execute(
        "INSERT INTO pgml.checkpoints (job_id, attempt, step, files, bytes) VALUES (%s, 1, 10, 1, 3000) RETURNING id",
        (job,),
    ).fetchone()["id"]
    su.execute(
        "INSERT INTO pgml.checkpoint_files (checkpoint_id, path, part, data) VALUES (%s, 'w', 0, %s), (%s, 'w', 1, %s)",
        (ckpt, b"c" * 2000, ckpt, b"c" * 1000),
    )
    su.execute(
        "INSERT INTO pgml.job_rows (job_id, n, c1, c2) SELECT %s, i, 'text ' || i, 'pos' FROM generate_series(1, 3) i",
        (job,),
    )
    if status != "running":
        # the end of a job deletes its checkpoints and rows unless kept: put them back as an old version left them
        su.execute("ALTER TABLE pgml.jobs DISABLE TRIGGER USER")
        su.execute("UPDATE pgml.jobs SET status = %s WHERE id = %s", (status, job))
        su.execute("ALTER TABLE pgml.jobs ENABLE TRIGGER USER")
    return int(job)


@pytest.fixture
def stored(su: psycopg.Connection[dict[str, Any]], tmp_path: Path) -> dict[str, int]:
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"m" * 5000)
    (d / "config.json").write_text("{}")
    ids: dict[str, int] = {}
    for name, accuracy in (("old", 0.5), ("base", 0.55), ("best", 0.9), ("deployed", 0.6), ("newest", 0.7)):
        base = f"pgml:model:{ids['base']}" if name == "newest" else None
        ids[name] = add_model(su, USER, "reviews", TASK, path=d, base=base)
        su.execute(
            "UPDATE pgml.models SET metrics = %s WHERE id = %s", (json.dumps({"eval_accuracy": accuracy}), ids[name])
        )
    su.execute(
        "INSERT INTO pgml.deployments (project_id, model_id, strategy, deployed_by) "
        "SELECT project_id, id, 'model_id', %s FROM pgml.models WHERE id = %s",
        (USER, ids["deployed"]),
    )
    ids["training"] = add_model(su, USER, "reviews", TASK, status="in_progress")
    for model, days in ((ids["old"], 40), (ids["old"], 1), (ids["training"], 40)):
        su.execute(
            "INSERT INTO pgml.logs (model_id, project_id, created_at, logs) SELECT id, project_id, "
            "clock_timestamp() - make_interval(days => %s), '{\"loss\": 1.0}' FROM pgml.models WHERE id = %s",
            (days, model),
        )
    ids["leftover_job"] = ended_job(su, ids["old"], "succeeded", keep=False)
    ids["kept_job"] = ended_job(su, ids["deployed"], "failed", keep=True)
    ids["running_job"] = ended_job(su, ids["training"], "running", keep=False)
    # jobs' own tables of rows (pgml_rows.job_<id>, migration 0024), and one whose job is gone
    for job in (ids["leftover_job"], ids["kept_job"], ids["running_job"], 987654):
        su.execute(f"CREATE TABLE pgml_rows.job_{job} AS SELECT 'text ' || i AS c1 FROM generate_series(1, 5) i")
        su.execute(f"ALTER TABLE pgml_rows.job_{job} OWNER TO pgml_owner")  # as pgml.tune() creates them
    return ids


def listed(stdout: str) -> set[tuple[str, str]]:
    """(kind, job or model id) of each row of gc's table."""
    rows = set()
    for line in stdout.splitlines()[1:]:
        cells = line.split()
        if not cells or cells[0] not in ("model_files", "logs", "checkpoints", "job_rows", "job_table"):
            continue
        rows.add((cells[0], cells[3] if cells[0] in ("model_files", "logs") else cells[2]))  # kind, project, job, model
    return rows


def counts(su: psycopg.Connection[dict[str, Any]], ids: dict[str, int]) -> dict[str, int]:
    one = lambda query, *a: int(su.execute(query, a).fetchone()["n"])  # noqa: E731
    tables = {
        r["relname"] for r in su.execute("SELECT relname FROM pg_class WHERE relnamespace = 'pgml_rows'::regnamespace")
    }
    return {
        **{f"table:{k}": int(f"job_{ids[k]}" in tables) for k in ("leftover_job", "kept_job", "running_job")},
        "table:orphan": int("job_987654" in tables),
        **{f"files:{k}": model_files(su, ids[k]) for k in ("old", "base", "best", "deployed", "newest")},
        "logs:old": one("SELECT count(*) AS n FROM pgml.logs WHERE model_id = %s", ids["old"]),
        "logs:training": one("SELECT count(*) AS n FROM pgml.logs WHERE model_id = %s", ids["training"]),
        **{
            f"{table}:{k}": one(f"SELECT count(*) AS n FROM pgml.{table} WHERE job_id = %s", ids[k])
            for table in ("checkpoints", "job_rows")
            for k in ("leftover_job", "kept_job", "running_job")
        },
    }


def test_gc_dry_run_lists_and_apply_frees_what_nobody_uses(
    su: psycopg.Connection[dict[str, Any]], su_dsn: str, stored: dict[str, int], tmp_path: Path
) -> None:
    admin = as_login(su_dsn, ADMIN)
    home = ["--home", str(tmp_path / "home")]
    before = counts(su, stored)
    assert all(before.values()), before

    dry = cli("gc", "--dsn", admin, "--logs-older-than", "30d", *home)
    assert dry.returncode == 0, dry.stderr
    old, leftover = str(stored["old"]), str(stored["leftover_job"])
    assert listed(dry.stdout) == {
        ("model_files", old),
        ("logs", old),
        ("checkpoints", leftover),
        ("job_rows", leftover),
        ("job_table", leftover),
        ("job_table", "-"),  # the table of a job that is gone
    }, dry.stdout
    assert "would free" in dry.stdout and "--apply" in dry.stdout
    assert counts(su, stored) == before  # a dry run deletes nothing

    # --keep-last keeps more of each project's newest models
    assert ("model_files", old) not in listed(cli("gc", "--dsn", admin, "--keep-last", "5", *home).stdout)

    applied = cli("gc", "--dsn", admin, "--logs-older-than", "30d", "--apply", *home)
    assert applied.returncode == 0, applied.stderr
    assert listed(applied.stdout) == listed(dry.stdout)
    assert "freed" in applied.stdout and "VACUUM (FULL" in applied.stdout and "pgml.file_parts" in applied.stdout
    after = counts(su, stored)
    assert after == {
        **before,
        "files:old": 0,
        "logs:old": 1,  # the recent one stays
        "checkpoints:leftover_job": 0,
        "job_rows:leftover_job": 0,
        "table:leftover_job": 0,
        "table:orphan": 0,
    }
    row = su.execute("SELECT files_freed_at FROM pgml.models WHERE id = %s", (stored["old"],)).fetchone()
    assert row["files_freed_at"] is not None
    # nothing is left to free but what materialize_snapshot kept, and that only on request
    assert listed(cli("gc", "--dsn", admin, "--logs-older-than", "30d", *home).stdout) == set()
    kept = cli("gc", "--dsn", admin, "--include-kept", "--apply", *home)
    assert listed(kept.stdout) == {
        ("checkpoints", str(stored["kept_job"])),
        ("job_rows", str(stored["kept_job"])),
        ("job_table", str(stored["kept_job"])),
    }
    final = counts(su, stored)
    assert final["checkpoints:kept_job"] == final["job_rows:kept_job"] == final["table:kept_job"] == 0
    assert final["table:running_job"] == 1
    assert final["checkpoints:running_job"] == 1 and final["job_rows:running_job"] == 3  # a running job's: never
    assert final["logs:training"] == 1  # a model still training keeps its logs
    for name in ("base", "best", "deployed", "newest"):
        assert final[f"files:{name}"] == before[f"files:{name}"], name


def test_gc_follows_the_deployment(su: psycopg.Connection[dict[str, Any]], su_dsn: str, stored: dict[str, int]) -> None:
    """A project that deploys (rolls back to) an old model keeps its files; the model it replaced is freed."""
    with connect(as_login(su_dsn, ADMIN)) as admin:
        listed_first = admin.execute("SELECT model_id FROM pgml.gc() WHERE kind = 'model_files'").fetchall()
        assert [r["model_id"] for r in listed_first] == [stored["old"]]
        su.execute(
            "INSERT INTO pgml.deployments (project_id, model_id, strategy, deployed_by) "
            "SELECT project_id, id, 'rollback', %s FROM pgml.models WHERE id = %s",
            (USER, stored["old"]),
        )
        freed = admin.execute("SELECT model_id FROM pgml.gc(apply => true) WHERE kind = 'model_files'").fetchall()
        assert [r["model_id"] for r in freed] == [stored["deployed"]]
    assert model_files(su, stored["old"]) > 0 and model_files(su, stored["deployed"]) == 0


def test_gc_is_an_administrators_command(
    su: psycopg.Connection[dict[str, Any]], su_dsn: str, stored: dict[str, int], tmp_path: Path
) -> None:
    user = as_login(su_dsn, USER)
    r = cli("gc", "--dsn", user, "--apply", "--home", str(tmp_path))
    assert r.returncode == 1
    assert "pgml_admin" in r.stderr and "administrator" in r.stderr, r.stderr
    with connect(user) as c, pytest.raises(psycopg.errors.InsufficientPrivilege):
        c.execute("SELECT * FROM pgml.gc(apply => true)")
    with connect(user) as c, pytest.raises(psycopg.errors.InsufficientPrivilege):
        c.execute("DELETE FROM pgml.file_parts")
    assert model_files(su, stored["old"]) > 0
    for bad, why in ((["--keep-last", "0"], "at least 1"), (["--logs-older-than", "soon"], "30d")):
        r = cli("gc", "--dsn", as_login(su_dsn, ADMIN), *bad, "--home", str(tmp_path))
        assert r.returncode == 2 and why in r.stderr, r.stderr
