"""Pure logic: splits, metrics, settings, the SQL loader, exit descriptions."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pgml_tuned.config import Settings
from pgml_tuned.db import migrations, q, queries
from pgml_tuned.recipes.text_classification import macro_f1
from pgml_tuned.splits import split
from pgml_tuned.splits import test_count as rows_to_hold_out


def test_test_count_fraction_and_rows() -> None:
    assert rows_to_hold_out(100, 0.2) == 20
    assert rows_to_hold_out(100, 7) == 7
    assert rows_to_hold_out(3, 0.01) == 1  # never an empty test set
    with pytest.raises(ValueError, match="leaves no rows to train on"):
        rows_to_hold_out(5, 5)
    with pytest.raises(ValueError, match="out of range"):
        rows_to_hold_out(5, 1)


def test_last_is_relation_order() -> None:
    train, test = split(list("aabbaabbab"), 0.3, "last")
    assert train == list(range(7)) and test == [7, 8, 9]


def test_random_is_seeded_and_disjoint() -> None:
    labels = ["x"] * 50 + ["y"] * 50
    a = split(labels, 0.2, "random", seed=1)
    assert a == split(labels, 0.2, "random", seed=1)
    assert a != split(labels, 0.2, "random", seed=2)
    train, test = a
    assert len(test) == 20 and not set(train) & set(test) and sorted(train + test) == list(range(100))


def test_stratified_keeps_class_proportions_and_every_class() -> None:
    labels = ["a"] * 80 + ["b"] * 15 + ["c"] * 5
    train, test = split(labels, 0.2, "stratified", seed=0)
    counts = Counter(labels[i] for i in test)
    assert counts == {"a": 16, "b": 3, "c": 1}
    assert len(train) + len(test) == 100
    rare = ["a"] * 20 + ["b"] * 2
    _, t = split(rare, 0.1, "stratified")
    assert "b" in {rare[i] for i in t}  # a rare class still appears in the test set


def test_unknown_sampling() -> None:
    with pytest.raises(ValueError, match="unknown test_sampling"):
        split(["a", "b", "a"], 0.5, "first")


def test_macro_f1_matches_sklearn_definition() -> None:
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    # per class F1: 0 → 0.5, 1 → 0.8, 2 → 0.667
    assert macro_f1(y_true, y_pred) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert macro_f1(np.array([1, 1]), np.array([1, 1])) == 1.0


def test_settings_from_env_and_flags(tmp_path: Path) -> None:
    s = Settings.from_env(
        {"PGML_CONCURRENCY": "3", "PGML_LEASE_SECONDS": "40", "PGML_HOME": str(tmp_path)},
        lease_seconds=None,
        heartbeat_seconds="2",
    )
    assert s.concurrency == 3 and s.lease_seconds == 40 and s.heartbeat_seconds == 2 and s.home == tmp_path
    assert s.keyring == tmp_path / "keyring"
    assert Settings.from_env({"PGML_CONCURRENCY": "3"}, concurrency=1).concurrency == 1  # flags win


def test_credentials_directory_follows_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert Settings.from_env({"PGML_HOME": str(tmp_path)}).credentials == tmp_path / "credentials"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/pgml-tuned.service")  # LoadCredential=
    assert Settings.from_env({"PGML_HOME": str(tmp_path)}).credentials == Path("/run/credentials/pgml-tuned.service")
    given = Settings.from_env({"PGML_HOME": str(tmp_path), "PGML_CREDENTIALS_DIR": str(tmp_path / "c")})
    assert given.credentials == tmp_path / "c"


def test_settings_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="more than twice heartbeat_seconds"):
        Settings.from_env({}, lease_seconds=5, heartbeat_seconds=5)
    with pytest.raises(ValueError, match="PGML_CONCURRENCY='many' is not a valid int"):
        Settings.from_env({"PGML_CONCURRENCY": "many"})
    with pytest.raises(ValueError, match="names fewer GPUs"):
        Settings.from_env({}, concurrency=2, gpus="0")


def test_named_queries_and_migrations_load() -> None:
    assert "FOR UPDATE SKIP LOCKED" in q("claim_job")
    assert all(not body.endswith(";") for body in queries().values())
    versions = [v for v, _ in migrations()]
    assert versions == sorted(versions) and versions[0] == "0001_schema"
    for version, text in migrations():
        assert f"VALUES ('{version}')" in text, f"{version} must record itself when run with psql"
    with pytest.raises(KeyError, match="no query named"):
        q("nope")


def test_exit_descriptions() -> None:
    from pgml_tuned.worker.process import ChildProcess as Child

    child = Child.__new__(Child)
    child.error, child.stderr_tail = None, __import__("collections").deque(["Traceback", "MemoryError"])
    assert "killed by SIGKILL (the kernel's OOM killer" in child.describe_exit(-signal.SIGKILL)
    assert "exited with code 3" in child.describe_exit(3) and "MemoryError" in child.describe_exit(3)
    child.error = "unknown training_args key"
    assert child.describe_exit(1) == "unknown training_args key"


def test_child_output_lines_are_bounded() -> None:
    import anyio

    from pgml_tuned.worker import process

    async def collect(chunks: list[bytes]) -> list[str]:
        send, receive = anyio.create_memory_object_stream[bytes](len(chunks))
        for c in chunks:
            send.send_nowait(c)
        send.close()
        return [line async for line in process.lines(receive)]

    huge = b"x" * (process.MAX_LINE * 3)
    out = anyio.run(collect, [b"first\n", huge[:100_000], huge[100_000:], b"tail of the huge line\nnext\n\n  \nlast"])
    assert out == ["first", "x" * process.MAX_LINE + " [cut]", "next", "last"]
    assert anyio.run(collect, [b'{"event": "log"}\n']) == ['{"event": "log"}']


def test_every_named_query_ends_with_its_statement() -> None:
    """A comment after a block's last statement becomes part of it (and breaks a query wrapped in COPY (...))."""
    for name, text in {**queries(), **queries("dashboard.sql")}.items():
        last = text.rstrip().splitlines()[-1].lstrip()
        assert not last.startswith("--") and not text.rstrip().endswith(";"), f"query {name!r} ends with {last!r}"


def test_progress_comes_from_training_rows_only() -> None:
    from pgml_tuned.child.store import progress_of
    from pgml_tuned.recipes.hf import interrupted_summary

    assert progress_of([], {"steps_per_second": 2.0}) == {"steps_per_second": 2.0}  # a batch of lines about the job
    rows = [{"loss": 0.5, "step": 3, "max_steps": 9}, {"eval_loss": 0.4, "step": 3, "max_steps": 9}]
    assert progress_of(rows, {}) == {"loss": 0.5, "eval_loss": 0.4, "step": 3, "max_steps": 9}
    said = interrupted_summary(1, {"train_runtime": 12.34, "train_loss": 0.61234, "step": 26, "max_steps": 58})
    assert said == (
        "attempt 1 stopped at step 26 of 58 after 12.3 s of training (train_loss so far 0.6123); the next attempt "
        "resumes from its checkpoint"
    )
