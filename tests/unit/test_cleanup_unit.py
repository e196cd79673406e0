"""The pieces of job cleanup that need no database: attempt scratch directories and their start-up sweep (real
directories, real flocks, a real second process), and the checkpoint uploader's back-pressure (a real thread)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pgml_tuned.child.uploader import CheckpointUploader
from pgml_tuned.errors import LeaseLost
from pgml_tuned.worker import scratch
from tests.conftest import wait_for


def test_an_attempt_dir_is_named_locked_and_removed(tmp_path: Path) -> None:
    d = scratch.AttemptDir.create(tmp_path, 12, 3)
    assert d.path.parent == tmp_path and d.path.name.startswith("job12-a3-") and d.path.is_dir()
    (d.path / "model").mkdir()
    (d.path / "model" / "weights.bin").write_bytes(b"x" * 1000)
    assert scratch.sweep(tmp_path) == []  # held by this process: never swept
    assert d.path.exists()
    d.remove()
    d.remove()  # idempotent
    assert list(tmp_path.iterdir()) == []


def test_the_sweep_removes_only_unheld_attempt_dirs(tmp_path: Path) -> None:
    stale = tmp_path / "job7-a1-abc123"
    (stale / "trainer" / "checkpoint-20").mkdir(parents=True)
    (stale / "trainer" / "checkpoint-20" / "optimizer.pt").write_bytes(b"o" * 5000)
    old_style = tmp_path / "child-x9y8"  # an older version's attempt directory
    old_style.mkdir()
    creating = tmp_path / ".job8-a1-zzz"  # being created right now (made, not yet locked and renamed)
    creating.mkdir()
    other = tmp_path / "serving"  # not an attempt's: never touched
    other.mkdir()
    (tmp_path / "job9-a1-file").write_text("a file, not a directory")
    target = tmp_path.parent / f"{tmp_path.name}-outside"
    target.mkdir()
    (target / "keep.txt").write_text("outside the work directory")
    (tmp_path / "job10-a1-link").symlink_to(target, target_is_directory=True)

    # a directory a living process holds (another daemon's running attempt, or its child)
    held = tmp_path / "job11-a2-live"
    held.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_SH); "
            "print('locked', flush=True); time.sleep(60)",
            str(held),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        removed = dict(scratch.sweep(tmp_path))
        assert set(removed) == {"job7-a1-abc123", "child-x9y8"}
        assert removed["job7-a1-abc123"] == 5000
        assert held.exists() and creating.exists() and other.exists()
        assert (tmp_path / "job9-a1-file").exists() and (target / "keep.txt").exists()
    finally:
        holder.kill()
        holder.wait()
    # its holder is gone (killed): now it is a leftover
    assert [name for name, _ in scratch.sweep(tmp_path)] == ["job11-a2-live"]
    # one still being created is left alone for a while, then swept
    old = time.time() - scratch.CREATING_GRACE_SECONDS - 5
    os.utime(creating, (old, old))
    assert [name for name, _ in scratch.sweep(tmp_path)] == [".job8-a1-zzz"]


def test_the_sweep_waits_for_an_exclusive_lock_it_cannot_get(tmp_path: Path) -> None:
    d = tmp_path / "job1-a1-q"
    d.mkdir()
    fd = os.open(d, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # this very process, through another open file: still held
        assert scratch.sweep(tmp_path) == []
    finally:
        os.close(fd)
    assert scratch.sweep(tmp_path) == [("job1-a1-q", 0)]


def checkpoint(root: Path, step: int, size: int = 100) -> Path:
    d = root / "trainer" / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"w" * size)
    return d


def test_uploads_run_behind_training_one_at_a_time(tmp_path: Path) -> None:
    release = threading.Event()
    started: list[int] = []
    seen: dict[int, list[str]] = {}

    def upload(step: int, src: Path, keep: int) -> None:
        started.append(step)
        seen[step] = sorted(p.name for p in src.iterdir())
        assert release.wait(10)

    up = CheckpointUploader(upload, tmp_path / "uploads")
    src = checkpoint(tmp_path, 10)
    t0 = time.monotonic()
    up.submit(10, src, keep=2)
    assert time.monotonic() - t0 < 1.0  # returned while the upload is still running
    assert not src.exists()  # moved out of the Trainer's way
    wait_for(lambda: started == [10], 10, interval=0.01, what="the upload to start")

    # the next save waits for the one in flight (at most one pending)
    second_done = threading.Event()

    def save_again() -> None:
        up.submit(20, checkpoint(tmp_path, 20), keep=2)
        second_done.set()

    saver = threading.Thread(target=save_again)
    saver.start()
    time.sleep(0.3)
    assert not second_done.is_set() and started == [10]
    release.set()
    saver.join(10)
    assert second_done.is_set()
    up.wait()
    assert started == [10, 20] and seen[10] == ["model.safetensors"]
    assert not (tmp_path / "uploads" / "checkpoint-10").exists()  # staged copies are removed once stored


def test_an_upload_error_reaches_the_training_thread(tmp_path: Path) -> None:
    def upload(step: int, src: Path, keep: int) -> None:
        raise LeaseLost("job 1: this attempt no longer owns the job")

    up = CheckpointUploader(upload, tmp_path / "uploads")
    up.submit(5, checkpoint(tmp_path, 5), keep=2)
    with pytest.raises(LeaseLost):
        up.wait()
    up.wait()  # raised once


def test_a_checkpoint_the_trainer_still_needs_is_linked_not_moved(tmp_path: Path) -> None:
    inodes: list[int] = []
    up = CheckpointUploader(lambda step, src, keep: inodes.append((src / "model.safetensors").stat().st_ino), tmp_path)
    src = checkpoint(tmp_path, 3)
    up.submit(3, src, keep=1, move=False)
    up.wait()
    assert (src / "model.safetensors").stat().st_ino == inodes[0]  # the same file, no copy of its bytes
