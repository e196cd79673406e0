"""`pgml-tuned dashboard` in a real browser (Debian's chromium, driven by playwright): a job's curve grows on the
page while it trains, two models side by side, a model's files and metrics, and a second user sees none of it.

Needs `chromium` on PATH (Debian: `apt-get install chromium`) and the playwright package (the test extra); the
browser test is skipped, saying so, without them. PGML_DASHBOARD_SCREENSHOT=path saves a screenshot of the page
(the README's docs/dashboard.png is one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgml_tuned import db
from tests.conftest import ADMIN, OTHER_USER, as_login, connect, wait_for, wait_job
from tests.support import models as testing

pytestmark = pytest.mark.slow


class Dashboard:
    """A real `pgml-tuned dashboard` subprocess on a free port; `url` is the address it printed (with its token)."""

    def __init__(self, dsn: str, home: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgml_tuned.cli", "dashboard", "--dsn", dsn, "--home", str(home), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        found = re.search(r"(http://127\.0\.0\.1:\d+/)#token=(\S+)", line)
        assert found, f"no URL in the dashboard's first line: {line!r}"
        self.url = found.group(0)
        self.base, self.token = found.group(1), found.group(2)

    def get(self, path: str, token: bool = True, method: str = "GET") -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if token else {}
        request = urllib.request.Request(self.base + path.lstrip("/"), headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = e.read().decode()
            return e.code, json.loads(body) if body.startswith("{") else body

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out or ""


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[Callable[..., Dashboard]]:
    started: list[Dashboard] = []

    def start(dsn: str, env: dict[str, str] | None = None) -> Dashboard:
        d = Dashboard(dsn, tmp_path, env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.build_tiny_classifier_base(tmp_path_factory.mktemp("models") / "tiny-bert")


def tune(conn: psycopg.Connection[dict[str, Any]], project: str, model: Path, epochs: int) -> dict[str, Any]:
    """A text-classification job that logs every step and evaluates every 10: seconds of curve on the CPU."""
    hyperparams = {
        "dataset_args": {"text_column": "text", "class_column": "class"},
        "training_args": {
            "num_train_epochs": epochs,
            "per_device_train_batch_size": 4,
            "logging_steps": 1,
            "eval_strategy": "steps",
            "eval_steps": 10,
            "learning_rate": 0.002,
        },
    }
    return conn.execute(
        "SELECT job_id, model_id FROM pgml.tune(%s, task => 'text-classification', relation_name => 'reviews', "
        "model_name => %s, test_size => 0.25, hyperparams => %s::jsonb)",
        (project, str(model), json.dumps(hyperparams)),
    ).fetchone()


def test_dashboard_json_follows_the_viewers_rights(
    conn: psycopg.Connection[dict[str, Any]], su_dsn: str, daemon: Any, dashboard: Any, tiny_classifier: Path
) -> None:
    """Without a browser: the endpoints, the token, read-only sessions, and the pgml_logs notices."""
    conn.execute(
        "CREATE TABLE reviews AS SELECT 'review ' || i AS text, (i % 2)::text AS class FROM generate_series(1, 24) i"
    )
    with connect(conn.info.dsn) as listener:
        listener.execute("LISTEN pgml_logs")
        job = tune(conn, "dash_json", tiny_classifier, epochs=1)
        daemon("--drain")
        done = wait_job(conn, job["job_id"], 180)
        assert done["status"] == "succeeded", done["error"]
        notices = [json.loads(n.payload) for n in listener.notifies(timeout=1, stop_after=50)]
    # new log rows wake listeners: one notice per batch of rows, naming no job (anyone may LISTEN)
    assert notices and all(n == {"type": "logs_written"} for n in notices)

    mine = dashboard(conn.info.dsn, env={"PGML_POLL_SECONDS": "600"})  # live only through its LISTEN
    theirs = dashboard(as_login(su_dsn, OTHER_USER))
    status, jobs = mine.get("/api/jobs")
    assert status == 200 and [j["id"] for j in jobs] == [job["job_id"]]
    assert jobs[0]["status"] == "succeeded" and jobs[0]["model_id"] == job["model_id"]
    assert jobs[0]["metrics"]["eval_accuracy"] == done["metrics"]["eval_accuracy"]

    status, model = mine.get(f"/api/models/{job['model_id']}")
    assert status == 200 and model["status"] == "successful" and model["job_id"] == job["job_id"]
    sizes = {
        r["path"]: r["bytes"]
        for r in conn.execute(
            "SELECT path, sum(octet_length(data))::bigint AS bytes FROM pgml.files WHERE model_id = %s GROUP BY path",
            (job["model_id"],),
        )
    }
    assert {f["path"]: f["bytes"] for f in model["files"]} == sizes and "model.safetensors" in sizes
    status, logs = mine.get(f"/api/models/{job['model_id']}/logs")
    in_db = conn.execute("SELECT count(*) AS n FROM pgml.logs WHERE model_id = %s", (job["model_id"],)).fetchone()
    assert status == 200 and len(logs) == in_db["n"] and any("loss" in r["logs"] for r in logs)
    status, tail = mine.get(f"/api/models/{job['model_id']}/logs?after={logs[-2]['id']}")
    assert [r["id"] for r in tail] == [logs[-1]["id"]]

    # another user: no job, no model, no log row, though it asks for them by id
    assert theirs.get("/api/jobs") == (200, [])
    status, body = theirs.get(f"/api/models/{job['model_id']}")
    assert status == 404 and "no model" in body["error"]
    assert theirs.get(f"/api/models/{job['model_id']}/logs") == (200, [])

    # the token: nothing without it; wrong parameters say what is wrong
    status, body = mine.get("/api/jobs", token=False)
    assert status == 403 and "token" in body
    status, body = mine.get("/api/models/1/logs?after=x")
    assert status == 400 and "after='x' is not a whole number" in body["error"]
    status, body = mine.get("/api/stream?models=1;DROP")
    assert status == 400 and "comma-separated list of model ids" in body["error"]

    # the live stream: the jobs, then the model's log rows, as server-sent events; then a new log row arrives at
    # once, through pgml_logs (its poll is 10 minutes away)
    ticket = mine.get("/api/ticket", method="POST")[1]["ticket"]
    with urllib.request.urlopen(f"{mine.base}api/stream?models={job['model_id']}&ticket={ticket}", timeout=20) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")

        def next_event() -> tuple[str, Any]:
            name = None
            while True:
                line = r.readline().decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: ") and name:
                    return name, json.loads(line.removeprefix("data: "))

        assert next_event() == ("jobs", jobs)
        assert next_event() == ("logs", {"model_id": job["model_id"], "rows": logs})
        with connect(su_dsn) as su:
            su.execute(
                "INSERT INTO pgml.logs (model_id, project_id, job_id, attempt, seq, logs) "
                'SELECT model_id, project_id, id, attempt, 99999, \'{"step": 999, "loss": 0.5}\' FROM pgml.jobs '
                "WHERE id = %s",
                (job["job_id"],),
            )
        t0 = time.monotonic()
        name, data = next_event()
        while name == "jobs":
            name, data = next_event()
        assert name == "logs" and [row["logs"] for row in data["rows"]] == [{"step": 999, "loss": 0.5}]
        assert time.monotonic() - t0 < 10

    # its sessions are read-only: what the login may do in SQL (cancel its job) fails in them
    with (
        psycopg.connect(conn.info.dsn, autocommit=True, **db.conn_kwargs("test", read_only=True)) as ro,
        pytest.raises(psycopg.errors.ReadOnlySqlTransaction),
    ):
        ro.execute("SELECT pgml.cancel(%s)", (job["job_id"],))

    # a port in use: one line saying so, exit 2
    port = mine.base.rstrip("/").rsplit(":", 1)[1]
    busy = subprocess.run(
        [sys.executable, "-m", "pgml_tuned.cli", "dashboard", "--dsn", conn.info.dsn, "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert busy.returncode == 2, busy.stderr
    assert f"pgml-tuned: cannot listen on 127.0.0.1:{port}: Address already in use" in busy.stderr


def chromium_or_skip() -> str:
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no chromium on PATH for the browser test (Debian: apt-get install chromium)")
    return path


def test_curve_grows_in_the_browser_while_the_job_trains(
    conn: psycopg.Connection[dict[str, Any]], su_dsn: str, daemon: Any, dashboard: Any, tiny_classifier: Path
) -> None:
    chromium = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    # words the tiny tokenizer knows, one sentiment per class: a curve that falls
    conn.execute(
        "CREATE TABLE reviews AS SELECT CASE WHEN i % 2 = 0 THEN 'good' ELSE 'bad' END AS class, "
        "CASE WHEN i % 2 = 0 THEN (ARRAY['superb', 'wonderful', 'brilliant', 'charming'])[1 + i % 4] "
        "ELSE (ARRAY['awful', 'boring', 'tedious', 'painful'])[1 + i % 4] END || ' film number ' || i AS text "
        "FROM generate_series(1, 48) i"
    )
    short = tune(conn, "sentiment_short", tiny_classifier, epochs=3)
    long = tune(conn, "sentiment_long", tiny_classifier, epochs=10)
    daemon()
    assert wait_job(conn, short["job_id"], 180)["status"] == "succeeded"
    mine = dashboard(conn.info.dsn)
    theirs = dashboard(as_login(su_dsn, OTHER_USER))

    def running() -> bool:
        row = conn.execute("SELECT status FROM pgml.jobs WHERE id = %s", (long["job_id"],)).fetchone()
        return bool(row["status"] == "running")

    def loss_steps(model_id: int) -> int:
        return int(
            conn.execute(
                "SELECT count(DISTINCT (logs->>'step')::int) AS n FROM pgml.logs WHERE model_id = %s AND logs ? 'loss'",
                (model_id,),
            ).fetchone()["n"]
        )

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(mine.url)
        panel_a, panel_b = page.locator("#panel-a"), page.locator("#panel-b")
        # panel A shows the newest job (the one training, or about to)
        wait_for(lambda: panel_a.get_attribute("data-model") == str(long["model_id"]), 30, what="panel A on the job")

        # the finished job beside it: panel B draws every loss row it logged, its metrics and files below
        page.locator(f"#jobs tr[data-job='{short['job_id']}'] button", has_text="B").click()
        logged = loss_steps(short["model_id"])
        wait_for(lambda: panel_b.get_attribute("data-points") == str(logged), 30, what=f"{logged} points in B")
        page.locator("#panel-b table.files", has_text="model.safetensors").wait_for(timeout=30_000)
        page.locator("#panel-b table.metrics", has_text="eval_accuracy").wait_for(timeout=30_000)

        # A's curve grows while its job trains
        seen: list[int] = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(set(seen)) < 3:
            points = int(panel_a.get_attribute("data-points") or 0)
            if running() and points and points not in seen:
                seen.append(points)
            time.sleep(0.2)
        assert len(set(seen)) >= 3 and seen == sorted(seen), f"loss points seen while it trained: {seen}"
        assert page.locator(f"#jobs tr[data-job='{long['job_id']}'][data-status='running']").count() == 1
        if os.environ.get("PGML_DASHBOARD_SCREENSHOT"):  # halfway through, for the README
            wait_for(lambda: int(panel_a.get_attribute("data-points") or 0) >= 50 or not running(), 240)
            page.screenshot(path=os.environ["PGML_DASHBOARD_SCREENSHOT"], full_page=True)

        done = wait_job(conn, long["job_id"], 300)
        assert done["status"] == "succeeded", done["error"]
        page.locator(f"#jobs tr[data-job='{long['job_id']}'][data-status='succeeded']").wait_for(timeout=30_000)
        final = loss_steps(long["model_id"])
        wait_for(lambda: panel_a.get_attribute("data-points") == str(final), 30, what=f"all {final} points in A")
        page.locator("#panel-a table.files", has_text="model.safetensors").wait_for(timeout=30_000)

        # the other user's page: no job of the first user's, and an empty panel
        other = browser.new_page()
        other.goto(theirs.url)
        other.locator("#no-jobs").wait_for(state="visible", timeout=30_000)
        assert other.locator("#jobs tbody tr").count() == 0
        assert other.locator("#panel-a").get_attribute("data-points") == "0"
        browser.close()


def test_jobs_say_their_kind_and_why_they_failed(
    ops: psycopg.Connection[dict[str, Any]], su_dsn: str, daemon: Any, dashboard: Any
) -> None:
    """/api/jobs: each job's kind (only a tune's model gets the A/B buttons on the page), a failed job's error and
    the error of each failed attempt, as JSON text the page shows as text (app.js: el(), text nodes only)."""
    evil = "<img src=x onerror=alert(1)> the data was bad"
    failed = ops.execute(
        "SELECT job_id FROM pgml.tune('dash_kinds', task => 'noop', model_name => 'none', hyperparams => %s::jsonb)",
        (json.dumps({"steps": 1, "fail": evil}),),
    ).fetchone()["job_id"]
    daemon("--drain")
    assert wait_job(ops, failed, 120)["status"] == "failed"
    loading = ops.execute("SELECT pgml.load_dataset_async('some/dataset', \"limit\" => 5) AS id").fetchone()["id"]

    mine = dashboard(as_login(su_dsn, ADMIN))
    status, jobs = mine.get("/api/jobs")
    assert status == 200
    by_id = {j["id"]: j for j in jobs}
    assert by_id[loading]["kind"] == "load_dataset" and by_id[loading]["task"] == "load_dataset"
    assert by_id[loading]["errors"] == [] and by_id[loading]["error"] is None
    job = by_id[failed]
    assert job["kind"] == "tune" and job["status"] == "failed"
    assert evil in job["error"]
    assert [e["attempt"] for e in job["errors"]] == [1] and evil in job["errors"][0]["error"]
    # the page: kinds in the table, errors as text nodes, buttons only for a tune's model
    script = (Path(db.__file__).parent / "dashboard" / "static" / "app.js").read_text()
    assert "function whyFailed(j)" in script and "innerHTML" not in script
    assert 'j.kind !== "tune" ? null' in script


def key_metric_in_the_page(dash: Dashboard, metrics: dict[str, Any]) -> str:
    """What the page's jobs table shows as a job's key metric: keyMetric() of the app.js the dashboard serves (with
    the constants and helper it uses), run by node on `metrics`."""
    status_ok = urllib.request.urlopen(dash.base + "static/app.js", timeout=10)
    source = status_ok.read().decode()
    pieces = [
        re.search(r"^const KEY_METRICS = .*?;$", source, re.M),
        re.search(r"^function num\(x\) \{.*?^\}$", source, re.M | re.S),
        re.search(r"^function keyMetric\(metrics\) \{.*?^\}$", source, re.M | re.S),
    ]
    assert all(pieces), "app.js has no KEY_METRICS, num() or keyMetric()"
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed: the page's key metric cannot be computed without a browser")
    script = "\n".join(p.group(0) for p in pieces if p) + f"\nprocess.stdout.write(keyMetric({json.dumps(metrics)}));"
    return subprocess.run([node, "-e", script], capture_output=True, text=True, check=True, timeout=30).stdout


def test_a_text_embedding_jobs_retrieval_metrics_are_shown(
    conn: psycopg.Connection[dict[str, Any]], daemon: Any, dashboard: Any, tiny_classifier: Path
) -> None:
    """A text-embedding job (issue 21) in the dashboard: /api/jobs and /api/models carry its retrieval metrics (the
    tuned and the starting model's NDCG@10, the gain), and the page's key metric for it is its NDCG@10, not the
    eval_loss a classifier's table would fall back to."""
    from tests.e2e.test_retrieval_training import pairs

    conn.execute("CREATE TABLE qa (question text, answer text)")
    conn.cursor().executemany("INSERT INTO qa VALUES (%s, %s)", [(a, p) for a, p, _ in pairs(24)])
    job = conn.execute(
        "SELECT job_id, model_id FROM pgml.tune('dash_embed', task => 'text-embedding', relation_name => 'qa', "
        "model_name => %s, test_size => 0.25, hyperparams => %s::jsonb)",
        (
            str(tiny_classifier),
            json.dumps(
                {
                    "dataset_args": {"anchor_column": "question", "positive_column": "answer"},
                    "training_args": {"num_train_epochs": 1, "per_device_train_batch_size": 8, "learning_rate": 1e-3},
                }
            ),
        ),
    ).fetchone()
    daemon("--drain")
    done = wait_job(conn, job["job_id"], 300)
    assert done["status"] == "succeeded", done["error"]
    retrieval = {k: done["metrics"][k] for k in ("eval_ndcg@10", "start_ndcg@10", "ndcg@10_gain", "eval_mrr@10")}

    mine = dashboard(conn.info.dsn)
    status, jobs = mine.get("/api/jobs")
    assert status == 200 and [j["id"] for j in jobs] == [job["job_id"]]
    assert jobs[0]["task"] == "text-embedding" and jobs[0]["status"] == "succeeded"
    assert {k: jobs[0]["metrics"].get(k) for k in retrieval} == retrieval
    status, model = mine.get(f"/api/models/{job['model_id']}")
    assert status == 200 and {k: model["metrics"].get(k) for k in retrieval} == retrieval
    # the jobs table's key metric: NDCG@10 (eval_loss comes first in the metrics, and is what it showed before)
    shown = key_metric_in_the_page(mine, jobs[0]["metrics"])
    ndcg = retrieval["eval_ndcg@10"]
    assert shown.startswith("ndcg@10 ") and abs(float(shown.split()[1]) - ndcg) <= 1e-3 * max(1, abs(ndcg)), shown
