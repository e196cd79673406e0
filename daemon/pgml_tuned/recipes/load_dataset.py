"""Recipe `load_dataset` (pgml.load_dataset / pgml.load_dataset_async), top to bottom.

hyperparams (written by pgml.load_dataset_async, which checked them; checked here again, where they act):
    source  a Hugging Face dataset name ('imdb', 'FinGPT/fingpt-sentiment-train'); a file in the workers' datasets
            directory ('reviews.csv', 'sub/data.parquet'); or a builder ('csv', 'json', 'parquet', 'text') whose
            kwargs.data_files lie in that directory
    subset  the configuration (datasets.load_dataset's `name`)
    limit   rows in all
    kwargs  passed to datasets.load_dataset; only the keys of KWARGS (as pgml._dataset_kwargs() in SQL)
    token   (sealed, as pgml.tune's) for gated datasets

1. what to load: the hub name, or local files resolved inside PGML_DATASETS_DIR (the operator's --datasets-dir)
2. datasets.load_dataset: prepared in the worker's datasets cache and memory-mapped, never all in memory
3. columns: PostgresML's table shape — every split in one table, each feature's type as a PostgreSQL type
4. a staging table for this attempt (pgml._dataset_begin: the worker may only INSERT into it)
5. stream every split in order, up to `limit` rows: arrow batches → CSV (pyarrow, in C++) → one COPY
6. swap it in as pgml."<source>" and succeed, in one fenced transaction (pgml._dataset_commit)
"""

from __future__ import annotations

import glob
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import datasets
import datasets.packaged_modules
import pyarrow as pa
import pyarrow.csv as pa_csv

from ..child.context import JobContext
from ..errors import JobError

# The kwargs a load may pass on (as pgml._dataset_kwargs() in SQL; tests/integration/test_registry.py checks it).
KWARGS = (
    "split",
    "revision",
    "data_files",
    "data_dir",
    "token",
    "sep",
    "delimiter",
    "quotechar",
    "header",
    "column_names",
    "skiprows",
    "encoding",
    "field",
    "columns",
)
LOCAL_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
PATH_BUILDERS = ("csv", "json", "parquet", "text")  # builders whose data_files are files on the worker
BATCH_ROWS = 10_000
PROGRESS_SECONDS = 1.0


def run(ctx: JobContext) -> None:
    started = time.monotonic()
    hp = ctx.hyperparams
    source, subset, limit = str(hp["source"]), hp.get("subset"), hp.get("limit")
    kwargs = dict(hp.get("kwargs") or {})

    # 1. what to load
    path, kwargs = resolve(source, kwargs, datasets_dir())
    token = ctx.secret("token", "hub_token", "use_auth_token")
    if token:
        kwargs["token"] = token

    # 2. load (the cwd is the job's empty scratch directory: a bare name never finds a directory of the worker's)
    datasets.disable_progress_bars()
    os.chdir(ctx.workdir)
    ctx.info(f"loading {source!r}" + (f" ({subset})" if subset else ""), source=source, subset=subset)
    try:
        loaded = datasets.load_dataset(path, subset, **kwargs)
    except Exception as e:
        offline = " (this worker is offline: HF_HUB_OFFLINE=1 loads only datasets in its cache)" if is_offline() else ""
        raise JobError(f"could not load dataset {source!r}: {type(e).__name__}: {e}{offline}") from e
    splits = list(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [(str(loaded.split), loaded)]
    if not splits:
        raise JobError(f"dataset {source!r} has no splits")

    # 3. columns: one table for every split (PostgresML's shape), typed from the features
    first_name, first = splits[0]
    for name, split in splits[1:]:
        if split.features.arrow_schema.types != first.features.arrow_schema.types or (
            split.column_names != first.column_names
        ):
            raise JobError(
                f"splits {first_name!r} and {name!r} of {source!r} have different columns "
                f"({dict(first.features)} vs {dict(split.features)}): load one split (kwargs.split)"
            )
    columns = [(name, pg_type(name, feature, first.features.arrow_schema.field(name).type))
               for name, feature in first.features.items()]  # fmt: skip
    counts = {name: split.num_rows for name, split in splits}
    total = min(sum(counts.values()), limit) if limit else sum(counts.values())
    ctx.info(
        f"{total} rows from {len(splits)} splits {counts} into pgml.{json.dumps(source)}",
        rows=total,
        splits=counts,
        columns=dict(columns),
    )

    # 4. the staging table
    staging = ctx.staging_table(columns)
    ctx.start_over("every attempt loads into a staging table of its own")

    # 5. stream: every split, in order, up to `limit` rows
    options = pa_csv.WriteOptions(include_header=False, quoting_style="needed", batch_size=BATCH_ROWS)

    def chunks() -> Iterator[tuple[bytes, int]]:
        done, last_log = 0, time.monotonic()
        for name, split in splits:
            for batch in split.with_format("arrow").iter(batch_size=BATCH_ROWS):
                if ctx.stop_requested:
                    raise ctx.interrupted(f"after {done} of {total} rows")
                batch = batch.slice(0, total - done)
                buffer = io.BytesIO()
                pa_csv.write_csv(csv_ready(batch), buffer, options)
                yield buffer.getvalue(), batch.num_rows
                done += batch.num_rows
                if time.monotonic() - last_log >= PROGRESS_SECONDS or done == total:
                    ctx.log({"step": done, "max_steps": total, "rows": done, "split": name})
                    last_log = time.monotonic()
                if done >= total:
                    return

    rows = ctx.copy_rows(staging, [n for n, _ in columns], chunks)

    # 6. swap in and succeed
    seconds = time.monotonic() - started
    # (the store says "loaded N rows into pgml.x in s" in pgml.logs, in the transaction that commits them)
    ctx.save_dataset(
        rows, {"splits": counts, "seconds": round(seconds, 3), "rows_per_second": round(rows / max(seconds, 1e-9))}
    )


# ---- 1. what to load ----


def datasets_dir() -> Path | None:
    """The directory whose files a load may read (the operator's --datasets-dir), if this worker has one."""
    value = os.environ.get("PGML_DATASETS_DIR")
    return Path(value).resolve() if value else None


def resolve(source: str, kwargs: dict[str, Any], root: Path | None) -> tuple[str, dict[str, Any]]:
    """(the path argument of datasets.load_dataset, its kwargs), every local file resolved inside `root`."""
    unknown = sorted(set(kwargs) - set(KWARGS))
    if unknown:
        raise JobError(f"kwargs {unknown} are not allowed; load_dataset passes on only {', '.join(KWARGS)}")
    if kwargs.pop("token", None):
        raise JobError("kwargs.token must be sealed at submit time: queue the load with pgml.load_dataset()")
    suffix = PurePosixPath(source).suffix.lower()
    if suffix in LOCAL_BUILDERS or source.startswith(("/", "./")):
        if suffix not in LOCAL_BUILDERS:
            raise JobError(f"source {source!r}: a local file must end in {', '.join(LOCAL_BUILDERS)}")
        if "data_files" in kwargs or "data_dir" in kwargs:
            raise JobError(f"source {source!r} is a file: it takes no kwargs.data_files or data_dir")
        return LOCAL_BUILDERS[suffix], {**kwargs, "data_files": {"train": local_files("source", source, root)}}
    if source in PATH_BUILDERS:
        if "data_files" not in kwargs and "data_dir" not in kwargs:
            raise JobError(f"source {source!r} needs kwargs.data_files (files in the workers' datasets directory)")
        if "data_files" in kwargs:
            kwargs["data_files"] = map_paths(kwargs["data_files"], lambda p: local_files("kwargs.data_files", p, root))
        if "data_dir" in kwargs:
            kwargs["data_dir"] = local_dir(str(kwargs["data_dir"]), root)
        return source, kwargs
    if source in datasets.packaged_modules._PACKAGED_DATASETS_MODULES:
        raise JobError(f"source {source!r}: that builder is not allowed; load csv, json, jsonl or parquet files")
    # a hub dataset: its data_files / data_dir are paths inside its repository
    for key in ("data_files", "data_dir"):
        if key in kwargs:
            map_paths(kwargs[key], lambda p: [repo_path("kwargs.data_files or data_dir", p)])
    return source, kwargs


def map_paths(value: Any, fn: Callable[[str], list[str]]) -> Any:
    """data_files as datasets takes them (a path, a list of paths, {split: path(s)}), each path replaced by the
    files fn finds for it."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [found for v in value for found in map_paths(v, fn)]
    if isinstance(value, dict):
        return {str(k): map_paths(v, fn) for k, v in value.items()}
    raise JobError(f"data_files must be a path, a list of paths or {{split: paths}}, got {value!r}")


def inside(what: str, path: str, root: Path | None) -> Path:
    """`path` (relative to root, or absolute) resolved, symlinks followed; a JobError unless it lies in root."""
    if root is None:
        raise JobError(
            f"{what} {path!r} is a file on the worker, and this worker reads none: its operator names the "
            "directory load_dataset may read with `pgml-tuned serve --datasets-dir DIR` (PGML_DATASETS_DIR)"
        )
    if "://" in path or ".." in PurePosixPath(path).parts or path.startswith("~"):
        raise JobError(f"{what} {path!r} leaves the workers' datasets directory")
    full = (root / path).resolve()
    if not full.is_relative_to(root):
        raise JobError(f"{what} {path!r} is outside the workers' datasets directory {root}")
    return full


def local_files(what: str, pattern: str, root: Path | None) -> list[str]:
    """The files a path or glob pattern names inside root (each match checked: a symlink may not lead out)."""
    full = inside(what, pattern, root)
    matches = sorted(glob.glob(str(full), recursive=True)) if glob.has_magic(str(full)) else [str(full)]
    files = [str(inside(what, m, root)) for m in matches if Path(m).is_file()]
    if not files:
        raise JobError(f"{what} {pattern!r}: no such file in the workers' datasets directory {root}")
    return files


def local_dir(path: str, root: Path | None) -> str:
    full = inside("kwargs.data_dir", path, root)
    if not full.is_dir():
        raise JobError(f"kwargs.data_dir {path!r}: no such directory in the workers' datasets directory {root}")
    return str(full)


def repo_path(what: str, path: str) -> str:
    if "://" in path or ".." in PurePosixPath(path).parts or path.startswith(("/", "~")):
        raise JobError(f"{what} {path!r} must be a path inside the dataset's repository (relative, no '..', no URL)")
    return path


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# ---- 3. columns ----

_INTS = {"int8": "smallint", "int16": "smallint", "uint8": "smallint", "int32": "integer", "uint16": "integer"}
_INTS |= {"int64": "bigint", "uint32": "bigint", "uint64": "numeric"}
_MEDIA = ("Image", "Audio", "Video", "Pdf", "Nifti")


def pg_type(name: str, feature: Any, arrow: pa.DataType) -> str:
    """The PostgreSQL type of a column (PostgresML's mapping: string→text, ints→smallint/integer/bigint, a
    ClassLabel→its integer id, floats→real/double precision, bool→boolean, lists and dicts→jsonb)."""
    if type(feature).__name__ in _MEDIA:
        raise JobError(
            f"column {name!r} holds {type(feature).__name__.lower()} data; load_dataset stores text, numbers, "
            "booleans, dates, bytes and JSON"
        )
    if pa.types.is_dictionary(arrow):
        arrow = arrow.value_type
    if pa.types.is_string(arrow) or pa.types.is_large_string(arrow) or pa.types.is_null(arrow):
        return "text"
    if pa.types.is_integer(arrow):
        return _INTS[str(arrow)]
    if pa.types.is_floating(arrow):
        return "double precision" if arrow.bit_width == 64 else "real"
    if pa.types.is_boolean(arrow):
        return "boolean"
    if pa.types.is_decimal(arrow):
        return "numeric"
    if pa.types.is_binary(arrow) or pa.types.is_large_binary(arrow) or pa.types.is_fixed_size_binary(arrow):
        return "bytea"
    if pa.types.is_date(arrow):
        return "date"
    if pa.types.is_timestamp(arrow):
        return "timestamptz" if arrow.tz else "timestamp"
    if pa.types.is_time(arrow):
        return "time"
    if pa.types.is_nested(arrow):  # lists, structs (dicts), maps
        return "jsonb"
    raise JobError(f"column {name!r} has the type {arrow}, which load_dataset cannot store")


# ---- 5. rows as CSV ----


def csv_ready(table: pa.Table) -> pa.Table:
    """The columns pyarrow's CSV writer cannot write as PostgreSQL reads them, turned into strings: JSON for
    lists and dicts, \\x-hex for bytes; half floats widened. Everything else is written as it is."""
    for i, field in enumerate(table.schema):
        kind = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
        column = table.column(i)
        if pa.types.is_dictionary(field.type):
            column = column.cast(kind)
        if pa.types.is_nested(kind):
            column = strings(column, lambda v: json.dumps(v, default=str))
        elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
            column = strings(column, lambda v: "\\x" + v.hex())
        elif pa.types.is_float16(kind):
            column = column.cast(pa.float32())
        elif column is table.column(i):
            continue
        table = table.set_column(i, field.name, column)
    return table


def strings(column: pa.ChunkedArray, fn: Callable[[Any], str]) -> pa.Array:
    return pa.array([None if v is None else fn(v) for v in column.to_pylist()], pa.string())
