"""Recipe `text-embedding`: an embedding model (bi-encoder) tuned on pairs with sentence-transformers, top to bottom.

hyperparams:
    dataset_args   anchor_column + positive_column (defaults "anchor", "positive"): MultipleNegativesRankingLoss,
                   the other pairs of a batch are the negatives;
                   + negative_column: a hard negative per pair (still MultipleNegativesRankingLoss), or
                   + score_column: graded pairs, a similarity in [-1, 1] or [0, 1] (CoSENTLoss);
                   matryoshka_dims, e.g. [384, 256, 128, 64]: MatryoshkaLoss around that loss, so embeddings cut to
                   any of those dimensions still retrieve
    training_args  transformers.TrainingArguments keys (sentence-transformers' arguments are built from them)
    max_seq_length truncate texts to this many tokens (default: the model's own max_seq_length)

pgml.tune checked the columns and rows already (pgml._check_retrieval_args / _check_retrieval_rows).

1. read the rows once; split them by anchor (test_size counts anchors: a held-out anchor is never trained on)
2. the starting model: a sentence-transformers model as it is, or a plain encoder with mean pooling added
3. retrieval evaluation: each held-out anchor queries the corpus of every distinct positive (and hard negative)
   of the whole table, train and test alike; relevant = its own positives (with score_column: the pairs scored
   above the middle of the range, 0.5 on [0, 1] or 0 on [-1, 1], their score as the NDCG gain). The starting
   model is scored first (start_ndcg@10, ...)
4. SentenceTransformerTrainer (logs to pgml.logs, checkpoints in PostgreSQL, resume, cancel: recipes/hf.py)
5. the tuned model scored (eval_recall@1, eval_recall@10, eval_mrr@10, eval_ndcg@10; with matryoshka_dims
   eval_dim<d>_ndcg@10 per dimension), stored in the sentence-transformers layout (modules.json,
   1_Pooling/config.json, model.safetensors, ...): SentenceTransformer(directory) loads it
"""

from __future__ import annotations

from typing import Any, cast

import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import CoSENTLoss, MatryoshkaLoss, MultipleNegativesRankingLoss
from transformers import set_seed

from ..child.context import JobContext
from ..errors import JobError
from ..models import load_sentence_transformer
from .hf import PgmlCallback, check_max_seq_length, check_training_args, model_token, training_arguments
from .retrieval import (
    Ranked,
    RankingEvaluator,
    check_judged,
    ranking_metrics,
    split_by_query,
    train_evaluate_store,
)
from .rows import check_rows


def run(ctx: JobContext) -> None:
    check_training_args(ctx)  # a wrong key or value fails before the data is read

    # 1. data: one read, split by anchor
    dargs = ctx.dataset_args
    names = {"anchor": dargs.get("anchor_column", "anchor"), "positive": dargs.get("positive_column", "positive")}
    if dargs.get("negative_column"):
        names["negative"] = dargs["negative_column"]
    if dargs.get("score_column"):
        names["score"] = dargs["score_column"]
    rows = ctx.read_relation(list(names.values()))
    text_columns = [c for k, c in names.items() if k != "score"]
    check_rows(rows, list(names.values()), ctx.relation, non_empty=text_columns)
    data: dict[str, list[Any]] = {k: [r[i] for r in rows] for i, k in enumerate(names)}
    if "score" in data:
        data["score"] = [float(v) for v in data["score"]]
    train_ix, test_ix = split_by_query(ctx, data["anchor"])
    ctx.info(
        f"{len(train_ix)} training pairs, {len(test_ix)} held-out pairs "
        f"({len(set(data['anchor'][i] for i in test_ix))} held-out anchors)",
        train_rows=len(train_ix),
        test_rows=len(test_ix),
    )

    # 2. the starting model
    ctx.check_stop()
    token = model_token(ctx)
    start = ctx.resolve_model(ctx.spec["model_name"], token)
    set_seed(int(ctx.training_args.get("seed", 42)))  # a new pooling or head is initialised here
    model = load_sentence_transformer(start.source, ctx.spec["model_name"], token=token)
    transformer = model[0]
    check_max_seq_length(ctx, transformer.tokenizer, transformer.auto_model.config)
    if ctx.hyperparams.get("max_seq_length"):
        model.max_seq_length = int(ctx.hyperparams["max_seq_length"])
    dims = [int(d) for d in dargs.get("matryoshka_dims") or []]
    width = model.get_embedding_dimension()
    if dims and dims[0] > width:
        raise JobError(
            f"dataset_args.matryoshka_dims starts at {dims[0]}, but model {ctx.spec['model_name']!r} makes "
            f"{width}-dimensional embeddings; use dimensions of at most {width}, e.g. {matryoshka_example(width)}"
        )

    # 3. retrieval evaluation on the held-out anchors
    corpus = list(dict.fromkeys([*data["positive"], *data.get("negative", [])]))
    queries, gains = relevant_by_anchor(data, test_ix, {text: i for i, text in enumerate(corpus)})

    def ranked(model: Any, dim: int | None = None) -> Ranked:
        q = embed(model, queries, dim)
        c = embed(model, corpus, dim)
        top = (q @ c.T).topk(min(10, len(corpus)), dim=1).indices.tolist()
        return list(zip(top, gains, strict=True))

    check_judged(gains, "anchor")
    evaluator = RankingEvaluator(
        ranked,
        extra=lambda m: {f"dim{d}_{k}": v for d in dims for k, v in ndcg_only(ranked(m, d)).items()},
    )

    # 4. train
    base_loss = CoSENTLoss(model) if "score" in data else MultipleNegativesRankingLoss(model)
    loss = MatryoshkaLoss(model, base_loss, matryoshka_dims=dims) if dims else base_loss
    columns = [k for k in ("anchor", "positive", "negative", "score") if k in data]
    overrides = {} if "score" in data else {"batch_sampler": "no_duplicates"}  # a duplicate is no negative
    trainer = SentenceTransformerTrainer(
        model=model,
        args=cast(
            SentenceTransformerTrainingArguments,
            training_arguments(
                ctx, n_train=len(train_ix), overrides=overrides, cls=SentenceTransformerTrainingArguments
            ),
        ),
        train_dataset=Dataset.from_dict({k: [data[k][i] for i in train_ix] for k in columns}),
        eval_dataset=Dataset.from_dict({k: [data[k][i] for i in test_ix] for k in columns}),
        loss=loss,
        evaluator=evaluator,
        callbacks=[PgmlCallback(ctx)],
    )

    # 5. evaluate (the starting model too) and store
    train_evaluate_store(ctx, trainer, evaluator, base_model=(start.stored or {}).get("base_model"))


def relevant_by_anchor(
    data: dict[str, list[Any]], test_ix: list[int], corpus_ids: dict[str, int]
) -> tuple[list[str], list[dict[int, float]]]:
    """The held-out anchors (each once, in order) and the gain of each of their relevant corpus texts."""
    scores = data.get("score")
    middle = 0.5 if scores is not None and min(scores) >= 0 else 0.0
    gains: dict[str, dict[int, float]] = {}
    for i in test_ix:
        relevant = gains.setdefault(data["anchor"][i], {})
        if scores is None:
            relevant[corpus_ids[data["positive"][i]]] = 1.0
        elif scores[i] > middle:
            relevant[corpus_ids[data["positive"][i]]] = scores[i]
    return list(gains), list(gains.values())


def embed(model: Any, texts: list[str], dim: int | None) -> torch.Tensor:
    """Unit-length embeddings (cut to `dim` first): their dot products are cosine similarities."""
    vectors = model.encode(texts, convert_to_tensor=True, batch_size=64, show_progress_bar=False).float()
    vectors = vectors[:, :dim] if dim else vectors
    return torch.nn.functional.normalize(vectors, dim=1)


def ndcg_only(ranked: Ranked) -> dict[str, float]:
    return {k: v for k, v in ranking_metrics(ranked, ()).items() if k == "ndcg@10"}


def matryoshka_example(width: int) -> list[int]:
    return [d for d in (width, width // 2, width // 4, width // 8) if d >= 1]
