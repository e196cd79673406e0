"""The baseline of bench/overhead.py: the text-classification recipe's work, as a plain Hugging Face script.

    python bench/plain_trainer.py --csv reviews.csv --model DIR --training-args '{...}' \\
        [--test-size 0.2] [--test-sampling last] [--text-column text] [--class-column class] \\
        [--work-dir DIR] [--result out.json]

It does exactly what daemon/pgml_tuned/recipes/text_classification.py + recipes/_hf.py do, minus pgml-tuned's
own parts (queue, child process, COPY read, pgml.logs writes, pgml.files upload):

1. read the rows (here from a CSV, in file order) and check them as the recipe does
2. label ids from the sorted class names
3. split with pgml_tuned.splits.split (same test_size, test_sampling, seed = training_args.seed or 42)
4. set_seed(seed), then AutoTokenizer + AutoModelForSequenceClassification (same arguments),
   max_length = min(512, model_max_length)
5. Trainer with the recipe's TrainingArguments defaults (logging_steps ~5% of the steps, save_strategy "no",
   disable_tqdm, report_to "none"), truncation, DataCollatorWithPadding, accuracy + macro F1
6. train, evaluate, save the model and the tokenizer to a scratch directory (removed at exit, as the child's)

It writes {"metrics": ..., "marks": {phase: time.time()}} to --result (or stdout); marks["result"] is when the
result exists (metrics computed, model saved), before the scratch folder is removed and the interpreter exits.
"""

from __future__ import annotations

import time

T_START = time.time()

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--training-args", default="{}", help="JSON object, as hyperparams.training_args")
    ap.add_argument("--max-seq-length", type=int)
    ap.add_argument("--test-size", type=float, default=0.25)
    ap.add_argument("--test-sampling", default="stratified")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--class-column", default="class")
    ap.add_argument("--work-dir", help="scratch folder (default: the system's temporary folder)")
    ap.add_argument("--result")
    args = ap.parse_args()
    marks: dict[str, float] = {"start": T_START}

    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        EvalPrediction,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from pgml_tuned.splits import split

    marks["imported"] = time.time()

    # 1. data, checked as the recipe checks it
    columns = [args.text_column, args.class_column]
    with open(args.csv, newline="") as f:
        rows = [tuple(r[c] for c in columns) for r in csv.DictReader(f)]
    if len(rows) < 2:
        raise SystemExit(f"{args.csv} has {len(rows)} rows")
    for i, row in enumerate(rows, start=1):
        for column, value in zip(columns, row, strict=True):
            if value is None or (column != args.class_column and not value.strip()):
                raise SystemExit(f"row {i} has NULL or empty text in column {column!r}")

    # 2. labels
    classes = [str(r[-1]) for r in rows]
    label_names = sorted(set(classes))
    label2id = {name: i for i, name in enumerate(label_names)}
    id2label = dict(enumerate(label_names))

    # 3. split
    training_args: dict[str, Any] = json.loads(args.training_args)
    seed = int(training_args.get("seed", 42))
    train_ix, test_ix = split(classes, args.test_size, args.test_sampling, seed)
    marks["data"] = time.time()

    # 4. model and tokenizer (seeded first: the new classifier head is initialised here)
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(label_names), id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True
    )
    max_length = int(args.max_seq_length or min(512, tokenizer.model_max_length or 512))

    def encode(ix: list[int]) -> list[dict[str, Any]]:
        texts = [[rows[i][0] for i in ix]]
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        return [{**{k: v[j] for k, v in enc.items()}, "labels": label2id[classes[i]]} for j, i in enumerate(ix)]

    train_set, test_set = encode(train_ix), encode(test_ix)
    marks["model"] = time.time()

    # 5. the recipe's TrainingArguments defaults (recipes/_hf.py training_arguments)
    workdir = Path(tempfile.mkdtemp(prefix="plain-trainer-", dir=args.work_dir))
    try:
        targs = dict(training_args)
        batch = int(targs.get("per_device_train_batch_size", 8)) * int(targs.get("gradient_accumulation_steps", 1))
        epochs = float(targs.get("num_train_epochs", 3))
        total = (
            int(targs["max_steps"])
            if int(targs.get("max_steps", -1) or -1) > 0
            else max(1, int(epochs * -(-len(train_set) // max(1, batch))))
        )
        targs.setdefault("logging_steps", max(1, min(500, total // 20)))
        if "save_strategy" not in training_args and "save_steps" not in training_args:
            targs["save_strategy"] = "no"
        targs.setdefault("disable_tqdm", True)
        targs.setdefault("report_to", "none")
        targs["output_dir"] = str(workdir / "trainer")

        def accuracy_and_macro_f1(pred: EvalPrediction) -> dict[str, float]:  # as the recipe's
            logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
            y_pred = np.asarray(torch.as_tensor(logits).argmax(-1))
            y_true = np.asarray(pred.label_ids)
            scores = []
            for c in np.union1d(y_true, y_pred):
                tp = float(np.sum((y_pred == c) & (y_true == c)))
                fp = float(np.sum((y_pred == c) & (y_true != c)))
                fn = float(np.sum((y_pred != c) & (y_true == c)))
                scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
            return {"accuracy": float((y_pred == y_true).mean()), "f1": float(np.mean(scores))}

        trainer = Trainer(
            model=model,
            args=TrainingArguments(**targs),
            train_dataset=train_set,
            eval_dataset=test_set,
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=accuracy_and_macro_f1,
        )
        marks["train_start"] = time.time()

        # 6. train, evaluate, save
        train_output = trainer.train()
        marks["train_end"] = time.time()
        metrics: dict[str, Any] = dict(train_output.metrics)
        metrics.update(trainer.evaluate())
        marks["eval_end"] = time.time()
        out = workdir / "model"
        trainer.save_model(str(out))
        tokenizer.save_pretrained(str(out))
        saved = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        marks["saved"] = time.time()
        # the result: metrics known and the model saved (what the job's 'succeeded' row stands for); the
        # scratch folder is removed afterwards, as the training child removes its own after committing
        marks["result"] = time.time()
        result = {
            "metrics": metrics,
            "marks": marks,
            "saved_bytes": saved,
            "train_rows": len(train_ix),
            "test_rows": len(test_ix),
            "logging_steps": targs["logging_steps"],
            "max_steps": trainer.state.max_steps,
        }
        text = json.dumps(result, default=float)
        if args.result:
            Path(args.result).write_text(text)
        else:
            print(text)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
