"""The retrieval tasks end to end: pgml.tune(task => 'text-embedding' | 'text-ranking') on a pairs table, a daemon
trains with sentence-transformers, the job's metrics hold the tuned and the starting model's retrieval figures, and
the model stored in pgml.files loads with SentenceTransformer / CrossEncoder."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgml_tuned.files import download_model
from tests.conftest import wait_job
from tests.support import models as testing

# words the tiny tokenizer knows: the topic of each pair, and the filler every text shares
TOPICS = [w for w in testing.DEFAULT_WORDS if len(w) > 5][:48]
FILLER = ["the", "and", "of", "to", "in", "is", "it", "for", "on", "at"]
FAST = {"num_train_epochs": 1, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "seed": 1}


def pairs(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(anchor, positive, negative): the anchor is a topic word; its positive says that word among filler, its hard
    negative another topic among the same filler. A model learns to match on the topic and ignore the filler."""
    rng = random.Random(seed)
    rows = []
    for i, topic in enumerate(TOPICS[:n]):
        other = TOPICS[(i + 7) % n]
        words = rng.sample(FILLER, 6)
        rows.append((topic, " ".join([*words[:3], topic, *words[3:]]), " ".join([*words[3:], other, *words[:3]])))
    return rows


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory, session_env: Path) -> Path:
    """A plain BERT encoder (no sentence-transformers files) in the workers' model directories."""
    return testing.build_tiny_classifier_base(tmp_path_factory.mktemp("models") / "tiny-encoder", seed=3)


def tune(
    conn: psycopg.Connection[dict[str, Any]], task: str, relation: str, model: str, hyperparams: dict[str, Any]
) -> int:
    row = conn.execute(
        "SELECT job_id FROM pgml.tune(%s, task => %s, relation_name => %s, model_name => %s, hyperparams => %s,"
        " test_size => 0.25, materialize_snapshot => true)",
        (f"{task}-project", task, relation, model, json.dumps(hyperparams)),
    ).fetchone()
    assert row is not None
    return int(row["job_id"])


def stored(conn: psycopg.Connection[dict[str, Any]], model_id: int, dest: Path) -> tuple[set[str], Path]:
    paths = {r["path"] for r in conn.execute("SELECT DISTINCT path FROM pgml.files WHERE model_id = %s", (model_id,))}
    with psycopg.connect(conn.info.dsn, row_factory=psycopg.rows.dict_row) as c2:
        return paths, download_model(c2, model_id, dest)


def test_text_embedding_trains_scores_and_stores_a_sentence_transformer(
    conn: psycopg.Connection[dict[str, Any]],
    su: psycopg.Connection[dict[str, Any]],
    daemon: Any,
    tiny_encoder: Path,
    tmp_path: Path,
) -> None:
    conn.execute("CREATE TABLE public.qa (question text, answer text, wrong text)")
    conn.cursor().executemany("INSERT INTO public.qa VALUES (%s, %s, %s)", pairs(40))
    daemon()
    job_id = tune(
        conn,
        "text-embedding",
        "public.qa",
        str(tiny_encoder),
        {
            "dataset_args": {
                "anchor_column": "question",
                "positive_column": "answer",
                "negative_column": "wrong",
                "matryoshka_dims": [32, 16],
            },
            "training_args": {**FAST, "save_strategy": "steps", "save_steps": 2},
            "max_seq_length": 16,
        },
    )
    done = wait_job(conn, job_id, 180)
    assert done["status"] == "succeeded", done["error"]
    metrics = done["metrics"]
    for key in ("recall@1", "recall@10", "mrr@10", "ndcg@10"):
        assert 0 <= metrics[f"eval_{key}"] <= 1 and 0 <= metrics[f"start_{key}"] <= 1, key
    assert metrics["ndcg@10_gain"] == pytest.approx(metrics["eval_ndcg@10"] - metrics["start_ndcg@10"])
    assert 0 <= metrics["eval_dim16_ndcg@10"] <= 1 and "eval_loss" in metrics
    # the starting model's figures were in the logs before training began
    logged = conn.execute(
        "SELECT logs FROM pgml.logs WHERE job_id = %s AND logs ? 'start_ndcg@10'", (job_id,)
    ).fetchone()
    assert logged["logs"]["start_ndcg@10"] == metrics["start_ndcg@10"]
    # a retrieval model deploys by its NDCG@10 (pgml._key_metric), the only model of its project
    deployed = conn.execute(
        "SELECT pgml.deployed_model(project_id) AS m FROM pgml.jobs WHERE id = %s", (job_id,)
    ).fetchone()
    assert deployed["m"] == done["model_id"]
    # checkpoints were stored in PostgreSQL (kept with the snapshot), in the sentence-transformers layout
    ckpt = su.execute(
        "SELECT array_agg(DISTINCT f.path) AS paths FROM pgml.checkpoints c "
        "JOIN pgml.checkpoint_files f ON f.checkpoint_id = c.id WHERE c.job_id = %s",
        (job_id,),
    ).fetchone()
    assert ckpt["paths"] and {"modules.json", "model.safetensors", "optimizer.pt"} <= set(ckpt["paths"])

    paths, out = stored(conn, done["model_id"], tmp_path / "embedder")
    assert {
        "modules.json",
        "config_sentence_transformers.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    } <= paths
    assert not {p for p in paths if p.endswith((".bin", ".pt", ".pkl"))} and "README.md" not in paths
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(out))
    assert model.encode(["topic"]).shape == (1, 32) and model.max_seq_length == 16


def test_text_ranking_trains_scores_and_stores_a_cross_encoder(
    conn: psycopg.Connection[dict[str, Any]], daemon: Any, tiny_encoder: Path, tmp_path: Path
) -> None:
    conn.execute("CREATE TABLE public.judged (q text, doc text, relevant boolean)")
    rows = [(a, p, True) for a, p, _ in pairs(40)] + [(a, n, False) for a, _, n in pairs(40)]
    conn.cursor().executemany("INSERT INTO public.judged VALUES (%s, %s, %s)", rows)
    daemon()
    job_id = tune(
        conn,
        "text-ranking",
        "public.judged",
        str(tiny_encoder),
        {
            "dataset_args": {"query_column": "q", "document_column": "doc", "label_column": "relevant"},
            "training_args": FAST,
            "max_seq_length": 16,
        },
    )
    done = wait_job(conn, job_id, 180)
    assert done["status"] == "succeeded", done["error"]
    metrics = done["metrics"]
    for key in ("mrr@10", "ndcg@10"):
        assert 0 < metrics[f"eval_{key}"] <= 1 and 0 < metrics[f"start_{key}"] <= 1, key
    paths, out = stored(conn, done["model_id"], tmp_path / "reranker")
    assert {"config.json", "model.safetensors", "tokenizer.json", "modules.json"} <= paths
    assert not {p for p in paths if p.endswith((".bin", ".pt", ".pkl"))}
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(out))
    assert model.num_labels == 1 and len(model.predict([("a", "b"), ("c", "d")])) == 2


def test_minilm_tuned_retrieves_at_least_as_well_as_it_started(
    conn: psycopg.Connection[dict[str, Any]],
    daemon: Any,
    tmp_path_factory: pytest.TempPathFactory,
    session_env: Path,
) -> None:
    """The real all-MiniLM-L6-v2 weights (a sentence-transformers model: its own pooling and normalisation)."""
    minilm = tmp_path_factory.mktemp("models") / "minilm"  # inside the workers' model directories
    shutil.copytree(testing.minilm_path(), minilm)
    conn.execute("CREATE TABLE public.qa (question text, answer text)")
    conn.cursor().executemany("INSERT INTO public.qa VALUES (%s, %s)", [(a, p) for a, p, _ in pairs(24, seed=5)])
    daemon()
    job_id = tune(
        conn,
        "text-embedding",
        "public.qa",
        str(minilm),
        {
            "dataset_args": {"anchor_column": "question", "positive_column": "answer"},
            "training_args": {"num_train_epochs": 1, "per_device_train_batch_size": 16, "learning_rate": 2e-5},
            "max_seq_length": 16,
        },
    )
    done = wait_job(conn, job_id, 180)
    assert done["status"] == "succeeded", done["error"]
    metrics = done["metrics"]
    assert metrics["eval_ndcg@10"] >= metrics["start_ndcg@10"], metrics
    paths = {
        r["path"] for r in conn.execute("SELECT DISTINCT path FROM pgml.files WHERE model_id = %s", (done["model_id"],))
    }
    assert {"modules.json", "1_Pooling/config.json", "model.safetensors"} <= paths
