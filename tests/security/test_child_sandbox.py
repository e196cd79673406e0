"""The child process is sandboxed: it inherits no credential of the worker, and a model whose configuration
names a file outside its own directory (the worker's key, /proc/self/environ) is refused before it loads."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgml_tuned import files, hub_cache
from pgml_tuned.errors import JobError
from pgml_tuned.model_files import outside_paths
from pgml_tuned.models import refuse_outside_paths
from tests.conftest import job_children, wait_for, wait_job
from tests.support import models as testing

SECRETS_IN_THE_WORKER_ENV = {
    "AWS_SECRET_ACCESS_KEY": "aws-secret-123",
    "PGPASSWORD": "pg-password-456",
    "HF_TOKEN": "hf_worker_login_789",
    "PGML_DSN": "postgresql://worker:dsn-password-000@db/app",
}


def test_a_child_inherits_no_credential(ops: psycopg.Connection[dict[str, Any]], daemon: Any) -> None:
    conn = ops  # noop is an administrator's task
    d = daemon(env=SECRETS_IN_THE_WORKER_ENV)
    row = conn.execute(
        "SELECT job_id FROM pgml.tune('sandbox', task => 'noop', model_name => 'none', "
        "hyperparams => '{\"seconds\": 30}')"
    ).fetchone()
    assert row is not None
    (child,) = wait_for(lambda: job_children(d.proc.pid, recursive=True), 30, what="the job's child process")
    env = child.environ()
    cmdline = " ".join(child.cmdline())
    conn.execute("SELECT pgml.cancel(%s)", (row["job_id"],))
    wait_job(conn, row["job_id"], 30)
    for name, value in SECRETS_IN_THE_WORKER_ENV.items():
        assert name not in env and not any(value in v for v in env.values()), name
    for where in ("PGML_KEYRING_DIR", "PGML_CREDENTIALS_DIR", "CREDENTIALS_DIRECTORY"):
        assert where not in env, where
        assert where not in os.environ or not any(os.environ[where] in v for v in env.values()), where
    assert env["HF_HUB_DISABLE_IMPLICIT_TOKEN"] == "1" and "HF_HUB_OFFLINE" in env  # what it needs still passes
    assert "password" not in cmdline and "postgresql://" not in cmdline and "dbname" not in cmdline


@pytest.mark.parametrize(
    ("config", "bad"),
    [
        ({"vocab_file": "/home/worker/.local/share/pgml-tuned/worker.key"}, True),
        ({"vocab": "/proc/self/environ"}, True),
        ({"merges_file": "../../worker.key"}, True),
        ({"tokenizer_file": "~/.ssh/id_rsa"}, True),
        ({"nested": {"spm_file": "C:\\secrets\\key"}}, True),
        ({"files": ["vocab.txt", "sub/../../x"]}, True),
        ({"vocab_file": "vocab.txt", "tokenizer_file": "tokenizer.json", "model_max_length": 512}, False),
        ({"_name_or_path": "/tmp/where/it/was/saved", "chat_template": "{{ '/' + x }}"}, False),
        ({"added_tokens_decoder": {"5": {"content": "../"}}, "id2label": {"0": "/r/funny"}}, False),
        ({"eos_token": "</s>", "note": "a.b..c"}, False),
    ],
)
def test_outside_paths(config: dict[str, Any], bad: bool) -> None:
    assert bool(list(outside_paths(config))) == bad


def test_a_hub_model_naming_the_worker_key_is_refused_before_loading(
    conn: psycopg.Connection[dict[str, Any]], daemon: Any, tmp_path: Path, session_env: Path
) -> None:
    """The attack: a model whose tokenizer reads the worker's key as its vocabulary and saves it with the model."""
    key_file = str(next(Path(os.environ["PGML_KEYRING_DIR"]).glob("*.pem")))
    model = testing.build_tiny_classifier_base(tmp_path / "evil-bert", hidden=32, layers=1)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["vocab_file"] = key_file
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(JobError, match="vocab_file"):
        refuse_outside_paths(model, "evil")
    # as the hub would serve it (`pgml-tuned hub add` refuses it: hub_cache.add checks what store does not)
    hub_cache.store(list(files.walk(model)), "mallory/evil-bert", session_env / "hf")
    shutil.rmtree(model)  # only the hub cache copy is left: the real hub code path serves it

    conn.execute("CREATE TABLE reviews (text text, class text)")
    conn.execute("INSERT INTO reviews SELECT 'review ' || i, (i % 2)::text FROM generate_series(1, 20) i")
    row = conn.execute(
        "SELECT job_id, model_id FROM pgml.tune('evil', task => 'text-classification', "
        "relation_name => 'public.reviews', model_name => 'mallory/evil-bert', "
        'hyperparams => \'{"dataset_args": {"text_column": "text", "class_column": "class"}}\')'
    ).fetchone()
    assert row is not None
    daemon("--drain").wait(120)
    job = wait_job(conn, row["job_id"], 10)
    assert job["status"] == "failed"
    assert "refused" in job["error"] and "vocab_file" in job["error"] and "outside the model" in job["error"]
    stored = conn.execute("SELECT count(*) AS n FROM pgml.files WHERE model_id = %s", (row["model_id"],)).fetchone()
    assert stored is not None and stored["n"] == 0
