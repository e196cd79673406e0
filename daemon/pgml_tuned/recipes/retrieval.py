"""What the retrieval recipes (text_embedding.py, text_ranking.py) share: the split by query, the ranking metrics,
the evaluator that hands them to the sentence-transformers Trainer, and the train → evaluate → store sequence with
the starting model's figures beside the tuned one's.

Metrics (each held-out query that has at least one relevant text counts once):
    recall@k   the share of the query's relevant texts among the first k
    mrr@10     1 / the rank of the first relevant text within the first 10 (0 when none is)
    ndcg@10    DCG of the first 10 (gain = the pair's grade, 1 for a plain pair) over the ideal DCG
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from sentence_transformers.base.evaluation import SentenceEvaluator

from ..child.context import JobContext
from ..errors import JobError
from ..splits import split
from .hf import evaluate_and_store, train

KEY_METRIC = "ndcg@10"  # pgml._key_metric compares retrieval models by eval_ndcg@10

# per held-out query: the candidates' ids best first (at least the first 10), and the gain of each relevant id
Ranked = list[tuple[list[int], dict[int, float]]]


def split_by_query(ctx: JobContext, queries: Sequence[str]) -> tuple[list[int], list[int]]:
    """Row indices (train, test), every row of a query on the same side: a held-out query is never trained on.
    test_size counts distinct queries (a fraction of them, or a number); test_sampling 'last' holds out the last
    queries in relation order, 'random' and 'stratified' (nothing to stratify by) a seeded random choice."""
    distinct = list(dict.fromkeys(queries))
    sampling = "last" if ctx.spec["test_sampling"] == "last" else "random"
    try:
        _, test = split(distinct, float(ctx.spec["test_size"]), sampling, int(ctx.training_args.get("seed", 42)))
    except ValueError as e:
        raise JobError(f"{e} (test_size counts distinct queries here: {len(distinct)} of them)") from e
    held = {distinct[i] for i in test}
    rows = range(len(queries))
    return [i for i in rows if queries[i] not in held], [i for i in rows if queries[i] in held]


def ranking_metrics(ranked: Ranked, recall_at: Sequence[int] = (1, 10)) -> dict[str, float]:
    """recall@k for each k of recall_at, mrr@10 and ndcg@10 averaged over the queries with a relevant text."""
    judged = [(order, gains) for order, gains in ranked if gains]
    totals = dict.fromkeys([*(f"recall@{k}" for k in recall_at), "mrr@10", "ndcg@10"], 0.0)
    for order, gains in judged:
        for k in recall_at:
            totals[f"recall@{k}"] += len(set(order[:k]) & set(gains)) / len(gains)
        first = next((rank for rank, doc in enumerate(order[:10], start=1) if doc in gains), None)
        totals["mrr@10"] += 1 / first if first else 0.0
        dcg = sum(gains.get(doc, 0.0) / math.log2(rank + 2) for rank, doc in enumerate(order[:10]))
        ideal = sum(g / math.log2(rank + 2) for rank, g in enumerate(sorted(gains.values(), reverse=True)[:10]))
        totals["ndcg@10"] += dcg / ideal
    return {k: v / len(judged) for k, v in totals.items()} if judged else {}


class RankingEvaluator(SentenceEvaluator):
    """The Trainer's evaluator: `rank(model)` ranks each held-out query's candidates, `ranking_metrics` scores them
    (the Trainer prefixes them eval_: eval_ndcg@10). `extra(model)` adds figures of the recipe's own."""

    def __init__(
        self,
        rank: Callable[[Any], Ranked],
        recall_at: Sequence[int] = (1, 10),
        extra: Callable[[Any], dict[str, float]] | None = None,
    ) -> None:
        super().__init__()
        self.rank, self.recall_at, self.extra = rank, tuple(recall_at), extra
        self.primary_metric = KEY_METRIC
        self.greater_is_better = True

    def __call__(
        self, model: Any, output_path: str | None = None, epoch: float = -1, steps: int = -1
    ) -> dict[str, float]:
        metrics = ranking_metrics(self.rank(model), self.recall_at)
        return {**metrics, **(self.extra(model) if self.extra else {})}


def check_judged(gains: Sequence[dict[int, float]], what: str) -> int:
    """The number of held-out queries with a relevant text; none fails the job before training (nothing to score)."""
    judged = sum(1 for g in gains if g)
    if not judged:
        raise JobError(
            f"no held-out {what} has a relevant pair, so retrieval cannot be scored; hold out more {what}s "
            "(a larger test_size) or give more relevant pairs"
        )
    return judged


def train_evaluate_store(ctx: JobContext, trainer: Any, evaluator: RankingEvaluator, *, base_model: str | None) -> None:
    """The starting model's figures (start_ndcg@10, ...: logged at once), training (resuming from a stored
    checkpoint), the tuned model's (eval_ndcg@10, ...) and the gain (ndcg@10_gain), then the model and every
    metric stored."""
    start = {f"start_{k}": v for k, v in evaluator(trainer.model).items()}
    ctx.info(
        "the starting model on the held-out queries: "
        + ", ".join(f"{k.removeprefix('start_')} {v:.4f}" for k, v in start.items()),
        level="info",
        **start,
    )

    def derive(metrics: dict[str, Any]) -> dict[str, Any]:
        tuned = metrics.get(f"eval_{KEY_METRIC}")
        gain = {f"{KEY_METRIC}_gain": tuned - start[f"start_{KEY_METRIC}"]} if isinstance(tuned, float) else {}
        return {**start, **gain}

    evaluate_and_store(ctx, trainer, train(ctx, trainer), base_model=base_model, derive=derive)
