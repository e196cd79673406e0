"""Model files in PostgreSQL: directories streamed in and out of bytea parts with COPY.

A file is stored as rows (path, part, data) of at most PART_BYTES each, so no single value ever holds a
whole model and neither side ever holds more than one part in memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from psycopg import sql

from .db import q

PART_BYTES = 8 * 1024 * 1024


def walk(root: Path) -> Iterator[tuple[str, Path]]:
    """Every regular file under root (recursively) as (relative posix path, path), sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file():
                yield p.relative_to(root).as_posix(), p


def copy_dir_in(
    conn: Any, copy_query: str, key: int, root: Path, paths: Iterable[tuple[str, Path]] | None = None
) -> tuple[int, int]:
    """COPY every file under root (or only `paths`: (relative posix path, path) pairs) into the table of
    `copy_query` (columns: key, path, part, data).

    Runs inside the caller's transaction. Returns (files, bytes).
    """
    n_files = n_bytes = 0
    with conn.cursor() as cur, cur.copy(copy_query) as copy:
        copy.set_types(["int8", "text", "int4", "bytea"])
        for rel, path in walk(root) if paths is None else paths:
            n_files += 1
            with open(path, "rb") as fh:
                part = 0
                while True:
                    chunk = fh.read(PART_BYTES)
                    if not chunk and part > 0:
                        break
                    copy.write_row((key, rel, part, chunk))
                    n_bytes += len(chunk)
                    part += 1
                    if len(chunk) < PART_BYTES:
                        break
    return n_files, n_bytes


def copy_dir_out(conn: Any, select_query: str, params: dict[str, Any], dest: Path) -> tuple[int, int]:
    """Reassemble the files selected by `select_query` (path, part, data ordered by path, part) under dest."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    n_files = n_bytes = 0
    current: str | None = None
    out: BinaryIO | None = None
    # COPY … (FORMAT BINARY) streams the parts as raw bytes (a text cursor sends bytea as hex: 4x slower)
    copy_out = sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(sql.SQL(select_query))
    with contextlib.ExitStack() as open_file, conn.cursor() as cur, cur.copy(copy_out, params) as copy:
        copy.set_types(["text", "int4", "bytea"])
        for path, _part, data in copy.rows():
            if path != current or out is None:
                open_file.close()
                target = (root / path).resolve()
                if root not in target.parents:
                    raise ValueError(f"refusing to write {path!r} outside {dest}")
                target.parent.mkdir(parents=True, exist_ok=True)
                out = open_file.enter_context(open(target, "wb"))
                current = path
                n_files += 1
            out.write(data)
            n_bytes += len(data)
    return n_files, n_bytes


def download_model(
    conn: Any, model_id: int, dest: Path, query: str = "model_files", params: dict[str, Any] | None = None
) -> Path:
    """Write every stored file of model `model_id` under dest; the directory loads with from_pretrained.

    `query` names the statement that selects them: pgml.files (what the session may read), or the child's
    ticketed pgml._child_model_files (`params` then carries the job id and ticket)."""
    n_files, _ = copy_dir_out(conn, q(query), {**(params or {}), "model_id": model_id}, dest)
    if n_files == 0:
        raise FileNotFoundError(f"model {model_id} has no files in pgml.files (did its job succeed?)")
    return dest
