"""Operator-facing defences (issue 20, class 8): what a user puts in the database never reaches the operator's
terminal as control sequences; `serve` refuses a login that would bypass row-level security; the serving process
has a login of its own that reads only what serving needs; the systemd units are hardened; the dashboard's token
is not handed to other local web services."""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import psycopg

from tests.conftest import ADMIN, as_login, wait_job
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
