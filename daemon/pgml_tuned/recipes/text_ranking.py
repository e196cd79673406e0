"""Recipe `text-ranking`: a reranker (cross-encoder) tuned with sentence-transformers, top to bottom.

hyperparams:
    dataset_args   query_column, document_column, label_column (defaults "query", "document", "label"): a label is
                   0/1 (or a boolean), or a relevance score in [0, 1]; BinaryCrossEntropyLoss
    training_args  transformers.TrainingArguments keys (sentence-transformers' arguments are built from them)
    max_seq_length truncate each (query, document) pair to this many tokens (default: the model's limit)

pgml.tune checked the columns and rows already (pgml._check_retrieval_args / _check_retrieval_rows).

1. read the rows once; split them by query (test_size counts queries: a held-out query is never trained on)
2. the starting model: a cross-encoder as it is, or a plain encoder with a new 1-label head
3. reranking evaluation: each held-out query's own rows are its candidates, ranked by the model's score;
   relevant = label above 0.5, the label as the NDCG gain (eval_mrr@10, eval_ndcg@10). The starting model is
   scored first (start_mrr@10, start_ndcg@10)
4. CrossEncoderTrainer (logs to pgml.logs, checkpoints in PostgreSQL, resume, cancel: recipes/hf.py)
5. the tuned model scored and stored as sentence-transformers saves a CrossEncoder (config.json with one label,
   model.safetensors, tokenizer, modules.json): CrossEncoder(directory) loads it
"""

from __future__ import annotations

from typing import Any, cast

from datasets import Dataset
from sentence_transformers import CrossEncoderTrainer, CrossEncoderTrainingArguments
from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
from transformers import set_seed

from ..child.context import JobContext
from ..models import load_cross_encoder
from .hf import PgmlCallback, check_max_seq_length, check_training_args, model_token, training_arguments
from .retrieval import Ranked, RankingEvaluator, check_judged, split_by_query, train_evaluate_store
from .rows import check_rows


def run(ctx: JobContext) -> None:
    check_training_args(ctx)  # a wrong key or value fails before the data is read

    # 1. data: one read, split by query
    dargs = ctx.dataset_args
    names = [dargs.get(k, k.removesuffix("_column")) for k in ("query_column", "document_column", "label_column")]
    rows = ctx.read_relation(names)
    check_rows(rows, names, ctx.relation, non_empty=names[:2])
    queries, documents = [str(r[0]) for r in rows], [str(r[1]) for r in rows]
    labels = [label_value(r[2]) for r in rows]
    train_ix, test_ix = split_by_query(ctx, queries)
    ctx.info(
        f"{len(train_ix)} training rows, {len(test_ix)} held-out rows "
        f"({len(set(queries[i] for i in test_ix))} held-out queries)",
        train_rows=len(train_ix),
        test_rows=len(test_ix),
    )

    # 2. the starting model
    ctx.check_stop()
    token = model_token(ctx)
    start = ctx.resolve_model(ctx.spec["model_name"], token)
    set_seed(int(ctx.training_args.get("seed", 42)))  # a new head is initialised here
    model = load_cross_encoder(start.source, ctx.spec["model_name"], token=token)
    check_max_seq_length(ctx, model.tokenizer, model.config)
    if ctx.hyperparams.get("max_seq_length"):
        model.max_seq_length = int(ctx.hyperparams["max_seq_length"])

    # 3. reranking evaluation: each held-out query's candidates
    candidates: dict[str, list[int]] = {}
    for i in test_ix:
        candidates.setdefault(queries[i], []).append(i)
    gains = [{i: labels[i] for i in rows_of if labels[i] > 0.5} for rows_of in candidates.values()]
    check_judged(gains, "query")

    def ranked(model: Any) -> Ranked:
        pairs = [(queries[i], documents[i]) for rows_of in candidates.values() for i in rows_of]
        scores = iter(model.predict(pairs, batch_size=64, show_progress_bar=False).tolist())
        order = []
        for rows_of in candidates.values():
            scored = [(next(scores), i) for i in rows_of]
            order.append([i for _, i in sorted(scored, key=lambda s: -s[0])])
        return list(zip(order, gains, strict=True))

    evaluator = RankingEvaluator(ranked, recall_at=())

    # 4. train
    def rows_of(ix: list[int]) -> Dataset:
        return Dataset.from_dict(
            {
                "query": [queries[i] for i in ix],
                "document": [documents[i] for i in ix],
                "label": [labels[i] for i in ix],
            }
        )

    trainer = CrossEncoderTrainer(
        model=model,
        args=cast(
            CrossEncoderTrainingArguments,
            training_arguments(ctx, n_train=len(train_ix), cls=CrossEncoderTrainingArguments),
        ),
        train_dataset=rows_of(train_ix),
        eval_dataset=rows_of(test_ix),
        loss=BinaryCrossEntropyLoss(model),
        evaluator=evaluator,
        callbacks=[PgmlCallback(ctx)],
    )

    # 5. evaluate (the starting model too) and store
    train_evaluate_store(ctx, trainer, evaluator, base_model=(start.stored or {}).get("base_model"))


def label_value(value: str | None) -> float:
    """A label as the job's table holds it (text): 'true' / 'false' from a boolean column, else a number."""
    text = str(value)
    return 1.0 if text == "true" else 0.0 if text == "false" else float(text)
