"""sql/ lives at the top of the repository and ships inside the wheel as pgml_tuned/sql (pyproject's package-dir
mapping, no symlink): a wheel built from this checkout carries every file install.sql names, and the package
installed from it finds them there and migrates a new database with them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from pgml_tuned import db
from tests.conftest import REPO, scratch_database


def test_the_wheel_carries_sql_and_migrates_from_it(admin_dsn: str, tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("pgml_tuned-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in [db.SQL_DIR / "install.sql", db.SQL_DIR / "pending.psql", *db.install_files()]:
        assert f"pgml_tuned/sql/{f.relative_to(db.SQL_DIR).as_posix()}" in names, f
    assert not any(n.startswith("sql/") for n in names)  # inside the package, not a top-level directory
    # every package of daemon/ is in the wheel (pyproject lists them by name)
    for init in (REPO / "daemon").rglob("__init__.py"):
        assert init.relative_to(REPO / "daemon").as_posix() in names, init

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    with scratch_database(admin_dsn) as dsn:
        code = (
            "import anyio, sys; from pgml_tuned import db; "
            "assert str(db.SQL_DIR).startswith(sys.argv[1]), db.SQL_DIR; "
            "print(len(anyio.run(db.migrate, sys.argv[2])))"
        )
        run = subprocess.run(
            [sys.executable, "-c", code, str(site), dsn],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(site)},
        )
        assert run.returncode == 0, run.stderr
        assert int(run.stdout.strip()) == len(db.migrations())
