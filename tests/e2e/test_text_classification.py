"""What a user does: the seed's SQL verbatim, a daemon, then the results — logs, metrics, files, reload."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgml_tuned import hub_cache
from pgml_tuned.files import download_model
from tests import seed
from tests.conftest import job_row, wait_for, wait_job
from tests.integration.test_migrate_cli import cli
from tests.support import models as testing
from tests.support.hf_datasets import install_imdb


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory, session_env: Path) -> Path:
    path = testing.build_tiny_classifier_base(tmp_path_factory.mktemp("models") / "tiny-bert")
    # the seed names a hub model: serve it from the offline hub cache, through the real hub code path
    hub_cache.add(path, "distilbert-base-uncased", session_env / "hf")
    return path


@pytest.fixture
def imdb_cache(session_env: Path) -> None:
    """`imdb` in the worker's offline datasets cache, as a download would leave it: 80 train, 70 test and 5
    unsupervised (label -1) reviews of IMDB's size."""
    install_imdb(train=80, test=70, unsupervised=5)


def test_seed_copy_is_current() -> None:
    if not seed.SHARED_GUIDE.exists():
        pytest.skip("../shared/seed is not beside this checkout")
    assert seed.GUIDE.read_text() == seed.SHARED_GUIDE.read_text()


def test_seed_text_classification_end_to_end(
    conn: psycopg.Connection[dict[str, Any]], daemon: Any, tiny_bert: Path, imdb_cache: None, tmp_path: Path
) -> None:
    d = daemon()  # trains, loads datasets and answers pgml.transform
    # section 1 verbatim: returns when pgml.imdb is there, every split merged (the views filter label -1)
    loaded = conn.execute(seed.find("SELECT pgml.load_dataset('imdb')")).fetchone()["load_dataset"]
    assert tuple(loaded) == ("pgml.imdb", "155")  # (table_name, rows), PostgresML's shape
    assert conn.execute("SELECT count(*) AS n FROM pgml.imdb WHERE label = -1").fetchone()["n"] == 5
    # sections 2-4 verbatim: views, EDA, split views
    conn.execute(seed.find(seed.IMDB_SHUFFLED_VIEW))
    counts = conn.execute(seed.find("SELECT\n    class")).fetchall()
    assert {r["class"] for r in counts} == {"negative", "positive"}
    assert len(conn.execute(seed.find("SELECT LEFT(text,100)")).fetchall()) == 5
    conn.execute(seed.find(seed.IMDB_TRAIN_VIEW))
    conn.execute(seed.find(seed.IMDB_TEST_VIEW))

    # section 5 verbatim: returns a job id at once
    t0 = time.monotonic()
    result = conn.execute(seed.find(seed.TUNE_IMDB)).fetchone()
    assert time.monotonic() - t0 < 1.0
    job_id = seed.job_id(result["tune"])
    job = job_row(conn, job_id)
    assert job["status"] == "queued" and job["secrets"].startswith("v2:")
    assert "YOUR_HUB_TOKEN" not in json.dumps(job["hyperparams"])

    # the daemon trains it; logs appear while it runs, visible to this other session
    wait_for(
        lambda: conn.execute(
            "SELECT 1 FROM pgml.logs l JOIN pgml.jobs j ON j.id = l.job_id "
            "WHERE l.job_id = %s AND j.status = 'running' AND l.logs ? 'loss'",
            (job_id,),
        ).fetchone(),
        120,
        interval=0.02,
        what="a loss row while the job is running",
    )
    done = wait_job(conn, job_id, 300)
    assert done["status"] == "succeeded", done["error"]
    model_id = done["model_id"]
    assert "YOUR_HUB_TOKEN" not in d.output(), "the token must never be logged"

    # the seed's monitoring query, verbatim but for the model id
    query = seed.find("SELECT logs->>'epoch'")
    assert "model_id = 993" in query
    rows = conn.execute(query.replace("model_id = 993", f"model_id = {model_id}")).fetchall()
    assert len(rows) >= 10
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps) and float(rows[-1]["epoch"]) == pytest.approx(20.0, abs=0.5)
    first = conn.execute(
        "SELECT logs FROM pgml.logs WHERE model_id = %s AND logs ? 'loss' ORDER BY id LIMIT 1", (model_id,)
    ).fetchone()["logs"]
    assert {"loss", "grad_norm", "learning_rate", "epoch", "step", "max_steps", "timestamp"} <= set(first)
    assert isinstance(first["loss"], float) and first["max_steps"] == done["progress"]["max_steps"]

    model = conn.execute("SELECT * FROM pgml.models WHERE id = %s", (model_id,)).fetchone()
    assert model["status"] == "successful"
    metrics = model["metrics"]
    for key in ("eval_loss", "eval_accuracy", "eval_f1", "eval_runtime", "train_loss"):
        assert isinstance(metrics[key], float), key
    assert 0 <= metrics["eval_accuracy"] <= 1 and 0 <= metrics["eval_f1"] <= 1
    assert done["metrics"] == metrics
    assert "hub_token" not in model["hyperparams"]["training_args"]
    # push_to_hub was asked for, but this worker is offline: said so in the logs, model kept in pgml.files
    assert conn.execute(
        "SELECT 1 FROM pgml.logs WHERE model_id = %s AND kind = 'warning' AND logs->>'message' LIKE 'push_to_hub%%'",
        (model_id,),
    ).fetchone()

    paths = {r["path"] for r in conn.execute("SELECT DISTINCT path FROM pgml.files WHERE model_id = %s", (model_id,))}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= paths

    # reassemble, reload, predict by label name
    from transformers import AutoModelForSequenceClassification, pipeline

    with psycopg.connect(conn.info.dsn, row_factory=psycopg.rows.dict_row) as c2:
        out = download_model(c2, model_id, tmp_path / "reloaded")
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert reloaded.config.id2label == {0: "negative", 1: "positive"}
    classify = pipeline("text-classification", model=str(out), tokenizer=str(out), device="cpu")
    predictions = classify(["A wonderful, moving film.", "Dull and far too long."])
    assert {p["label"] for p in predictions} <= {"negative", "positive"}

    # section 6 verbatim: the guide pushed the model to the hub as santiadavani/imdb_review_sentiement; this worker
    # is offline, so the same files sit in its hub cache under that name (the real hub code path serves them)
    hub_cache.add(out, "santiadavani/imdb_review_sentiement", Path(os.environ["HF_HOME"]))
    realtime = conn.execute(seed.find("SELECT pgml.transform(")).fetchone()["transform"]
    texts = [
        "I would not give this movie a rating, its not worthy. I watched it only because I am a Pfieffer fan. ",
        "This movie was sooooooo good! It was hilarious! There are so many jokes that you can just watch the",
    ]
    expected = classify(texts, truncation=True, max_length=reloaded.config.max_position_embeddings)
    assert [r["label"] for r in realtime] == [e["label"] for e in expected]
    assert [r["score"] for r in realtime] == pytest.approx([e["score"] for e in expected], abs=1e-4)
    batch = conn.execute(seed.find("SELECT\n    LEFT(text, 100) AS truncated_text")).fetchall()
    assert len(batch) == 2 and {r["predicted_class"] for r in batch} <= {"negative", "positive"}
    assert all(0 <= r["score"] <= 1 for r in batch)
    # and straight from pgml.files, no hub: the project's deployed model (its only one, deployed automatically)
    assert (
        conn.execute(
            "SELECT model_id FROM pgml.deployments d JOIN pgml.projects p ON p.id = d.project_id "
            "WHERE p.name = 'imdb_review_sentiment' ORDER BY d.id DESC LIMIT 1"
        ).fetchone()["model_id"]
        == model_id
    )
    stored = conn.execute(
        'SELECT pgml.transform(task => \'{"task": "text-classification", "model": '
        '"pgml:imdb_review_sentiment"}\'::jsonb, inputs => %s) AS t',
        (texts,),
    ).fetchone()["t"]
    assert [r["label"] for r in stored] == [e["label"] for e in expected]
    assert [r["score"] for r in stored] == pytest.approx([e["score"] for e in expected], abs=1e-4)

    # loading it again replaces it cleanly (the guide's views over it stay valid): one copy
    conn.execute(seed.find("SELECT pgml.load_dataset('imdb')"))
    assert conn.execute("SELECT count(*) AS n FROM pgml.imdb").fetchone()["n"] == 155
    assert conn.execute("SELECT count(*) AS n FROM pgml.imdb_train_view").fetchone()["n"] > 0


def submit(conn: psycopg.Connection[dict[str, Any]], project: str, relation: str, model: str, **hp: Any) -> int:
    hyperparams = {
        "dataset_args": {"text_column": "text", "class_column": "class"},
        "training_args": {"num_train_epochs": 1, "per_device_train_batch_size": 8},
    }
    for k, v in hp.items():
        hyperparams[k] = {**hyperparams.get(k, {}), **v}
    row = conn.execute(
        "SELECT job_id FROM pgml.tune(%s, task => 'text-classification', relation_name => %s, "
        "model_name => %s, test_size => 0.25, hyperparams => %s::jsonb)",
        (project, relation, model, json.dumps(hyperparams)),
    ).fetchone()
    return int(row["job_id"])


def test_failures_name_the_problem_and_the_daemon_keeps_serving(
    conn_dsn: str, conn: psycopg.Connection[dict[str, Any]], daemon: Any, tiny_bert: Path
) -> None:
    conn.execute("CREATE TABLE reviews (text text, class text)")
    conn.execute(
        "INSERT INTO reviews SELECT 'review number ' || i, CASE WHEN i % 2 = 0 THEN 'good' ELSE 'bad' END "
        "FROM generate_series(1, 24) i"
    )
    conn.execute("CREATE TABLE with_null (text text, class text)")
    conn.execute(
        "INSERT INTO with_null SELECT CASE WHEN i = 7 THEN NULL ELSE 'text ' || i END, (i % 2)::text "
        "FROM generate_series(1, 12) i"
    )
    bad_arg = submit(conn, "a", "reviews", str(tiny_bert), training_args={"evaluation_strategy": "epoch"})
    no_model = submit(conn, "b", "reviews", "/nonexistent/model/dir")
    null_text = submit(conn, "c", "with_null", str(tiny_bert))
    good = submit(conn, "d", "reviews", str(tiny_bert))
    d = daemon("--concurrency", "2")
    errors = {j: wait_job(conn, j, 240) for j in (bad_arg, no_model, null_text, good)}
    assert errors[bad_arg]["status"] == "failed"
    assert "unknown training_args key 'evaluation_strategy'; did you mean 'eval_strategy'?" in errors[bad_arg]["error"]
    assert errors[no_model]["status"] == "failed"
    assert "'/nonexistent/model/dir' is not in the workers' model directories" in errors[no_model]["error"]
    assert errors[null_text]["status"] == "failed"
    assert "row 7 of public.with_null has NULL in column 'text'" in errors[null_text]["error"]
    assert errors[good]["status"] == "succeeded", errors[good]["error"]
    assert d.proc.poll() is None
    # the CLI's view of them: wait's final lines (metrics, model id, download command; exit 1: one failed) and
    # status's key metric, a number in --json
    r = cli("wait", str(good), str(null_text), "--dsn", conn_dsn)
    model = errors[good]["model_id"]
    accuracy = errors[good]["metrics"]["eval_accuracy"]
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines()[0].startswith(f"job {good} succeeded: eval_accuracy {accuracy:.4g} eval_f1 ")
    assert r.stdout.splitlines()[0].endswith(f"; model {model}: pgml-tuned download {model} ./model-{model}")
    assert r.stdout.splitlines()[1].startswith(f"job {null_text} failed: row 7 of public.with_null has NULL")
    jobs = {j["id"]: j for j in json.loads(cli("status", "--json", "--dsn", conn_dsn).stdout)["jobs"]}
    assert jobs[good]["key_metric"] == "eval_accuracy" and jobs[good]["key_metric_value"] == accuracy
    assert jobs[null_text]["key_metric"] is None and isinstance(jobs[good]["progress_pct"], float)
    table = cli("status", "--dsn", conn_dsn).stdout
    assert f"eval_accuracy {accuracy:.4g}" in table and "None" not in table


def test_text_pair_classification(conn: psycopg.Connection[dict[str, Any]], daemon: Any, tiny_bert: Path) -> None:
    conn.execute("CREATE TABLE pairs (premise text, hypothesis text, label text)")
    conn.execute(
        "INSERT INTO pairs SELECT 'the film is ' || w, "
        "'it is ' || CASE WHEN i % 2 = 0 THEN w ELSE 'other' END,"
        " CASE WHEN i % 2 = 0 THEN 'entailment' ELSE 'contradiction' END "
        "FROM generate_series(1, 40) i, LATERAL (SELECT (ARRAY['good','bad','long'])[1 + i % 3] AS w) x"
    )
    job = conn.execute(
        "SELECT job_id FROM pgml.tune('pairs', task => 'text-pair-classification', relation_name => 'pairs', "
        "model_name => %s, test_size => 10, test_sampling => 'stratified', hyperparams => %s::jsonb)",
        (
            str(tiny_bert),
            json.dumps(
                {
                    "dataset_args": {"text1_column": "premise", "text2_column": "hypothesis", "class_column": "label"},
                    # what the speed defaults choose on a GPU host (recipes/hf.py): loader processes forked by the
                    # sandboxed child, kept across training and evaluation
                    "training_args": {
                        "num_train_epochs": 1,
                        "dataloader_num_workers": 2,
                        "dataloader_persistent_workers": True,
                    },
                }
            ),
        ),
    ).fetchone()["job_id"]
    daemon("--drain")
    done = wait_job(conn, job, 180)
    assert done["status"] == "succeeded", done["error"]
    assert done["metrics"]["eval_samples_per_second"] > 0
    info = conn.execute("SELECT logs FROM pgml.logs WHERE job_id = %s AND logs ? 'eval_accuracy'", (job,)).fetchone()
    assert info is not None


def test_max_seq_length_above_the_model_limit_fails_before_training(
    conn: psycopg.Connection[dict[str, Any]], daemon: Any, tiny_bert: Path
) -> None:
    conn.execute("CREATE TABLE reviews (text text, class text)")
    conn.execute(
        "INSERT INTO reviews SELECT repeat('word ', 300) || i, CASE WHEN i % 2 = 0 THEN 'good' ELSE 'bad' END "
        "FROM generate_series(1, 12) i"
    )
    job = conn.execute(
        "SELECT job_id FROM pgml.tune('long', task => 'text-classification', relation_name => 'reviews', "
        "model_name => %s, hyperparams => %s::jsonb)",
        (str(tiny_bert), json.dumps({"dataset_args": {"text_column": "text", "class_column": "class"},
                                     "max_seq_length": 962})),
    ).fetchone()["job_id"]  # fmt: skip
    daemon("--drain")
    row = wait_job(conn, job, 240)
    assert row["status"] == "failed"
    assert "hyperparams.max_seq_length 962 is more than model" in row["error"], row["error"]
    assert "at most 128 tokens (its config's max_position_embeddings)" in row["error"], row["error"]
    assert "size of tensor" not in row["error"]
    trained = conn.execute("SELECT count(*) AS n FROM pgml.logs WHERE job_id = %s AND logs ? 'loss'", (job,))
    assert trained.fetchone()["n"] == 0  # refused before the first step


def test_an_unreachable_hub_says_what_to_do(
    conn: psycopg.Connection[dict[str, Any]], daemon: Any, tiny_bert: Path
) -> None:
    """HF_HUB_OFFLINE unset and the hub at a closed port: a model not in the cache, and push_to_hub, fail at once
    with what to do, not with a connection error's traceback."""
    conn.execute("CREATE TABLE reviews (text text, class text)")
    conn.execute("INSERT INTO reviews SELECT 'review ' || i, (i % 2)::text FROM generate_series(1, 12) i")
    not_cached = submit(conn, "a", "reviews", "pgml-test/not-in-any-cache")
    push = submit(
        conn, "b", "reviews", str(tiny_bert), training_args={"push_to_hub": True, "hub_token": "hf_NotARealToken"}
    )
    started = time.monotonic()
    daemon("--drain", env={"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"})
    rows = {j: wait_job(conn, j, 240) for j in (not_cached, push)}
    assert time.monotonic() - started < 180
    error = rows[not_cached]["error"]
    assert rows[not_cached]["status"] == "failed"
    assert error.startswith("cannot fetch model 'pgml-test/not-in-any-cache': the worker cannot reach the Hugging "
                            "Face Hub (http://127.0.0.1:9): set HF_HUB_OFFLINE=1 and use a cached or local model, "
                            "or give the worker network access"), error  # fmt: skip
    error = rows[push]["error"]
    assert rows[push]["status"] == "failed"
    assert error.startswith("training_args.push_to_hub: the worker cannot reach the Hugging Face Hub"), error
    assert "hf_NotARealToken" not in error
