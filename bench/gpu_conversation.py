"""GPU check of the conversation recipe: our pipeline vs a plain HF Trainer + peft script, same settings.

    python bench/gpu_conversation.py                 # ≥1B-parameter Llama, bf16 LoRA and 4-bit QLoRA, on CUDA
    python bench/gpu_conversation.py --tiny          # a 2-layer model on whatever is here (a smoke test)
    python bench/gpu_conversation.py --json out.json

No PostgreSQL: our side runs the recipe's own pieces (options_from, check_machine, build_examples, load_model,
make_trainer) exactly as `run(ctx)` strings them together; the plain side is what a user would write by hand
(apply_chat_template with the assistant mask, DataCollatorForSeq2Seq, get_peft_model, Trainer). Both train the
same random-init Llama-architecture model (hidden 2048, 16 layers, intermediate 8192: 1.07B parameters with the
tiny byte-level tokenizer of tests/support/models.py) on the bundled finance chat rows with the same
TrainingArguments, alternating ours / plain, once with the base in bf16 and once with load_in_4bit (nf4, double
quantization, bf16 compute). Each run prints tokens/s (non-padding tokens through the model per second of
train_runtime) and torch.cuda.max_memory_allocated; the summary gives the ratios ours/plain (medians over
--repeats). Exit status 1 when ours is more than --tolerance slower or heavier than plain.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "daemon"), str(ROOT)]

from pgml_tuned.models import load_tokenizer  # noqa: E402
from pgml_tuned.recipes import conversation as cv  # noqa: E402
from tests.support import models as testing  # noqa: E402

FINANCE = ROOT / "daemon" / "pgml_tuned" / "data" / "finance_chat.csv"
LORA = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "bias": "none",
    "task_type": "CAUSAL_LM",
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def build_model(root: Path, tiny: bool) -> Path:
    """A random-init Llama saved with the tiny byte-level tokenizer (built once per directory)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = root / ("llama-tiny" if tiny else "llama-1b")
    if (model_dir / "config.json").is_file():
        return model_dir
    tok_dir = testing.build_tiny_llama(root / "tokenizer-source", verify=False)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    size = (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        if tiny
        else dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
        )
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **size,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    n = sum(p.numel() for p in model.parameters())
    print(f"built a random Llama with {n / 1e9:.3f}B parameters in {model_dir}", flush=True)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del model
    gc.collect()
    return model_dir


def rows(n: int) -> list[tuple[str | None, str, str]]:
    with open(FINANCE, newline="") as f:
        data = [(r["instruction"], r["input"], r["output"]) for r in csv.DictReader(f)]
    return [data[i % len(data)] for i in range(n)]


def training_args(out: Path, a: argparse.Namespace, bf16: bool) -> dict[str, Any]:
    return {
        "output_dir": str(out),
        "per_device_train_batch_size": a.batch,
        "num_train_epochs": 1,
        "learning_rate": 1e-4,
        "logging_steps": 10,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "bf16": bf16,
        "gradient_checkpointing": a.checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "optim": a.optim,
        "seed": 0,
        "dataloader_num_workers": 0,
    }


def ours(model_dir: Path, data: list[Any], quant: bool, a: argparse.Namespace, args: dict[str, Any]) -> dict[str, Any]:
    """The recipe's pipeline without a JobContext: the same calls run(ctx) makes."""
    from transformers import TrainingArguments

    hp = {"lora_config": dict(LORA), "max_seq_length": a.seq, "load_in_4bit": quant, "packing": a.packing}
    if args["bf16"]:
        hp["torch_dtype"] = "bfloat16"
    opts = cv.options_from(hp)
    cv.check_machine(opts, args)
    tokenizer = load_tokenizer(str(model_dir))
    examples, _ = cv.build_examples(data, tokenizer, opts, a.seq)
    train_set = cv.pack(examples, a.seq) if opts.packing else examples
    targs = TrainingArguments(**args)
    model = cv.load_model(
        str(model_dir), opts, device=cv.training_device(args), gradient_checkpointing=targs.gradient_checkpointing
    )
    trainer = cv.make_trainer(model, tokenizer, targs, train_set, None)
    return measure(trainer, sum(len(e["input_ids"]) for e in examples))


def plain(model_dir: Path, data: list[Any], quant: bool, a: argparse.Namespace, args: dict[str, Any]) -> dict[str, Any]:
    """What a user writes by hand with transformers + peft."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_set = []
    for system, user, assistant in data:
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
            {"role": "assistant", "content": assistant},
        ]
        enc = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(enc["input_ids"])[: a.seq]
        labels = [t if m else -100 for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True)][: a.seq]
        train_set.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    dtype = torch.bfloat16 if args["bf16"] else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": 0 if torch.cuda.is_available() else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quant:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=args["gradient_checkpointing"],
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(**LORA))
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**args),
        train_dataset=train_set,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        processing_class=tokenizer,
    )
    return measure(trainer, sum(len(e["input_ids"]) for e in train_set))


def measure(trainer: Any, tokens: int) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = trainer.train()
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    runtime = float(out.metrics.get("train_runtime") or wall)
    result = {
        "tokens": tokens,
        "train_runtime_s": round(runtime, 3),
        "tokens_per_s": round(tokens / runtime, 1),
        "train_loss": round(float(out.metrics.get("train_loss", float("nan"))), 4),
        "max_memory_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "steps": trainer.state.global_step,
    }
    return result


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a 2-layer model: check that the script works (CPU is fine)")
    p.add_argument("--rows", type=int, default=None, help="training rows (default 1024; --tiny 32)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512, help="max_seq_length")
    p.add_argument("--repeats", type=int, default=2, help="alternating ours/plain pairs per configuration")
    p.add_argument("--optim", default="adamw_torch")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--packing", action="store_true", help="our side packs (the plain side cannot): not like for like")
    p.add_argument("--only", choices=["bf16", "4bit"], default=None)
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed slowdown / extra memory of ours vs plain")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not a.tiny:
        print("no CUDA GPU here: run with --tiny to check the script on CPU", file=sys.stderr)
        return 2
    n_rows = a.rows or (32 if a.tiny else 1024)
    root = a.workdir or Path(tempfile.mkdtemp(prefix="gpu-conversation-"))
    model_dir = build_model(root, a.tiny)
    data = rows(n_rows)
    bf16 = cuda and cv.bf16_supported("cuda")
    device = "cuda" if cuda else "cpu"
    configs = [c for c in ("bf16", "4bit") if a.only in (None, c)]
    if "4bit" in configs and (problem := cv.probe_bitsandbytes(device, "4bit")):
        print(f"skipping 4bit: bitsandbytes 4-bit does not run on {device}: {problem}", flush=True)
        configs.remove("4bit")
    if not bf16 and not a.tiny:
        print("this GPU has no bf16: comparing in fp32", flush=True)

    results: dict[str, dict[str, list[dict[str, Any]]]] = {c: {"ours": [], "plain": []} for c in configs}
    for config in configs:
        for i in range(a.repeats):
            order = [("ours", ours), ("plain", plain)] if i % 2 == 0 else [("plain", plain), ("ours", ours)]
            for name, fn in order:
                args = training_args(root / f"out-{name}", a, bf16)
                r = fn(model_dir, data, config == "4bit", a, args)
                free()
                results[config][name].append(r)
                mem = f"{r['max_memory_allocated_mb']:.0f} MB" if r["max_memory_allocated_mb"] is not None else "n/a"
                print(
                    f"{config:5} {name:5} run {i + 1}: {r['tokens_per_s']:>10.1f} tokens/s  max_memory_allocated "
                    f"{mem}  loss {r['train_loss']}  ({r['steps']} steps, {r['train_runtime_s']} s)",
                    flush=True,
                )

    summary: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "tiny": a.tiny,
        "rows": n_rows,
        "batch": a.batch,
        "seq": a.seq,
        "configs": {},
    }
    failed = False
    for config, by in results.items():
        tps = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in by.items()}
        speed = tps["ours"] / tps["plain"]
        line = f"{config:5} tokens/s ours {tps['ours']:.1f} plain {tps['plain']:.1f} ratio ours/plain {speed:.3f}"
        entry: dict[str, Any] = {"tokens_per_s": tps, "speed_ratio": round(speed, 4), "runs": by}
        if cuda:
            mem = {k: statistics.median(r["max_memory_allocated_mb"] for r in v) for k, v in by.items()}
            entry["max_memory_allocated_mb"] = mem
            entry["memory_ratio"] = round(mem["ours"] / mem["plain"], 4)
            line += (
                f"; max_memory_allocated ours {mem['ours']:.0f} MB plain {mem['plain']:.0f} MB ratio "
                f"{entry['memory_ratio']:.3f}"
            )
            failed |= speed < 1 - a.tolerance or entry["memory_ratio"] > 1 + a.tolerance
        print(line, flush=True)
        summary["configs"][config] = entry
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
