"""Recipe `predict_batch`: classify every row of a relation with a model, into a table of predictions.

Queued by pgml.predict_batch(model, relation_name, output_table, text_column, key_column, batch_size): the rows
(key, text) were read at submit time, in the caller's session with the caller's rights. hyperparams:
{"dataset_args": {"text_column", "key_column"}, "output_table": name, "batch_size": 64, "max_length": null}.

1. read the job's rows (key, text)
2. load the model as the serving lane does (a hub id, pgml:<project> = its deployed model, pgml:model:<id>,
   a LoRA adapter merged onto its recorded base) — the same answers pgml.transform gives
3. classify batch by batch; COPY each batch's (key, label, score) into pgml.<output_table> and log progress
   (step = batches done, so CALL pgml.wait and pgml.job_status show how far it is)
4. succeed with rows, rows/s and how many rows got each label

embed_batch.py runs the same steps (`over_rows`) with an embedding model.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..child.context import JobContext
from ..errors import JobError
from ..serving import cache, inference


def run(ctx: JobContext) -> None:
    pipeline_args = {"max_length": ctx.hyperparams["max_length"]} if ctx.hyperparams.get("max_length") else {}
    labels = Counter[str]()

    def batch(loaded: cache.Loaded, keys: list[str], texts: list[str]) -> list[tuple[Any, ...]]:
        answers = inference.classify(loaded, texts, pipeline_args)
        labels.update(a["label"] for a in answers)
        return [(k, str(a["label"]), float(a["score"])) for k, a in zip(keys, answers, strict=True)]

    over_rows(ctx, cache.CLASSIFY, ("key", "label", "score"), batch, "predictions", lambda: {"labels": dict(labels)})


def over_rows(
    ctx: JobContext,
    family: str,
    columns: tuple[str, ...],
    batch: Callable[[cache.Loaded, list[str], list[str]], list[tuple[Any, ...]]],
    what: str,
    more_metrics: Callable[[], dict[str, Any]],
    chunk: int = 0,
) -> None:
    """Steps 1-4 for a model of `family`: `batch` turns a step's keys and texts into rows of `columns`; a step is
    batch_size rows, or `chunk` rows when that is more (`batch` then runs the model batch_size rows at a time)."""
    args = ctx.dataset_args
    batch_size = max(int(ctx.hyperparams.get("batch_size") or 64), chunk)

    # 1. the rows
    rows = ctx.read_relation([args.get("key_column", "id"), args.get("text_column", "text")])
    texts = [t if t is not None else "" for _, t in rows]
    if not rows:
        raise JobError("the relation had no rows when the job was submitted")

    # 2. the model
    ctx.check_stop()
    key = cache.ModelKey(family, ctx.spec["model_name"], ctx.spec.get("submitted_by") or "")
    loaded = cache.load(key, ctx.store, ctx.workdir / "models")
    ctx.info(f"loaded {ctx.spec['model_name']} on {loaded.device}", device=loaded.device)

    # 3. batch by batch
    output = ctx.store.begin_predictions(restart=True)
    ctx.start_over(f"the {what} of an earlier attempt were emptied")
    started = time.monotonic()
    batches = (len(rows) + batch_size - 1) // batch_size
    for step, start in enumerate(range(0, len(rows), batch_size), start=1):
        if ctx.stop_requested:
            raise ctx.interrupted(f"after {start} of {len(rows)} rows")
        keys = [k or "" for k, _ in rows[start : start + batch_size]]
        out = batch(loaded, keys, texts[start : start + batch_size])
        ctx.store.write_predictions(out, columns)
        done = start + len(out)
        ctx.log({"step": step, "max_steps": batches, "rows": done, "rows_per_second": round(done / elapsed(started))})

    # 4. done
    seconds = elapsed(started)
    metrics = {"rows": len(rows), "seconds": round(seconds, 3), "rows_per_second": round(len(rows) / seconds)}
    ctx.info(f"wrote {len(rows)} {what} into pgml.{output} in {seconds:.2f} s", rows=len(rows))
    with tempfile.TemporaryDirectory() as d:  # a batch job stores no model files
        ctx.save_results(Path(d), {**metrics, "output_table": f"pgml.{output}", **more_metrics()})


def elapsed(started: float) -> float:
    return max(time.monotonic() - started, 1e-9)
