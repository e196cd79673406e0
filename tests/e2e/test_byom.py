"""Bring your own model, as an air-gapped user meets it: `pgml-tuned models import DIR --project NAME` (a subprocess,
as the user's login) stores a local model in pgml.files, deployed, and a running daemon serves `pgml:NAME` through
pgml.transform and fine-tunes from it; an adapter imports onto its base; what is refused says why and how to fix
it, and leaves nothing behind; `pgml-tuned hub add DIR --as ORG/NAME` makes a hub id the daemon serves offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import ADMIN, OTHER_USER, USER, as_login, wait_job
from tests.e2e.test_serving import TEXTS, in_process_classify, same_answers, serving, tiny

pytestmark = pytest.mark.slow
__all__ = ["serving", "tiny"]  # fixtures of test_serving, used here too

Conn = psycopg.Connection[dict[str, Any]]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgml_tuned.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def import_model(dsn: str, directory: Path, project: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli("models", "import", str(directory), "--project", project, "--dsn", dsn, *extra)


def transform(conn: Conn, model: str) -> Any:
    row = conn.execute(
        "SELECT pgml.transform(task => %s::jsonb, inputs => %s::text[]) AS t",
        (json.dumps({"task": "text-classification", "model": model}), TEXTS),
    ).fetchone()
    assert row is not None
    return row["t"]


def stored(su: Conn) -> tuple[int, int, int, int]:
    row = su.execute(
        "SELECT (SELECT count(*) FROM pgml.projects) AS p, (SELECT count(*) FROM pgml.models) AS m, "
        "(SELECT count(*) FROM pgml.file_parts) AS f, (SELECT count(*) FROM pgml.deployments) AS d"
    ).fetchone()
    assert row is not None
    return row["p"], row["m"], row["f"], row["d"]


def test_import_serves_pgml_name_and_tunes_from_it(
    serving: Any, conn: Conn, conn_dsn: str, su: Conn, tiny: dict[str, Path], reviews: str
) -> None:
    out = import_model(conn_dsn, tiny["classifier"], "byo")
    assert out.returncode == 0, out.stderr
    model_id = su.execute("SELECT id FROM pgml.models WHERE owner = %s", (USER,)).fetchone()["id"]
    assert f"as model {model_id} of project 'byo' (owner {USER})" in out.stdout
    assert f"use it as pgml:byo (or pgml:model:{model_id})" in out.stdout
    row = conn.execute(
        "SELECT m.status, m.task, m.base_model, p.task AS project_task, pgml.deployed_model(p.id) AS deployed "
        "FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id WHERE m.id = %s",
        (model_id,),
    ).fetchone()
    assert row == {
        "status": "successful",
        "task": "text-classification",  # from config.json's BertForSequenceClassification
        "base_model": None,
        "project_task": "text-classification",
        "deployed": model_id,
    }
    same_answers(transform(conn, "pgml:byo"), in_process_classify(tiny["classifier"]))

    # a LoRA adapter onto the imported model, stored as a trained adapter is (its files, base_model recorded)
    out = import_model(conn_dsn, tiny["classifier_lora"], "byo_lora", "--base", "pgml:byo")
    assert out.returncode == 0, out.stderr
    lora = conn.execute("SELECT id, base_model FROM pgml.models ORDER BY id DESC LIMIT 1").fetchone()
    assert lora["base_model"] == "pgml:byo"
    paths = {r["path"] for r in conn.execute("SELECT DISTINCT path FROM pgml.files WHERE model_id = %s", (lora["id"],))}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= paths and "config.json" not in paths
    same_answers(transform(conn, "pgml:byo_lora"), in_process_classify(tiny["classifier"], tiny["classifier_lora"]))

    # a fine-tune starting from it
    job = conn.execute(
        "SELECT * FROM pgml.tune('byo_tuned', task => 'text-classification', relation_name => %s, "
        "model_name => 'pgml:byo', test_size => 0.2, hyperparams => %s)",
        (
            reviews,
            Jsonb(
                {
                    "training_args": {"num_train_epochs": 1, "per_device_train_batch_size": 4},
                    "dataset_args": {"text_column": "text", "class_column": "class"},
                }
            ),
        ),
    ).fetchone()
    done = wait_job(conn, job["job_id"], timeout=240)
    assert done["status"] == "succeeded", done["error"]
    assert conn.execute(
        "SELECT 1 FROM pgml.logs WHERE job_id = %s AND logs->>'message' = %s",
        (job["job_id"], f"starting from stored model {model_id} (project byo)"),
    ).fetchone()


def test_hub_add_is_served_offline_by_its_hub_id(serving: Any, conn: Conn, tiny: dict[str, Path]) -> None:
    # the worker's Hugging Face cache: the session's HF_HOME, which the daemon runs with (HF_HUB_OFFLINE=1)
    out = cli("hub", "add", str(tiny["classifier2"]), "--as", "byo-org/classifier")
    assert out.returncode == 0, out.stderr
    assert f"in the Hugging Face cache {Path(os.environ['HF_HOME']) / 'hub'}" in out.stdout
    same_answers(transform(conn, "byo-org/classifier"), in_process_classify(tiny["classifier2"]))
    again = cli("hub", "add", str(tiny["classifier2"]), "--as", "byo-org/classifier")
    assert again.returncode == 0 and "already there, unchanged" in again.stdout


def spoiled(src: Path, tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    shutil.copytree(src, d)
    return d


def test_refusals_say_why_and_leave_nothing(
    conn: Conn, conn_dsn: str, su: Conn, su_dsn: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    before = stored(su)
    pickled = spoiled(tiny["classifier"], tmp_path, "pickled")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    custom = spoiled(tiny["classifier"], tmp_path, "custom")
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_x.X"}}))
    no_config = spoiled(tiny["classifier"], tmp_path, "no-config")
    (no_config / "config.json").unlink()
    cases = [
        ((pickled, "p"), "pytorch_model.bin is a pickle file", "convert it to safetensors"),
        ((custom, "p"), 'config.json has an "auto_map"', 'delete "auto_map"'),
        ((no_config, "p"), "has no config.json", "save_pretrained wrote"),
    ]
    for (directory, project), message, hint in cases:
        out = import_model(conn_dsn, directory, project)
        assert out.returncode == 1, out
        assert message in out.stderr and "HINT: " in out.stderr and hint in out.stderr, out.stderr
    # the database's own checks (the CLI's passed): an adapter whose base is unknown, a project of another login
    out = import_model(conn_dsn, tiny["classifier_lora"], "p", "--base", "pgml:nosuch")
    assert out.returncode == 1
    assert f"base model 'pgml:nosuch': {USER} has no such successful model" in out.stderr and "HINT:" in out.stderr
    out = import_model(conn_dsn, tiny["classifier"], "p", "--owner", OTHER_USER)
    assert out.returncode == 1
    assert f"{USER} may not import a model into a project of {OTHER_USER}" in out.stderr
    assert "HINT: import it into a project of your own" in out.stderr
    assert stored(su) == before

    # an administrator may import for a user: the user's project, the user's pgml:NAME
    out = import_model(as_login(su_dsn, ADMIN), tiny["classifier"], "given", "--owner", USER)
    assert out.returncode == 0, out.stderr
    assert conn.execute("SELECT owner FROM pgml.projects WHERE name = 'given'").fetchone() == {"owner": USER}


def test_sql_route_checks_what_it_is_given(conn: Conn, su: Conn, tiny: dict[str, Path]) -> None:
    """The functions check the request themselves (any client, not only the CLI), the insert trigger lets only the
    transaction's own import through, and an import never committed unfinished."""
    before = stored(su)
    files = [{"path": "config.json", "bytes": 2}, {"path": "model.safetensors", "bytes": 8}]
    begin = "SELECT pgml.import_model_begin(%s, 'text-classification', NULL, %s, 'test') AS id"
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        conn.execute(begin, ("p", Jsonb([*files, {"path": "pytorch_model.bin", "bytes": 1}])))
    assert "pickle file" in e.value.diag.message_primary and "safetensors" in e.value.diag.message_hint
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        conn.execute(begin, ("p", Jsonb([*files, {"path": "../x.json", "bytes": 1}])))
    assert "not a relative path" in e.value.diag.message_primary

    def send(cur: Any, model_id: int, path: str, data: bytes) -> None:
        with cur.copy("COPY pgml.file_parts (model_id, path, part, data) FROM STDIN") as cp:
            cp.write_row((model_id, path, 0, data))

    header = b'{"__metadata__":{}}'
    weights = len(header).to_bytes(8, "little") + header
    config = json.dumps({"architectures": ["BertForSequenceClassification"], "auto_map": {"AutoModel": "x.X"}}).encode()
    listed = [{"path": "config.json", "bytes": len(config)}, {"path": "model.safetensors", "bytes": len(weights)}]
    # auto_map in the stored config.json: refused by finish, nothing kept
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e, conn.transaction(), conn.cursor() as cur:
        model_id = conn.execute(begin, ("p", Jsonb(listed))).fetchone()["id"]
        send(cur, model_id, "config.json", config)
        send(cur, model_id, "model.safetensors", weights)
        conn.execute("SELECT * FROM pgml.import_model_finish(%s)", (model_id,))
    assert '"auto_map"' in e.value.diag.message_primary
    # files of another model (a trained one of another user): refused by the insert trigger
    other = su.execute(
        "WITH p AS (INSERT INTO pgml.projects (name, task, owner) VALUES ('theirs', 'text-classification', %s) "
        "RETURNING id) INSERT INTO pgml.models (project_id, status, task, model_name, owner) "
        "SELECT id, 'successful', 'text-classification', 'x', %s FROM p RETURNING id",
        (OTHER_USER, OTHER_USER),
    ).fetchone()["id"]
    with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction(), conn.cursor() as cur:
        conn.execute(begin, ("p", Jsonb(listed)))
        send(cur, other, "config.json", b"{}")
    # begun, never finished: refused at COMMIT
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as e, conn.transaction():
        conn.execute(begin, ("p", Jsonb(listed)))
    assert "was not finished" in e.value.diag.message_primary and "import_model_finish" in e.value.diag.message_hint
    # without an import begun, a user stores no file at all
    with pytest.raises(psycopg.Error), conn.cursor() as cur:
        send(cur, other, "config.json", b"{}")
    p, m, f, d = stored(su)
    assert (p, m - 1, f, d) == (before[0] + 1, before[1], before[2], before[3])  # only the superuser's 'theirs'
