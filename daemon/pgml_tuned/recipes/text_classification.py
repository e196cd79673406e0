"""Recipe `text-classification` (and `text-pair-classification`), top to bottom.

hyperparams:
    dataset_args   text_column + class_column  (pairs: text1_column + text2_column + class_column)
    training_args  passed to transformers.TrainingArguments as they are
    max_seq_length truncate inputs to this many tokens (default: the model's limit, at most 512)

1. read the relation once (COPY) and check every row
2. label ids from the sorted class names (deterministic across runs and workers)
3. split that snapshot: test_size rows by test_sampling
4. tokenizer + AutoModelForSequenceClassification (hub id, worker directory, or pgml:<project>)
5. Trainer with dynamic padding; logs stream into pgml.logs
6. evaluate (eval_loss, eval_accuracy, eval_f1 macro), store every file in pgml.files, succeed
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import (
    DataCollatorWithPadding,
    EvalPrediction,
    Trainer,
    set_seed,
)

from ..child.context import JobContext
from ..errors import JobError
from ..models import load_sequence_classifier, load_tokenizer
from ..splits import split
from .hf import (
    PgmlCallback,
    check_max_seq_length,
    check_training_args,
    model_token,
    train_evaluate_store,
    training_arguments,
)
from .rows import check_rows


def run(ctx: JobContext) -> None:
    check_training_args(ctx)  # a wrong key or value fails before the data is read

    # 1. data: one read of the relation
    pair = ctx.spec["task"] == "text-pair-classification"
    dargs = ctx.dataset_args
    text_columns = (
        [dargs.get("text1_column", "text1"), dargs.get("text2_column", "text2")]
        if pair
        else [dargs.get("text_column", "text")]
    )
    class_column = dargs.get("class_column")
    if not class_column:
        raise JobError("dataset_args.class_column is required")
    rows = ctx.read_relation([*text_columns, class_column])
    check_rows(rows, [*text_columns, class_column], ctx.relation, non_empty=text_columns)

    # 2. labels: sorted class names → ids
    classes = [str(r[-1]) for r in rows]
    label_names = sorted(set(classes))
    if len(label_names) < 2:
        raise JobError(f"column {class_column!r} of {ctx.relation} has a single class {label_names}: nothing to learn")
    label2id = {name: i for i, name in enumerate(label_names)}

    # 3. split the snapshot
    seed = int(ctx.training_args.get("seed", 42))
    try:
        train_ix, test_ix = split(classes, float(ctx.spec["test_size"]), ctx.spec["test_sampling"], seed)
    except ValueError as e:
        raise JobError(str(e)) from e
    ctx.info(
        f"{len(train_ix)} training rows, {len(test_ix)} test rows, {len(label_names)} classes",
        train_rows=len(train_ix),
        test_rows=len(test_ix),
        classes=label_names,
    )

    # 4. model and tokenizer
    ctx.check_stop()
    token = model_token(ctx)
    start = ctx.resolve_model(ctx.spec["model_name"], token)
    set_seed(seed)  # the new classifier head is initialised here, before the Trainer seeds anything
    tokenizer = load_tokenizer(start.source, token=token)
    model = load_sequence_classifier(start.source, start.name, label_names=label_names, token=token)
    check_max_seq_length(ctx, tokenizer, model.config)
    # A classifier's loss is the batch's mean: it ignores the Trainer's token count (num_items_in_batch). Left to
    # guess from forward(**kwargs), the Trainer would take it for a token-normalized loss and scale it by the
    # number of ranks (2 ranks: a doubled loss, and doubled gradients) and not divide it by gradient accumulation.
    model.accepts_loss_kwargs = False
    max_length = int(ctx.hyperparams.get("max_seq_length") or min(512, tokenizer.model_max_length or 512))

    def encode(ix: list[int]) -> list[dict[str, Any]]:
        texts = [[rows[i][c] for i in ix] for c in range(len(text_columns))]
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        return [{**{k: v[j] for k, v in enc.items()}, "labels": label2id[classes[i]]} for j, i in enumerate(ix)]

    train_set, test_set = encode(train_ix), encode(test_ix)

    # 5. train
    trainer = Trainer(
        model=model,
        args=training_arguments(ctx, n_train=len(train_set)),
        train_dataset=train_set,
        eval_dataset=test_set,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy_and_macro_f1,
        callbacks=[PgmlCallback(ctx)],
    )

    # 6. evaluate and store
    train_evaluate_store(ctx, trainer, base_model=(start.stored or {}).get("base_model"))


def accuracy_and_macro_f1(pred: EvalPrediction) -> dict[str, float]:
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    y_pred = np.asarray(torch.as_tensor(logits).argmax(-1))
    y_true = np.asarray(pred.label_ids)
    return {"accuracy": float((y_pred == y_true).mean()), "f1": macro_f1(y_true, y_pred)}


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes present in y_true or y_pred (as scikit-learn)."""
    scores = []
    for c in np.union1d(y_true, y_pred):
        tp = float(np.sum((y_pred == c) & (y_true == c)))
        fp = float(np.sum((y_pred == c) & (y_true != c)))
        fn = float(np.sum((y_pred != c) & (y_true == c)))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))
