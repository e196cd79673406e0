"""The CLI as a user meets it: one line that says what is wrong and how to fix it, never a traceback; a closed
pipe ends it quietly; exit codes follow the job; `status` reads as a table; every --help entry says something."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgml_tuned import embedded
from pgml_tuned.cli import build_parser
from tests.conftest import ADMIN, STATE, as_login, job_row, scratch_database, wait_for, wait_job
from tests.integration.test_migrate_cli import cli

NO_DSN = {"PGML_DSN": ""}


def one_clean_line(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("pgml-tuned: "), r.stderr
    return lines[0]


def noop(conn: psycopg.Connection[dict[str, Any]], hyperparams: str = '{"steps": 3}', priority: int = 0) -> int:
    return int(
        conn.execute(
            "SELECT job_id FROM pgml.tune('cli', task => 'noop', model_name => 'none', hyperparams => %s, "
            "priority => %s)",
            (hyperparams, priority),
        ).fetchone()["job_id"]
    )


def started(*args: str, stdout: Any = subprocess.PIPE) -> subprocess.Popen[str]:
    """The CLI running in the background (it follows a job the test's daemon then runs)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pgml_tuned.cli", *args], stdout=stdout, stderr=subprocess.PIPE, text=True
    )


def to_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI with stdout a pipe whose reader is gone: what `| head -1` does once head has its line."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "pgml_tuned.cli", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)


def test_a_closed_pipe_ends_status_and_logs_quietly(
    su_dsn: str, ops: psycopg.Connection[dict[str, Any]], daemon: Any
) -> None:
    dsn = as_login(su_dsn, ADMIN)
    job = noop(ops, '{"steps": 40}')
    daemon("--drain")
    wait_job(ops, job)
    for args in (("status",), ("logs", str(job)), ("logs", str(job), "--follow"), ("status", str(job))):
        r = to_closed_pipe(*args, "--dsn", dsn)
        assert r.returncode == 141, (args, r.stderr)
        assert r.stderr == "", (args, r.stderr)
    # and through a real `head -1`
    r = subprocess.run(
        f"{sys.executable} -m pgml_tuned.cli logs {job} --dsn '{dsn}' | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    first = json.loads(r.stdout)  # the job's first row: its claim, a line about the job
    assert first["kind"] == "info" and first["message"].startswith("claimed by worker ") and r.stderr == ""


def test_download_of_a_model_without_files_says_why(
    su_dsn: str, ops: psycopg.Connection[dict[str, Any]], daemon: Any, tmp_path: Path
) -> None:
    dsn = as_login(su_dsn, ADMIN)
    failed = noop(ops, '{"fail": "the data was bad\\nsecond line"}')
    queued = noop(ops, "{}", priority=-1)
    ops.execute("SELECT pgml.cancel(%s)", (queued,))
    daemon("--drain")
    failed_model = wait_job(ops, failed)["model_id"]
    cancelled_model = job_row(ops, queued)["model_id"]
    r = cli("download", str(failed_model), str(tmp_path / "out"), "--dsn", dsn)
    assert r.returncode == 1
    line = one_clean_line(r)
    assert f"model {failed_model} has no files: its job {failed} failed: the data was bad" in line
    r = cli("download", str(cancelled_model), str(tmp_path / "out"), "--dsn", dsn)
    assert r.returncode == 1 and f"its job {queued} was cancelled" in one_clean_line(r)
    r = cli("download", "987654", str(tmp_path / "out"), "--dsn", dsn)
    assert r.returncode == 1 and "no model 987654" in one_clean_line(r) and "not a job id" in r.stderr


def test_an_unreachable_or_wrong_dsn_is_one_line_without_the_password(su_dsn: str) -> None:
    for args in (("status",), ("logs", "1"), ("cancel", "1"), ("download", "1", "/tmp/x"), ("migrate",)):
        r = cli(*args, "--dsn", "postgresql://nobody:sekret@127.0.0.1:1/x")
        assert r.returncode == 2, (args, r.stderr)
        line = one_clean_line(r)
        assert line.startswith("pgml-tuned: cannot connect to nobody@127.0.0.1:1/x: Connection refused. Is the ")
        assert "connection to server at" not in line  # libpq's prefix: the server is named once, before
        assert line.endswith("Fix: check --dsn or PGML_DSN (without either, pgml-tuned uses its embedded PostgreSQL)")
        assert "sekret" not in line
    # a server that answers, a login it does not know
    wrong = psycopg.conninfo.make_conninfo(su_dsn, user="no_such_login_here", password="sekret")
    r = cli("status", "--dsn", wrong)
    assert r.returncode == 2
    line = one_clean_line(r)
    assert "cannot connect to no_such_login_here@" in line and 'role "no_such_login_here" does not exist. Fix: ' in line
    assert "sekret" not in line
    r = cli("status", "--dsn", "not a dsn password=sekret")
    assert r.returncode == 2 and "not a PostgreSQL connection string" in one_clean_line(r)
    assert "sekret" not in r.stderr


def test_a_database_without_the_schema_says_run_migrate(admin_dsn: str) -> None:
    with scratch_database(admin_dsn) as empty:
        for args in (("status",), ("logs", "1"), ("cancel", "1"), ("download", "1", "/tmp/x")):
            r = cli(*args, "--dsn", empty)
            assert r.returncode == 2, (args, r.stderr)
            assert "has no pgml schema yet" in one_clean_line(r) and "pgml-tuned migrate" in r.stderr


def test_no_dsn_and_no_embedded_server_says_how_to_start(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for args in (("status",), ("logs", "1"), ("cancel", "1"), ("download", "1", str(tmp_path / "x"))):
        r = cli(*args, "--home", str(home), env=NO_DSN)
        assert r.returncode == 2, (args, r.stderr)
        line = one_clean_line(r)
        assert "PGML_DSN" in line and "pgml-tuned demo" in line and "pgml-tuned migrate" in line
    assert not home.exists()  # nothing was started behind the user's back


def test_no_dsn_and_an_embedded_server_without_the_schema() -> None:
    home = STATE / f"embedded-no-schema-{uuid.uuid4().hex[:8]}"  # of its own: other workers, other runs
    try:
        embedded.ensure(home)  # a server someone started, never migrated
        r = cli("status", "--home", str(home), env=NO_DSN)
        assert r.returncode == 2
        line = one_clean_line(r)
        assert "embedded PostgreSQL" in line and "no pgml schema yet" in line and "pgml-tuned migrate" in line
        with psycopg.connect(embedded.ensure(home)) as conn:  # and it was not migrated behind the user's back
            assert conn.execute("SELECT to_regnamespace('pgml')").fetchone() == (None,)
    finally:
        embedded.stop(home)
        shutil.rmtree(home, ignore_errors=True)


def test_the_embedded_server_notice_is_said_once_per_terminal_session() -> None:
    """`no --dsn / PGML_DSN: using the embedded PostgreSQL` on the first command of a terminal session (the
    commands of this test share the test's session), then not again; a new session (setsid) is told again."""
    home = STATE / f"embedded-notice-{uuid.uuid4().hex[:8]}"
    notice = "no --dsn / PGML_DSN: using the embedded PostgreSQL"
    try:
        assert cli("migrate", "--home", str(home), env=NO_DSN).returncode == 0
        first, again = (cli("status", "--home", str(home), env=NO_DSN) for _ in range(2))
        assert first.returncode == 0 and again.returncode == 0, (first.stderr, again.stderr)
        assert notice in first.stderr and notice not in again.stderr, (first.stderr, again.stderr)
        other = subprocess.run(
            [sys.executable, "-m", "pgml_tuned.cli", "status", "--home", str(home)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **NO_DSN},
            start_new_session=True,
        )
        assert other.returncode == 0 and notice in other.stderr, other.stderr
    finally:
        embedded.stop(home)
        shutil.rmtree(home, ignore_errors=True)


def test_logs_exit_non_zero_for_a_failed_or_cancelled_job(
    su_dsn: str, ops: psycopg.Connection[dict[str, Any]], daemon: Any
) -> None:
    dsn = as_login(su_dsn, ADMIN)
    failed = noop(ops, '{"steps": 2, "fail": "the data was bad"}')
    ok = noop(ops, '{"steps": 2}')
    cancelled = noop(ops, "{}", priority=-1)
    ops.execute("SELECT pgml.cancel(%s)", (cancelled,))
    # --follow started before the job ends: it waits, prints the failure, exits 1
    follow = started("logs", str(failed), "--follow", "--dsn", dsn)
    assert follow.stderr is not None
    first = follow.stderr.readline()  # the job as queued, before a daemon runs it (a spare child runs it in ms)
    daemon("--drain")
    out, err = follow.communicate(timeout=120)
    err = first + err
    assert follow.returncode == 1 and "Traceback" not in err
    printed = [json.loads(line) for line in out.splitlines()]
    assert [r["step"] for r in printed if "kind" not in r] == [1, 2]
    # the lines about the job come with them, in order: claimed ... steps ... failed with the reason
    lines = [(r["kind"], r["message"]) for r in printed if "kind" in r]
    assert lines[0][0] == "info" and lines[0][1].startswith("claimed by worker ")
    assert lines[-1] == ("error", "failed: the data was bad") and "kind" in printed[-1]
    assert f"job {failed} failed: the data was bad" in err
    assert f"job {failed} queued" in err  # the live progress line (stderr: stdout is the log rows)
    wait_job(ops, ok)
    r = cli("logs", str(failed), "--dsn", dsn)
    assert r.returncode == 1 and f"job {failed} failed: the data was bad" in r.stderr
    assert [json.loads(line) for line in r.stdout.splitlines()] == printed
    r = cli("logs", str(cancelled), "--dsn", dsn)
    assert r.returncode == 1 and f"job {cancelled} cancelled" in r.stderr
    r = cli("logs", str(cancelled), "--follow", "--dsn", dsn)
    assert r.returncode == 1 and f"job {cancelled} cancelled" in r.stderr
    r = cli("logs", str(ok), "--follow", "--dsn", dsn)
    assert r.returncode == 0 and f"job {ok} succeeded" in r.stderr
    r = cli("logs", str(ok), "--dsn", dsn)
    assert r.returncode == 0 and r.stderr == ""
    printed = [json.loads(line) for line in r.stdout.splitlines()]
    assert [r["step"] for r in printed if "kind" not in r] == [1, 2]
    messages = [r["message"] for r in printed if "kind" in r]
    assert messages[0].startswith("claimed by worker ") and messages[-1].startswith("succeeded (attempt 1, worker ")
    assert messages[-2] == f"stored 1 files (0.0 MB) in pgml.files for model {job_row(ops, ok)['model_id']}"
    r = cli("logs", "987654", "--dsn", dsn)
    assert r.returncode == 1 and "no job 987654" in one_clean_line(r)


def test_sigint_is_logged_as_sigint(ops: psycopg.Connection[dict[str, Any]], daemon: Any) -> None:
    job = noop(ops, '{"seconds": 30, "steps": 30}')
    d = daemon()
    wait_for(
        lambda: ops.execute("SELECT 1 FROM pgml.logs WHERE job_id = %s AND kind = 'train'", (job,)).fetchone(),
        60,
        what="a step",
    )
    d.signal(signal.SIGINT)
    assert d.wait(60) == 0
    lines = [json.loads(line) for line in d.output().splitlines() if line.startswith("{")]
    shutdown = next(r for r in lines if r["event"] == "daemon.shutdown")
    assert shutdown["signal"] == "SIGINT" and shutdown["message"].startswith("stopped by SIGINT")
    assert next(r for r in lines if r["event"] == "daemon.stop")["message"] == "stopped by SIGINT"
    assert not any("stopped by SIGTERM" in str(r.get("message")) for r in lines if r["event"].startswith("daemon."))
    assert wait_job(ops, job, statuses=("queued",))["status"] == "queued"  # requeued as on SIGTERM
    # the child got the daemon's SIGINT and says so in the job's logs; nothing there speaks of a SIGTERM
    said = [r["m"] for r in ops.execute("SELECT logs->>'message' AS m FROM pgml.logs WHERE job_id = %s", (job,))]
    assert any(m and m.startswith("stopped by SIGINT at step ") for m in said), said
    assert not any("SIGTERM" in (m or "") for m in said), said
    child = [r for r in lines if r["event"] == "job.info" and "stopped by" in str(r.get("message"))]
    assert child and all(r["message"].startswith("stopped by SIGINT") for r in child), child


def test_status_is_an_aligned_table_and_typed_json(
    su_dsn: str, ops: psycopg.Connection[dict[str, Any]], daemon: Any
) -> None:
    dsn = as_login(su_dsn, ADMIN)
    ok = noop(ops, '{"steps": 3}')
    failed = noop(ops, '{"fail": "the data was bad\\nand this line is not shown"}')
    queued = noop(ops, "{}", priority=-5)
    ops.execute("SELECT pgml.cancel(%s)", (queued,))
    daemon("--drain")
    wait_job(ops, ok), wait_job(ops, failed)
    r = cli("status", "--dsn", dsn)
    assert r.returncode == 0 and "Traceback" not in r.stderr
    out = r.stdout.splitlines()
    assert out[0].startswith("jobs: queued 0, running 0, succeeded 1, failed 1, cancelled 1")
    header, *rows = out[2 : out.index("", 2)]  # the jobs table, up to the workers section
    for col in ("id", "status", "step", "loss", "model_id", "error"):
        assert col in header.split()
    starts = [header.index(c) for c in ("status", "model_id", "error")]
    by_id = {int(line.split()[0]): line for line in rows}
    for line in rows:  # aligned: every value starts under its column's name
        assert line[starts[0] - 1] == " " and line[starts[0] :].split()[0] in ("succeeded", "failed", "cancelled")
    model_id = job_row(ops, ok)["model_id"]
    assert by_id[ok][starts[1] :].split()[0] == str(model_id)
    assert " 0.3333 " in by_id[ok] and "0.3333333" not in by_id[ok]
    assert by_id[failed][starts[2] :] == "the data was bad"
    assert "None" not in r.stdout and " - " in by_id[queued]
    # then the workers section: the drain's row, stopped
    assert out[-3] == "workers: 1 stopped" and out[-2].split()[:2] == ["worker", "state"]
    assert out[-1].split()[1] == "stopped"
    data = json.loads(cli("status", "--json", "--dsn", dsn).stdout)
    jobs = {j["id"]: j for j in data["jobs"]}
    assert jobs[ok]["progress_pct"] == 100.0 and jobs[ok]["last_loss"] == pytest.approx(1 / 3)
    assert jobs[ok]["model_id"] == model_id and jobs[queued]["progress_pct"] is None
    assert {q["status"]: q["jobs"] for q in data["queue"]}["failed"] == 1
    one = json.loads(cli("status", str(ok), "--dsn", dsn).stdout)
    assert one["progress_pct"] == 100.0 and isinstance(one["metrics"], dict)


def test_every_help_entry_says_what_it_does() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helped = {c.dest: c.help for c in subparsers._choices_actions}
    for name, sub in subparsers.choices.items():
        assert helped.get(name), f"`pgml-tuned --help` says nothing of {name}"
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings or action.dest}"
        r = cli(name, "--help")
        assert r.returncode == 0 and r.stdout.startswith(f"usage: pgml-tuned {name}")


def test_wait_follows_jobs_and_ends_with_the_model_and_download_command(
    su_dsn: str, ops: psycopg.Connection[dict[str, Any]], daemon: Any
) -> None:
    ok, failed = noop(ops, '{"steps": 6, "seconds": 3}'), noop(ops, '{"steps": 2, "fail": "the data was bad\\nx"}')
    dsn = as_login(su_dsn, ADMIN)
    # stdout a pipe (not a terminal): plain lines, each job's when it changed, then the final lines
    waiting = started("wait", str(ok), str(failed), "--interval", "0", "--dsn", dsn)
    assert waiting.stdout is not None
    first = waiting.stdout.readline()  # the jobs as queued, before a daemon runs them
    daemon("--drain")
    out, err = waiting.communicate(timeout=120)
    out = first + out
    assert waiting.returncode == 1, out + err  # one of them failed
    assert err == "" and "\x1b" not in out
    lines = out.splitlines()
    assert any(line.startswith(f"job {ok} queued") for line in lines), out
    running = [line for line in lines if line.startswith(f"job {ok} running  step ")]
    assert running, out
    assert all("%" in line and "loss " in line for line in running if "step 0/" not in line), running
    model = wait_job(ops, ok)["model_id"]
    assert f"job {ok} succeeded; model {model}: pgml-tuned download {model} ./model-{model}" in lines
    assert f"job {failed} failed: the data was bad" in lines
    # a job that already ended: its final line at once, exit 0 when it succeeded
    r = cli("wait", str(ok), "--dsn", dsn)
    assert r.returncode == 0 and r.stdout.splitlines() == [
        f"job {ok} succeeded; model {model}: pgml-tuned download {model} ./model-{model}"
    ]
    r = cli("wait", "987654", "--dsn", dsn)
    assert r.returncode == 1 and "no job 987654" in one_clean_line(r)


def test_wait_on_a_terminal_rewrites_one_line_per_job(
    su_dsn: str, ops: psycopg.Connection[dict[str, Any]], daemon: Any
) -> None:
    import pty

    dsn = as_login(su_dsn, ADMIN)
    job = noop(ops, '{"steps": 4, "seconds": 2}')
    leader, follower = pty.openpty()
    waiting = started("wait", str(job), "--dsn", dsn, stdout=follower)
    os.close(follower)
    daemon("--drain")
    assert waiting.wait(120) == 0
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    screen = b"".join(chunks).decode()
    assert "\x1b[2K" in screen and f"job {job} running" in screen  # drawn in place
    assert "\x1b[1F" in screen  # the next draw went back up to the job's line
    model = wait_job(ops, job)["model_id"]
    assert screen.rstrip().endswith(f"job {job} succeeded; model {model}: pgml-tuned download {model} ./model-{model}")


def test_an_old_schema_says_run_migrate(su_dsn: str, ops: psycopg.Connection[dict[str, Any]]) -> None:
    dsn = as_login(su_dsn, ADMIN)
    with psycopg.connect(su_dsn, autocommit=True) as su:
        su.execute("ALTER VIEW pgml.queue_summary RENAME TO queue_summary_gone")  # as a schema before it had one
        r = cli("status", "--dsn", dsn)
        su.execute("ALTER VIEW pgml.queue_summary_gone RENAME TO queue_summary")
    assert r.returncode == 2
    line = one_clean_line(r)
    assert "queue_summary" in line and "older than pgml-tuned" in line and "`pgml-tuned migrate`" in line
