"""Operator-facing defences (issue 20, class 8): what a user puts in the database never reaches the operator's
terminal as control sequences; `serve` refuses a login that would bypass row-level security; the serving process
has a login of its own that reads only what serving needs; the systemd units are hardened; the dashboard's token
is not handed to other local web services."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.conftest import ADMIN, USER, WORKER, as_login, connect, wait_for, wait_job
from tests.integration.test_migrate_cli import cli

# ESC[2J clears the screen, OSC 0 sets the window title, a bidi override (U+202E) and isolate (U+2066) make a
# name read differently than it is, 0x9b is a one-byte CSI, DEL
HOSTILE = "p\x1b[2J\x1b]0;owned\x07\u202eevil\u2066x\x9b31m\x7f"
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def raw_controls(text: str) -> list[str]:
    return sorted({hex(ord(c)) for c in RAW.findall(text)})


def test_cli_output_shows_control_characters_escaped(
    su_dsn: str, ops: psycopg.Connection[dict[str, Any]], daemon: Any
) -> None:
    """A project named with escape sequences and a job that failed with them in its error: `status` (table and
    JSON), `logs` and `wait` print them escaped, never raw."""
    job = int(
        ops.execute(
            "SELECT job_id FROM pgml.tune(%s, task => 'noop', model_name => 'none', hyperparams => %s)",
            (HOSTILE, json.dumps({"fail": "bad \x1b[31mdata\x1b]52;c;cGF5bG9hZA==\x07 \u202egnp.exe"})),
        ).fetchone()["job_id"]
    )
    daemon("--drain")
    assert wait_job(ops, job)["status"] == "failed"
    dsn = as_login(su_dsn, ADMIN)
    outputs: dict[str, subprocess.CompletedProcess[str]] = {
        "status": cli("status", "--dsn", dsn),
        "status --json": cli("status", "--json", "--dsn", dsn),
        "status <job>": cli("status", str(job), "--dsn", dsn),
        "logs": cli("logs", str(job), "--dsn", dsn),
        "wait": cli("wait", str(job), "--dsn", dsn),
    }
    for name, r in outputs.items():
        assert "Traceback" not in r.stderr, (name, r.stderr)
        assert raw_controls(r.stdout) == [] and raw_controls(r.stderr) == [], (name, r.stdout, r.stderr)
    table = outputs["status"].stdout
    assert "\\x1b[2J" in table and "\\u202eevil" in table, table  # shown, escaped
    assert "bad \\x1b[31mdata" in outputs["wait"].stdout, outputs["wait"].stdout
    # JSON stays JSON, and says the same as the database
    data = json.loads(outputs["status --json"].stdout)
    assert HOSTILE in [j["project"] for j in data["jobs"]]
    assert json.loads(outputs["status <job>"].stdout)["project"] == HOSTILE


# ---- `serve` refuses a login that bypasses row-level security ----
@pytest.fixture
def new_login(su: psycopg.Connection[dict[str, Any]], su_dsn: str) -> Iterator[Any]:
    """new_login(role): a new login in `role` only, its DSN; dropped at the end (roles are the cluster's)."""
    made: list[str] = []

    def make(role: str) -> str:
        name = f"pgml_test_op_{uuid.uuid4().hex[:8]}"
        su.execute(f'CREATE ROLE "{name}" LOGIN')
        su.execute(f'GRANT "{role}" TO "{name}"')
        made.append(name)
        return as_login(su_dsn, name)

    yield make
    for name in made:
        su.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
        su.execute(f'DROP OWNED BY "{name}"')
        su.execute(f'DROP ROLE "{name}"')


def test_serve_refuses_a_superuser_or_table_owner_login(su_dsn: str, new_login: Any) -> None:
    """A superuser, or a member of the role owning pgml's tables, is not subject to row-level security: `serve`
    refuses it at once (exit 2), naming the fix; --allow-superuser is the explicit way round."""
    for dsn in (su_dsn, new_login("pgml_owner")):
        r = cli("serve", "--dsn", dsn, "--drain", "--serving", "false", "--poll-seconds", "0.2")
        assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
        assert "row-level security" in r.stderr and "GRANT pgml_worker TO" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
    r = cli("serve", "--dsn", su_dsn, "--drain", "--serving", "false", "--allow-superuser")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "daemon.login_bypasses_rls" in r.stderr


def test_serve_accepts_a_worker_login(worker_dsn: str) -> None:
    r = cli("serve", "--dsn", worker_dsn, "--drain", "--serving", "false", "--poll-seconds", "0.2")
    assert r.returncode == 0 and "row-level security" not in r.stderr, r.stderr[-2000:]


# ---- the serving process's own role ----
def test_the_serving_role_reads_no_table_and_calls_only_the_lane(
    new_login: Any, ops: psycopg.Connection[dict[str, Any]]
) -> None:
    """pgml_serving reads none of the jobs, logs, models, files or requests of anyone, nor submits; it may claim,
    answer and release requests and read a model that a request's submitter may read."""
    ops.execute("SELECT pgml.tune('mine', task => 'noop', model_name => 'none')")  # a job it may not see
    with connect(new_login("pgml_serving")) as lane:
        for table in (
            "jobs",
            "logs",
            "models",
            "files",
            "file_parts",
            "requests",
            "projects",
            "job_status",
            "deployments",
            "credentials",
            "worker_status",
            "workers",
            "checkpoints",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                lane.execute(f"SELECT count(*) FROM pgml.{table}")
        for call in (
            "pgml.tune('x', task => 'noop', model_name => 'none')",
            "pgml.job_credential(1, 1)",
            "pgml._worker_stop('w', 't')",
            "pgml.deployed_model(1)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                lane.execute(f"SELECT {call}")
        assert lane.execute("SELECT count(*) AS n FROM pgml._requests_claim('s', 4, 5)").fetchone()["n"] == 0
        assert lane.execute("SELECT count(*) AS n FROM pgml._requests_release(NULL)").fetchone()["n"] == 0
        # the model a request names, as its submitter may read it (no permission error; nothing deployed yet)
        assert lane.execute("SELECT count(*) AS n FROM pgml._serving_model(%s, 'mine')", (ADMIN,)).fetchone()["n"] == 0


def test_without_a_login_of_its_own_the_serving_process_acts_as_pgml_serving(worker_dsn: str) -> None:
    """The fallback (no PGML_SERVING_DSN): the worker's login, every connection in role pgml_serving."""
    import anyio

    from pgml_tuned import db

    async def check() -> tuple[str, str]:
        async with await db.connect(worker_dsn) as c:
            row = await (await c.execute("SELECT current_user AS r, session_user AS s")).fetchone()
            assert row is not None
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await c.execute("SELECT count(*) FROM pgml.jobs")
            return row["r"], row["s"]

    try:
        db.act_as("pgml_serving")
        role, login = anyio.run(check)
        with db.sync_connect(worker_dsn) as c:
            assert c.execute("SELECT current_user AS r").fetchone()["r"] == "pgml_serving"  # the model loader's
    finally:
        db._role.clear()
    assert (role, login) == ("pgml_serving", WORKER)


def test_the_serving_process_connects_as_its_own_login_and_serves(
    new_login: Any,
    su: psycopg.Connection[dict[str, Any]],
    ops: psycopg.Connection[dict[str, Any]],
    daemon: Any,
    session_env: Path,
    tmp_path: Path,
) -> None:
    """With PGML_SERVING_DSN the serving process's every connection is that login's, and transform still works:
    a hub model and a stored one (its files read through pgml._serving_model_files)."""
    from pgml_tuned import hub_cache
    from tests.support import models as testing
    from tests.support.stored import add_model

    model = testing.build_tiny_classifier_base(tmp_path / "clf", hidden=32, layers=1)
    hub_cache.add(model, "tiny/operator-clf", session_env / "hf")
    stored = add_model(su, USER, "opclf", "text-classification", path=model)
    lane = new_login("pgml_serving")
    d = daemon(env={"PGML_SERVING_DSN": lane})
    for name in ("tiny/operator-clf", f"pgml:model:{stored}"):
        rid = ops.execute(
            "SELECT pgml._request_submit(%s, 'classify', %s, '{}'::jsonb, %s) AS id",
            (USER, name, json.dumps(["good", "bad"])),
        ).fetchone()["id"]
        got = wait_for(
            lambda rid=rid: (
                (r := ops.execute("SELECT * FROM pgml._request_answer(%s)", (rid,)).fetchone())
                and r["status"] in ("done", "failed")
                and r
            ),
            120,
            what=f"request {rid}",
        )
        assert got["status"] == "done", (got["error"], d.output()[-3000:])
        assert len(got["result"]) == 2
    logins = su.execute(
        "SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE '%/serving-%'"
    ).fetchall()
    assert [r["usename"] for r in logins] == [conninfo_to_dict(lane)["user"]], logins


# ---- the systemd units ----
UNITS = sorted((Path(__file__).resolve().parents[2] / "systemd").glob("*.service"))


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_units_are_hardened(unit: Path, tmp_path: Path) -> None:
    """`systemd-analyze security` rates each unit 3.0 or lower ("OK"), with the GPUs still reachable."""
    import shutil

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    text = unit.read_text()
    # a template is analysed as one instance of it
    path = tmp_path / (unit.name.replace("@.", "@0.") if "@." in unit.name else unit.name)
    path.write_text(text)
    r = subprocess.run([analyze, "security", "--offline=true", str(path)], capture_output=True, text=True)
    if "--offline" in r.stderr and "unrecognized" in r.stderr:
        pytest.skip(f"this systemd-analyze has no --offline: {r.stderr.strip()}")
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert found, r.stdout[-2000:] + r.stderr[-2000:]
    assert float(found.group(1)) <= 3.0, r.stdout
    settings = [line.strip() for line in text.splitlines() if not line.startswith("#")]
    assert "CapabilityBoundingSet=CAP_SETUID CAP_SETGID CAP_CHOWN CAP_FOWNER CAP_DAC_OVERRIDE CAP_KILL" in settings
    assert "SystemCallFilter=@system-service" in settings and "NoNewPrivileges=yes" in settings
    assert "DeviceAllow=char-nvidia-frontend rw" in settings and "DeviceAllow=char-nvidia-uvm rw" in settings
    assert not any(s.startswith(("PrivateDevices=yes", "MemoryDenyWriteExecute=yes")) for s in settings)


# ---- the dashboard's token ----
def _http(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request; (status, headers, the first bytes of the body: an event stream never ends)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read(64 if "stream" in url else -1)
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def test_dashboard_token_is_not_a_cookie_other_local_services_receive(conn_dsn: str, tmp_path: Path) -> None:
    """Cookies are not port-isolated (RFC 6265): a token kept in one would be sent to every web service of the host.
    The printed URL carries the token in its fragment (never sent to a server), the page sends it as a header, the
    event stream takes a single-use ticket; no response sets a cookie, and a cookie holding the token opens nothing."""
    import sys

    home = str(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgml_tuned.cli", "dashboard", "--dsn", conn_dsn, "--home", home, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.search(r"(http://127\.0\.0\.1:(\d+)/)([?#])token=(\S+)", line)
        assert found, line
        base, port, sep, token = found.groups()
        # what a browser sends for the printed URL (a fragment stays in the browser), then the page's requests
        opened = base + (f"?token={token}" if sep == "?" else "")
        bearer = {"Authorization": f"Bearer {token}"}
        responses = [_http(opened), _http(base + "static/app.js"), _http(base + "api/whoami", bearer)]
        assert [r[0] for r in responses] == [200, 200, 200]
        assert [r[1].get("set-cookie") for r in responses] == [None, None, None]
        assert sep == "#", f"the token travels to the server in the URL it printed: {line}"
        # another local service that got hold of a cookie or a query string: nothing opens with them
        for name in (f"pgml_dashboard_{port}", f"pgml_tuned_token_{port}", "pgml_tuned_token"):
            assert _http(base + "api/jobs", {"Cookie": f"{name}={token}"})[0] == 403
        assert _http(base + f"api/jobs?token={token}")[0] == 403
        assert _http(base + "api/jobs", bearer)[0] == 200
        assert _http(base + "api/jobs", {"Authorization": "Bearer wrong"})[0] == 403
        # the stream's ticket: only with the token, and once
        assert _http(base + "api/ticket", method="POST")[0] == 403
        status, _, body = _http(base + "api/ticket", bearer, method="POST")
        ticket = json.loads(body)["ticket"]
        assert status == 200 and ticket != token
        status, headers, _ = _http(base + f"api/stream?models=&ticket={ticket}")
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        assert _http(base + f"api/stream?models=&ticket={ticket}")[0] == 403
    finally:
        proc.terminate()
        proc.communicate(timeout=15)
