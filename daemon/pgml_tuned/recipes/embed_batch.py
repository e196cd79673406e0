"""Recipe `embed_batch`: the vector of every row of a relation by an embedding model, into a table of embeddings.

Queued by pgml.embed_batch(transformer, relation_name, output_table, text_column, key_column, kwargs, batch_size):
the rows (key, text) were read at submit time, in the caller's session with the caller's rights. hyperparams:
{"dataset_args": {"text_column", "key_column"}, "output_table": name, "batch_size": 64, "kwargs": {...}} (kwargs
as pgml.embed's: normalize, prompt, prompt_name, truncate_dim; checked at submit and again here).

predict_batch's steps (over_rows): the model loads as the serving lane loads it for pgml.embed (a
SentenceTransformer); the rows go CHUNK_ROWS at a time through encode (which sorts them by length, and runs
batch_size of them per forward pass) as pgml.embed encodes them, and each chunk's (key, embedding real[]) rows are
COPYed into pgml.<output_table> in one transaction. Metrics: rows, rows/s, dimensions.
"""

from __future__ import annotations

from typing import Any

from ..child.context import JobContext
from ..errors import JobError
from ..serving import cache, inference
from .predict_batch import over_rows

# rows encoded (sorted by length inside encode, batch_size at a time) and COPYed per step: one transaction per chunk,
# not per batch, and a length sort across thousands of rows (pgml.embed_batch's batch_size is encode's)
CHUNK_ROWS = 8192


def run(ctx: JobContext) -> None:
    kwargs = dict(ctx.hyperparams.get("kwargs") or {})
    try:
        inference.check_args("embed", kwargs)
    except JobError as e:
        raise JobError(f"kwargs: {e}") from e
    dims = 0
    batch_size = int(ctx.hyperparams.get("batch_size") or 64)

    def batch(loaded: cache.Loaded, keys: list[str], texts: list[str]) -> list[tuple[Any, ...]]:
        nonlocal dims
        vectors = inference.embed(loaded, texts, kwargs, batch_size)
        dims = vectors[0].count(",") + 1
        # the real[] literals pgml.embed answers with: COPY reads them into real[]
        return list(zip(keys, vectors, strict=True))

    over_rows(
        ctx, cache.EMBED, ("key", "embedding"), batch, "embeddings", lambda: {"dimensions": dims}, chunk=CHUNK_ROWS
    )
