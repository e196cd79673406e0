"""Recipe `conversation`: supervised fine-tuning of a causal LM on (system, user, assistant) rows, top to bottom.

hyperparams:
    dataset_args     user_column + assistant_column, optional system_column (a NULL system = no system turn)
    training_args    passed to transformers.TrainingArguments as they are (optim adamw_bnb_8bit etc. included)
    lora_config      peft.LoraConfig keys; absent = full fine-tuning. target_modules defaults per architecture
    load_in_8bit     quantize the frozen base with bitsandbytes (LoRA only)
    load_in_4bit     QLoRA: nf4, double quantization, bf16 compute (LoRA only)
    max_seq_length   truncate each conversation to this many tokens (default: the tokenizer's limit, at most 2048)
    prompt_template  for tokenizers without a chat template: "...{system}...{user}...{assistant}{eos_token}"
    train_on         "assistant" (default: loss on the answer tokens only) or "all" (the whole conversation)
    packing          true: pack short conversations into max_seq_length blocks (each keeps its own positions)
    torch_dtype      auto | float32 | float16 | bfloat16: the dtype the model weights load in
    attn_implementation  eager | sdpa | flash_attention_2 | ...

1. check what this worker can do (bitsandbytes, bf16, flash attention): a job that cannot run here fails at
   once, saying what to change — nothing falls back silently
2. read the relation once (COPY) and check every row
3. split that snapshot: test_size rows by test_sampling ('stratified' has no classes here: it is 'random')
4. tokenizer; each row → chat messages → token ids with labels (-100 outside what is trained on),
   truncated to max_seq_length; packed into blocks when asked
5. AutoModelForCausalLM (8/4-bit through bitsandbytes), then LoRA through peft — or the stored adapter,
   continued — or full fine-tuning
6. Trainer; logs stream into pgml.logs
7. evaluate (eval_loss, perplexity), store the adapter + tokenizer (or the full model) in pgml.files, with the
   base model it loads onto on the model row

Steps 1 and 4-6 are plain functions with no JobContext, so tests and benchmarks drive them
directly: build_examples, pack, Collator, check_machine, load_model, make_trainer.
"""

from __future__ import annotations

from typing import Any

from transformers import set_seed

from ...child.context import JobContext
from ...errors import JobError
from ...models import is_peft, load_config, load_tokenizer
from ...splits import split
from ..hf import (
    PgmlCallback,
    check_max_seq_length,
    check_training_args,
    evaluate_and_store,
    model_token,
    train,
    training_arguments,
)
from ..rows import check_rows
from .data import build_examples, default_max_length, pack
from .model import count_parameters, load_model, make_trainer, perplexity, save
from .options import check_machine, options_from, training_device


def run(ctx: JobContext) -> None:
    # 1. what this worker can do: fail now, before reading data or loading weights
    opts = options_from(ctx.hyperparams)
    check_training_args(ctx)
    targs = ctx.training_args
    for note in check_machine(opts, targs):
        ctx.info(note, level="warning")

    # 2. data: one read of the relation
    dargs = ctx.dataset_args
    user_col, assistant_col = dargs.get("user_column", "user"), dargs.get("assistant_column", "assistant")
    system_col = dargs.get("system_column")
    columns = [c for c in (system_col, user_col, assistant_col) if c]
    raw = ctx.read_relation(columns)
    check_rows(raw, columns, ctx.relation, nullable=[system_col] if system_col else [])
    # NULLs were refused above except in the system column
    rows: list[tuple[str | None, str, str]] = [
        (r[0], str(r[1]), str(r[2])) if system_col else (None, str(r[0]), str(r[1])) for r in raw
    ]

    # 3. split the snapshot
    seed = int(targs.get("seed", 42))
    sampling = ctx.spec["test_sampling"]
    if sampling == "stratified":
        sampling = "random"
        ctx.info("test_sampling 'stratified' needs classes, which conversations do not have: sampling at random")
    try:
        train_ix, test_ix = split([""] * len(rows), float(ctx.spec["test_size"]), sampling, seed)
    except ValueError as e:
        raise JobError(str(e)) from e
    ctx.info(
        f"{len(train_ix)} training rows, {len(test_ix)} test rows", train_rows=len(train_ix), test_rows=len(test_ix)
    )

    # 4. the starting model (a stored adapter loads onto its base and carries its tokenizer), tokens, labels
    ctx.check_stop()
    token = model_token(ctx)
    start = ctx.resolve_model(ctx.spec["model_name"], token)
    source, adapter_dir = start.source, start.adapter_dir
    base_model: str | None = None  # what the trained adapter loads onto
    if adapter_dir:
        base_model = start.adapter_base()
        if not base_model:
            raise JobError(f"{ctx.spec['model_name']!r} is a LoRA adapter without a recorded base model")
        source = ctx.resolve_model(base_model, token).source
        ctx.info(f"continuing the stored LoRA adapter on its base model {base_model}")
        if opts.lora_config:
            ctx.info("lora_config ignored: the stored adapter keeps its own LoRA settings", level="warning")
    elif opts.lora_config is not None:
        base_model = f"pgml:model:{start.stored['id']}" if start.stored else source
    elif opts.quantized:
        raise JobError(
            f"{'load_in_4bit' if opts.load_in_4bit else 'load_in_8bit'} needs lora_config: quantized "
            'weights cannot be trained directly; add "lora_config": {"r": 8, "lora_alpha": 16}'
        )
    tokenizer = load_tokenizer(adapter_dir or source, token=token)
    check_max_seq_length(ctx, tokenizer, load_config(source, token=token))
    max_len = opts.max_seq_length or default_max_length(tokenizer)
    train_set, train_stats = build_examples([rows[i] for i in train_ix], tokenizer, opts, max_len)
    test_set, test_stats = build_examples([rows[i] for i in test_ix], tokenizer, opts, max_len)
    truncated = train_stats["truncated_rows"] + test_stats["truncated_rows"]
    dropped = train_stats["dropped_rows"] + test_stats["dropped_rows"]
    if truncated:
        message = (
            f"{truncated} of {len(rows)} rows were longer than max_seq_length {max_len} tokens and were "
            "truncated" + (f"; {dropped} of them lost every {opts.train_on} token and were left out" if dropped else "")
        )
        ctx.info(message, level="warning", truncated_rows=truncated, dropped_rows=dropped)
    if not train_set or not test_set:
        raise JobError(
            f"no {'training' if not train_set else 'test'} rows are left after truncation to "
            f"max_seq_length {max_len}: raise max_seq_length"
        )
    if opts.packing:
        n_rows = len(train_set)
        train_set = pack(train_set, max_len)
        ctx.info(f"packed {n_rows} training conversations into {len(train_set)} blocks of ≤ {max_len} tokens")

    # 5. model: quantized or not, LoRA or full
    overrides: dict[str, Any] = {}
    if targs.get("gradient_checkpointing") and "gradient_checkpointing_kwargs" not in targs:
        overrides["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    args = training_arguments(ctx, n_train=len(train_set), overrides=overrides)
    ctx.check_stop()
    set_seed(seed)  # LoRA weights are initialised while loading, before the Trainer seeds anything
    model = load_model(
        source,
        opts,
        token=token,
        adapter_dir=adapter_dir,
        device=training_device(targs),
        gradient_checkpointing=bool(args.gradient_checkpointing),
    )
    trainable, total = count_parameters(model)
    ctx.info(
        f"training {trainable:,} of {total:,} parameters" + (" (LoRA)" if is_peft(model) else " (full fine-tuning)"),
        trainable_params=trainable,
    )

    # 6. train
    trainer = make_trainer(model, tokenizer, args, train_set, test_set, callbacks=[PgmlCallback(ctx)])
    metrics: dict[str, Any] = train(ctx, trainer)  # resumes from a stored checkpoint after a takeover
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    ctx.info(f"trained with optimizer {type(optimizer).__module__}.{type(optimizer).__qualname__}")

    # 7. evaluate and store (the adapter + tokenizer, or the full model)
    def derive(m: dict[str, Any]) -> dict[str, Any]:
        return {
            "perplexity": perplexity(m.get("eval_loss")),
            "train_rows": len(train_ix),
            "test_rows": len(test_ix),
            "truncated_rows": truncated,
            "dropped_rows": dropped,
            "max_seq_length": max_len,
            "trainable_params": trainable,
            **({"packed_blocks": len(train_set)} if opts.packing else {}),
        }

    evaluate_and_store(
        ctx, trainer, metrics, base_model=base_model if is_peft(model) else None, derive=derive, save=save
    )
