"""pgml.load_dataset's job, end to end: a real daemon loads datasets from an offline datasets cache (built by
tests/support/hf_datasets.py) and from files in its --datasets-dir into tables of schema pgml, as users call it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import OTHER_USER, DaemonProc, as_login, connect, wait_job
from tests.support.hf_datasets import install_fingpt_sentiment, install_imdb

Conn = psycopg.Connection[dict[str, Any]]


@pytest.fixture(scope="module")
def hub_cache(session_env: Path) -> None:
    """imdb (6 train, 4 test, 2 unsupervised rows) and FinGPT/fingpt-sentiment-train (8 rows) in the session's
    datasets cache ($HF_HOME/datasets), as a download would have left them."""
    install_imdb(train=6, test=4, unsupervised=2)
    install_fingpt_sentiment(rows=8)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """The workers' datasets directory, with a csv, a json lines file and a parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "datasets"
    (root / "sub").mkdir(parents=True)
    (root / "reviews.csv").write_text('text,stars\n"good, really",5\nbad,1\n"said ""meh""",3\n"",2\n')
    (root / "sub" / "chat.jsonl").write_text(
        "".join(
            json.dumps({"user": f"q{i}", "tags": ["a", "b"][: i % 3], "meta": {"n": i}, "ok": i % 2 == 0}) + "\n"
            for i in range(5)
        )
    )
    pq.write_table(
        pa.table({"x": pa.array([1.5, None, 3.25], pa.float64()), "n": pa.array([1, 2, 3], pa.int32())}),
        root / "points.parquet",
    )
    (tmp_path / "secret.csv").write_text("password\nhunter2\n")
    (root / "escape.csv").symlink_to(tmp_path / "secret.csv")
    return root


@pytest.fixture
def worker(daemon: Callable[..., DaemonProc], hub_cache: None, files: Path) -> Iterator[DaemonProc]:
    yield daemon("--datasets-dir", str(files))


def load(conn: Conn, source: str, **args: Any) -> int:
    params = ", ".join(f'"{k}" => %({k})s' if k == "limit" else f"{k} => %({k})s" for k in args)
    sql = "SELECT pgml.load_dataset_async(%(source)s" + (", " + params if params else "") + ") AS id"
    values = {"source": source, **{k: json.dumps(v) if k == "kwargs" else v for k, v in args.items()}}
    row = conn.execute(sql, values).fetchone()
    assert row is not None
    return int(row["id"])


def loaded(conn: Conn, source: str, **args: Any) -> dict[str, Any]:
    """Load and wait; the job's result row."""
    job_id = load(conn, source, **args)
    job = wait_job(conn, job_id)
    assert job["status"] == "succeeded", job["error"]
    row = conn.execute("SELECT * FROM pgml._dataset_result(%s)", (job_id,)).fetchone()
    assert row is not None
    return {**row, "job_id": job_id}


def column_types(conn: Conn, table: str) -> dict[str, str]:
    rows = conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod) AS t FROM pg_attribute "
        "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        (table,),
    ).fetchall()
    return {r["attname"]: r["t"] for r in rows}


def leftovers(su: Conn) -> list[str]:
    return [
        r["relname"]
        for r in su.execute(
            "SELECT relname FROM pg_class WHERE relkind = 'r' AND (relnamespace = 'pgml_staging'::regnamespace "
            "OR (relnamespace = 'pgml'::regnamespace AND relname LIKE '\\_dataset\\_load%'))"
        ).fetchall()
    ]


def test_imdb_by_hub_name_offline_every_split_typed_and_the_guides_views_work(
    worker: DaemonProc, conn: Conn, su: Conn
) -> None:
    result = loaded(conn, "imdb")
    assert (result["table_name"], result["rows"]) == ("pgml.imdb", 12)
    assert column_types(conn, "pgml.imdb") == {"text": "text", "label": "bigint"}  # ClassLabel → its id
    by_label = {r["label"]: r["n"] for r in conn.execute("SELECT label, count(*) AS n FROM pgml.imdb GROUP BY 1")}
    assert by_label == {-1: 2, 0: 5, 1: 5}  # train + test + unsupervised in one table, as PostgresML
    assert conn.execute("SELECT count(*) AS n FROM pgml.imdb WHERE text LIKE 'unsupervised%'").fetchone() == {"n": 2}
    # the guide's views, created by the loading user
    conn.execute(
        """CREATE VIEW pgml.imdb_shuffled_view AS
           SELECT label, CASE WHEN label = 0 THEN 'negative' WHEN label = 1 THEN 'positive' ELSE 'neutral' END AS class,
                  text
           FROM pgml.imdb WHERE label != -1 ORDER BY RANDOM()"""
    )
    conn.execute(
        "CREATE VIEW pgml.imdb_train_view AS SELECT * FROM pgml.imdb_shuffled_view "
        "LIMIT (SELECT COUNT(*) * 0.8 FROM pgml.imdb_shuffled_view)"
    )
    classes = conn.execute("SELECT class, count(*) AS n FROM pgml.imdb_shuffled_view GROUP BY 1 ORDER BY 1").fetchall()
    assert classes == [{"class": "negative", "n": 5}, {"class": "positive", "n": 5}]
    assert conn.execute("SELECT count(*) AS n FROM pgml.imdb_train_view").fetchone() == {"n": 8}
    # the job behaves as any job: progress, log rows, the registry
    status = conn.execute("SELECT progress_pct, status FROM pgml.job_status WHERE id = %s", (result["job_id"],))
    assert status.fetchone() == {"progress_pct": 100, "status": "succeeded"}
    logs = conn.execute(
        "SELECT kind, logs FROM pgml.logs WHERE job_id = %s ORDER BY id", (result["job_id"],)
    ).fetchall()
    assert [r for r in logs if r["kind"] == "train"][-1]["logs"]["rows"] == 12
    said = [r["logs"]["message"] for r in logs if r["kind"] == "info"]
    assert any(m.startswith("loaded 12 rows into pgml.") for m in said) and said[-1].startswith("succeeded"), said
    registry = conn.execute("SELECT * FROM pgml.datasets WHERE name = 'imdb'").fetchone()
    assert registry is not None and registry["loaded_by"] == "pgml_test_user" and registry["rows"] == 12
    assert registry["job_id"] == result["job_id"]
    owner = su.execute("SELECT relowner::regrole::text AS o FROM pg_class WHERE oid = 'pgml.imdb'::regclass")
    assert owner.fetchone() == {"o": "pgml_owner"}
    assert leftovers(su) == []


def test_fingpt_quoted_name_and_call_wait(worker: DaemonProc, conn: Conn) -> None:
    job_id = load(conn, "FinGPT/fingpt-sentiment-train")
    conn.execute("CALL pgml.wait(%s)", (job_id,))
    assert conn.execute("SELECT * FROM pgml._dataset_result(%s)", (job_id,)).fetchone() == {
        "table_name": 'pgml."FinGPT/fingpt-sentiment-train"',
        "rows": 8,
    }
    conn.execute(
        'CREATE VIEW pgml.fingpt_sentiment_shuffled_view AS SELECT * FROM pgml."FinGPT/fingpt-sentiment-train" '
        "ORDER BY RANDOM()"
    )
    assert column_types(conn, 'pgml."FinGPT/fingpt-sentiment-train"') == {
        "input": "text",
        "output": "text",
        "instruction": "text",
    }
    assert conn.execute("SELECT count(*) AS n FROM pgml.fingpt_sentiment_shuffled_view").fetchone() == {"n": 8}


def test_local_csv_jsonl_parquet_a_builder_and_limit(worker: DaemonProc, conn: Conn) -> None:
    assert loaded(conn, "reviews.csv")["table_name"] == 'pgml."reviews.csv"'
    rows = conn.execute('SELECT text, stars FROM pgml."reviews.csv"').fetchall()
    assert rows == [
        {"text": "good, really", "stars": 5},
        {"text": "bad", "stars": 1},
        {"text": 'said "meh"', "stars": 3},
        {"text": None, "stars": 2},  # pandas' CSV reader reads an empty field as missing
    ]
    result = loaded(conn, "sub/chat.jsonl", limit=3)
    assert result == {**result, "table_name": 'pgml."sub/chat.jsonl"', "rows": 3}
    types = column_types(conn, 'pgml."sub/chat.jsonl"')
    assert types == {"user": "text", "tags": "jsonb", "meta": "jsonb", "ok": "boolean"}
    rows = conn.execute('SELECT * FROM pgml."sub/chat.jsonl" ORDER BY "user"').fetchall()
    assert rows[2] == {"user": "q2", "tags": ["a", "b"], "meta": {"n": 2}, "ok": True}
    assert loaded(conn, "points.parquet")["rows"] == 3
    assert column_types(conn, 'pgml."points.parquet"') == {"x": "double precision", "n": "integer"}
    assert [r["x"] for r in conn.execute('SELECT x FROM pgml."points.parquet"')] == [1.5, None, 3.25]
    # PostgresML's way for local files: a builder name with kwargs.data_files (the table is named after it)
    result = loaded(conn, "csv", kwargs={"data_files": {"train": "reviews.csv", "test": ["reviews.csv"]}})
    assert result == {**result, "table_name": "pgml.csv", "rows": 8}


def test_reload_leaves_exactly_one_copy_with_and_without_dependent_views(
    worker: DaemonProc, conn: Conn, su: Conn
) -> None:
    first = loaded(conn, "reviews.csv")
    oid = conn.execute("""SELECT 'pgml."reviews.csv"'::regclass::oid AS o""").fetchone()
    second = loaded(conn, "reviews.csv")  # nothing depends on it: the new table replaces the old one
    assert conn.execute('SELECT count(*) AS n FROM pgml."reviews.csv"').fetchone() == {"n": 4}
    assert conn.execute("""SELECT 'pgml."reviews.csv"'::regclass::oid AS o""").fetchone() != oid
    conn.execute('CREATE VIEW pgml.stars AS SELECT stars FROM pgml."reviews.csv"')
    third = loaded(conn, "reviews.csv")  # a view depends on it: the same table gets the new rows
    assert conn.execute("SELECT count(*) AS n FROM pgml.stars").fetchone() == {"n": 4}
    assert conn.execute('SELECT count(*) AS n FROM pgml."reviews.csv"').fetchone() == {"n": 4}
    assert len({first["job_id"], second["job_id"], third["job_id"]}) == 3
    registry = conn.execute("SELECT job_id FROM pgml.datasets WHERE name = 'reviews.csv'").fetchall()
    assert registry == [{"job_id": third["job_id"]}]
    assert leftovers(su) == []


@pytest.mark.parametrize(
    ("source", "args", "message"),
    [
        ("", {}, "source is required"),
        ("no spaces allowed", {}, "neither a Hugging Face dataset name nor a data file"),
        ("../etc/passwd.csv", {}, "leaves its directory"),
        ("x" * 60 + ".csv", {}, "at most 63"),
        ("pandas", {}, "builder is not allowed"),
        ("imdb", {"limit": 0}, "at least 1 row"),
        ("imdb", {"kwargs": {"cache_dir": "/tmp"}}, "kwargs key 'cache_dir' is not allowed"),
        ("imdb", {"kwargs": {"trust_remote_code": True}}, "kwargs key 'trust_remote_code' is not allowed"),
        ("imdb", {"kwargs": {"data_files": "/etc/passwd"}}, "is an absolute path"),
        ("csv", {"kwargs": {"data_files": {"train": ["ok.csv", "../../x.csv"]}}}, "leaves its directory"),
        ("csv", {"kwargs": {"data_files": "https://example.com/x.csv"}}, "is a URL"),
        ("csv", {}, "needs kwargs.data_files"),
        ("imdb", {"kwargs": ["split"]}, "kwargs must be a JSON object"),
        ("jobs", {}, "pgml.jobs exists and was not created by pgml.load_dataset"),
    ],
)
def test_bad_input_is_refused_at_once_and_nothing_is_queued(
    conn: Conn, source: str, args: dict[str, Any], message: str
) -> None:
    with pytest.raises(psycopg.Error, match=message) as e:
        load(conn, source, **args)
    assert e.value.diag.message_hint  # every refusal says what to do instead
    assert conn.execute("SELECT count(*) AS n FROM pgml.jobs").fetchone() == {"n": 0}


def test_tune_cannot_queue_a_load(conn: Conn) -> None:
    conn.execute("CREATE TABLE public.t (text text)")
    with pytest.raises(psycopg.Error, match=r"queued by pgml\.load_dataset"):
        conn.execute(
            "SELECT * FROM pgml.tune('p', task => 'load_dataset', relation_name => 'public.t', model_name => 'x')"
        )


@pytest.mark.parametrize(
    ("source", "args", "message"),
    [
        ("/etc/hostname.csv", {}, "outside the workers' datasets directory"),
        ("escape.csv", {}, "outside the workers' datasets directory"),  # a symlink out of it
        ("csv", {"kwargs": {"data_files": "missing/*.csv"}}, "no such file"),
        ("nobody/no-such-dataset", {}, "could not load dataset 'nobody/no-such-dataset'.*HF_HUB_OFFLINE=1"),
    ],
)
def test_a_load_the_worker_refuses_fails_clearly_and_creates_nothing(
    worker: DaemonProc, conn: Conn, su: Conn, source: str, args: dict[str, Any], message: str
) -> None:
    job_id = load(conn, source, **args)
    job = wait_job(conn, job_id)
    assert job["status"] == "failed"
    assert __import__("re").search(message, job["error"]), job["error"]
    with pytest.raises(psycopg.Error, match="failed"):
        conn.execute("SELECT * FROM pgml._dataset_result(%s)", (job_id,))
    assert conn.execute("SELECT to_regclass(format('pgml.%%I', %s::text)) AS r", (source,)).fetchone() == {"r": None}
    assert conn.execute("SELECT count(*) AS n FROM pgml.datasets").fetchone() == {"n": 0}
    assert leftovers(su) == []


def test_a_failed_reload_leaves_the_old_table_whole_and_no_half_table(
    worker: DaemonProc, conn: Conn, su: Conn, files: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"]}), files / "texts.parquet")
    loaded(conn, "texts.parquet")
    # the new file's last row holds a NUL byte: PostgreSQL refuses it in the middle of the COPY
    texts = [f"review {i}" for i in range(25_000)] + ["bad\x00row"]
    pq.write_table(pa.table({"text": texts}), files / "texts.parquet")
    job = wait_job(conn, load(conn, "texts.parquet"))
    assert job["status"] == "failed" and "0x00" in job["error"], job["error"]
    assert conn.execute('SELECT count(*) AS n FROM pgml."texts.parquet"').fetchone() == {"n": 2}
    assert leftovers(su) == []
    # new columns under a view that depends on the old ones: refused at the swap, the old table stays
    conn.execute('CREATE VIEW pgml.texts AS SELECT text FROM pgml."texts.parquet"')
    pq.write_table(pa.table({"text": ["c"], "n": [1]}), files / "texts.parquet")
    job = wait_job(conn, load(conn, "texts.parquet"))
    assert job["status"] == "failed" and "has dependent objects (view pgml.texts)" in job["error"], job["error"]
    assert conn.execute("SELECT count(*) AS n FROM pgml.texts").fetchone() == {"n": 2}
    assert leftovers(su) == []


def test_another_user_can_neither_read_nor_replace_the_table(
    worker: DaemonProc, conn: Conn, su_dsn: str, ops: Conn
) -> None:
    loaded(conn, "points.parquet")
    with connect(as_login(su_dsn, OTHER_USER)) as other:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            other.execute('SELECT * FROM pgml."points.parquet"')
        assert other.execute("SELECT count(*) AS n FROM pgml.datasets").fetchone() == {"n": 0}
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="was loaded by pgml_test_user"):
            load(other, "points.parquet")
    # an administrator may replace it (and then it is theirs)
    result = loaded(ops, "points.parquet")
    assert result["rows"] == 3
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute('SELECT * FROM pgml."points.parquet"')
