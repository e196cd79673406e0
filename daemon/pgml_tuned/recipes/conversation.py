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

import dataclasses
import difflib
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)

from ..child import JobContext, JobError
from ..splits import split
from ._hf import PgmlCallback, model_token, train, training_arguments

IGNORE = -100  # label of a token the loss skips
TRAIN_ON = ("assistant", "all")
DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# LoRA targets per architecture (config.model_type) when lora_config has no target_modules.
_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    **{t: _QKVO for t in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma")},
    **{t: _QKVO for t in ("gemma2", "gemma3_text", "granite", "olmo", "olmo2", "starcoder2")},
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense"),
    "phi3": ("qkv_proj", "o_proj"),
    "gpt2": ("c_attn",),
    **{t: ("query_key_value",) for t in ("gpt_neox", "falcon", "bloom")},
}
# training_args.optim values that run bitsandbytes optimizers.
BNB_OPTIMIZERS = frozenset(
    "adamw_bnb_8bit adamw_8bit paged_adamw_8bit paged_adamw_32bit ademamix ademamix_8bit "
    "paged_ademamix_8bit paged_ademamix_32bit lion_8bit lion_32bit paged_lion_8bit paged_lion_32bit rmsprop_bnb "
    "rmsprop_bnb_8bit rmsprop_bnb_32bit".split()
)
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclasses.dataclass(frozen=True)
class Options:
    """The recipe's top-level hyperparams, checked."""

    max_seq_length: int | None = None
    prompt_template: str | None = None
    train_on: str = "assistant"
    packing: bool = False
    lora_config: dict[str, Any] | None = None
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    torch_dtype: str | None = None
    attn_implementation: str | None = None

    @property
    def quantized(self) -> bool:
        return self.load_in_8bit or self.load_in_4bit


def options_from(hyperparams: dict[str, Any]) -> Options:
    """Options from hyperparams; a value of the wrong kind fails the job naming the key."""
    hp = hyperparams

    def flag(key: str) -> bool:
        value = hp.get(key, False)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise JobError(f"hyperparams.{key} must be true or false, got {value!r}")
        return value

    max_len = hp.get("max_seq_length")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2):
        raise JobError(f"hyperparams.max_seq_length must be a whole number of tokens ≥ 2, got {max_len!r}")
    train_on = hp.get("train_on") or "assistant"
    if train_on not in TRAIN_ON:
        raise JobError(f"hyperparams.train_on must be 'assistant' (loss on the answers) or 'all', got {train_on!r}")
    template = hp.get("prompt_template")
    if template is not None:
        if not isinstance(template, str) or "{assistant}" not in template or "{user}" not in template:
            raise JobError(
                "hyperparams.prompt_template must be a string with {user} and {assistant} placeholders "
                "(and optionally {system} and {eos_token}), e.g. "
                '"{system}\\n### User: {user}\\n### Assistant: {assistant}{eos_token}"'
            )
        if template.count("{assistant}") > 1:
            raise JobError("hyperparams.prompt_template has {assistant} more than once")
    lora = hp.get("lora_config")
    if lora is not None and not isinstance(lora, dict):
        raise JobError(f"hyperparams.lora_config must be a JSON object, got {lora!r}")
    dtype = hp.get("torch_dtype")
    if dtype is not None and dtype not in DTYPES:
        raise JobError(f"hyperparams.torch_dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    attn = hp.get("attn_implementation")
    if attn is not None and not isinstance(attn, str):
        raise JobError(f"hyperparams.attn_implementation must be a string such as 'sdpa', got {attn!r}")
    return Options(
        max_seq_length=max_len,
        prompt_template=template,
        train_on=train_on,
        packing=flag("packing"),
        lora_config=lora,
        load_in_8bit=flag("load_in_8bit"),
        load_in_4bit=flag("load_in_4bit"),
        torch_dtype=dtype,
        attn_implementation=attn,
    )


def run(ctx: JobContext) -> None:
    # 1. what this worker can do: fail now, before reading data or loading weights
    opts = options_from(ctx.hyperparams)
    targs = ctx.training_args
    for note in check_machine(opts, targs):
        ctx.info(note, level="warning")
        ctx.log({"warning": note})

    # 2. data: one read of the relation
    dargs = ctx.dataset_args
    user_col, assistant_col = dargs.get("user_column", "user"), dargs.get("assistant_column", "assistant")
    system_col = dargs.get("system_column")
    columns = [c for c in (system_col, user_col, assistant_col) if c]
    raw = ctx.read_relation(columns)
    relation = f"{ctx.spec['relation_schema']}.{ctx.spec['relation_table']}"
    if len(raw) < 2:
        raise JobError(f"{relation} has {len(raw)} rows; at least 2 are needed (one to train, one to test)")
    for i, row in enumerate(raw, start=1):
        for column, value in zip(columns, row, strict=True):
            if value is None and column != system_col:
                raise JobError(
                    f"row {i} of {relation} has NULL in column {column!r}; filter such rows out in a "
                    f"view (WHERE {column} IS NOT NULL)"
                )
    rows = [(r[0], r[1], r[2]) if system_col else (None, r[0], r[1]) for r in raw]

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
    source, stored = ctx.resolve_model(ctx.spec["model_name"])
    adapter_dir: str | None = None
    base_model: str | None = None  # what the trained adapter loads onto
    if (Path(source) / "adapter_config.json").is_file():
        adapter_dir = source
        base_model = (stored or {}).get("base_model") or json.loads(
            (Path(source) / "adapter_config.json").read_text()
        ).get("base_model_name_or_path")
        if not base_model:
            raise JobError(f"{ctx.spec['model_name']!r} is a LoRA adapter without a recorded base model")
        source, _ = ctx.resolve_model(base_model)
        ctx.info(f"continuing the stored LoRA adapter on its base model {base_model}")
        if opts.lora_config:
            ctx.info("lora_config ignored: the stored adapter keeps its own LoRA settings", level="warning")
    elif opts.lora_config is not None:
        base_model = f"pgml:model:{stored['id']}" if stored else source
    elif opts.quantized:
        raise JobError(
            f"{'load_in_4bit' if opts.load_in_4bit else 'load_in_8bit'} needs lora_config: quantized "
            'weights cannot be trained directly; add "lora_config": {"r": 8, "lora_alpha": 16}'
        )
    tokenizer = load_tokenizer(adapter_dir or source, token=token)
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
        ctx.log({"warning": message})
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
        gradient_checkpointing=args.gradient_checkpointing,
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

    # 7. evaluate and store
    metrics.update(trainer.evaluate())
    metrics["perplexity"] = perplexity(metrics.get("eval_loss"))
    metrics.update(
        train_rows=len(train_ix),
        test_rows=len(test_ix),
        truncated_rows=truncated,
        dropped_rows=dropped,
        max_seq_length=max_len,
        trainable_params=trainable,
    )
    if opts.packing:
        metrics["packed_blocks"] = len(train_set)
    out = ctx.workdir / "model"
    save(trainer, out)
    ctx.save_results(out, metrics, base_model=base_model if is_peft(model) else None)


# ---- 1. what this worker can do ------------------------------------------------------------------------------


def training_device(training_args: dict[str, Any]) -> str:
    return "cuda" if torch.cuda.is_available() and not training_args.get("use_cpu") else "cpu"


def bf16_supported(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    from transformers.utils.import_utils import is_torch_bf16_available_on_device

    return bool(is_torch_bf16_available_on_device("cpu"))


def probe_bitsandbytes(device: str, feature: str) -> str | None:
    """Run the smallest piece of bitsandbytes `feature` ("optimizer", "8bit", "4bit") on `device`.

    None when it works; otherwise why not. Tried rather than assumed: bitsandbytes ≥ 0.45 has CPU kernels for
    some operations and not for others, and a CUDA build may not match the driver.
    """
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except Exception as e:
        return f"bitsandbytes cannot be imported ({type(e).__name__}: {e}); pip install 'pgml-tuned[quant]'"
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if feature == "optimizer":
                p = torch.nn.Parameter(torch.ones(4096, device=device))  # 4096 values: 8-bit optimizer state
                p.grad = torch.full_like(p, 0.5)
                bnb.optim.AdamW8bit([p], lr=0.1).step()
                if not torch.isfinite(p).all() or not (p < 1).all():
                    return "an 8-bit AdamW step gave a wrong update"
            elif feature == "8bit":
                layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False).to(device)
                out = layer(torch.randn(2, 64, device=device, dtype=torch.float16))
                if not torch.isfinite(out).all():
                    return "an 8-bit matmul gave non-finite values"
            elif feature == "4bit":
                w = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
                q, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
                back = F.dequantize_4bit(q, state)
                if (back.float() - w.float()).abs().mean() > 0.2:
                    return "4-bit nf4 quantization does not round-trip"
            else:
                raise ValueError(feature)
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def check_machine(
    opts: Options,
    training_args: dict[str, Any],
    *,
    device: str | None = None,
    probe: Callable[[str, str], str | None] = probe_bitsandbytes,
    bf16_ok: Callable[[str], bool] = bf16_supported,
) -> list[str]:
    """Fail (JobError saying what to change) when the job asks for something this worker cannot do.

    Returns notes worth telling the user (features that run, but differently than on a GPU).
    """
    device = device or training_device(training_args)
    notes: list[str] = []
    where = "this worker's GPU" if device == "cuda" else "this worker (no CUDA GPU)"
    if opts.load_in_8bit and opts.load_in_4bit:
        raise JobError("load_in_8bit and load_in_4bit are both true: set one of them (load_in_4bit is QLoRA)")
    quant = "load_in_4bit" if opts.load_in_4bit else "load_in_8bit" if opts.load_in_8bit else None
    if quant:
        problem = probe(device, "4bit" if opts.load_in_4bit else "8bit")
        if problem:
            raise JobError(
                f"{quant} needs bitsandbytes {'4' if opts.load_in_4bit else '8'}-bit kernels, which do "
                f'not run on {where}: {problem}. Set "{quant}": false, or run the job on a CUDA '
                "worker with bitsandbytes installed"
            )
        if device == "cpu":
            notes.append(
                f"{quant} runs on bitsandbytes' CPU kernels here: it works, slowly; a CUDA worker is much faster"
            )
        if opts.load_in_4bit and not bf16_ok(device) and DTYPES.get(opts.torch_dtype or "") != torch.float16:
            raise JobError(
                'load_in_4bit computes in bfloat16, which this worker cannot do: set "torch_dtype": '
                '"float16" to compute in float16 instead'
            )
    optim = str(training_args.get("optim") or "")
    if optim in BNB_OPTIMIZERS:
        problem = probe(device, "optimizer")
        if problem:
            raise JobError(
                f'training_args.optim "{optim}" is a bitsandbytes optimizer, which does not run on '
                f'{where}: {problem}. Use "optim": "adamw_torch", or run the job on a CUDA worker '
                "with bitsandbytes installed"
            )
        if device == "cpu":
            notes.append(
                f'training_args.optim "{optim}" runs on bitsandbytes\' CPU kernels here: it works, more slowly than '
                "adamw_torch on a CPU"
                + ("; paging applies to GPU memory only, so it runs unpaged" if optim.startswith("paged_") else "")
            )
    for key in ("bf16", "bf16_full_eval"):
        if training_args.get(key):
            if device == "cpu" and not torch.cuda.is_available() and not training_args.get("use_cpu"):
                raise JobError(
                    f'training_args.{key} is true but this worker has no CUDA GPU: set "{key}": false, '
                    'or "use_cpu": true to train in bf16 on the CPU (slow), or run on a CUDA worker'
                )
            if not bf16_ok(device):
                raise JobError(
                    f"training_args.{key} is true but {where} does not support bfloat16: set "
                    f'"{key}": false (or "fp16": true on a GPU)'
                )
    if DTYPES.get(opts.torch_dtype or "") == torch.bfloat16 and not bf16_ok(device):
        raise JobError(f'torch_dtype "bfloat16" is not supported on {where}: use "float32" or "float16"')
    if opts.attn_implementation and opts.attn_implementation.startswith("flash_attention"):
        from transformers.utils import is_flash_attn_2_available

        if device != "cuda" or not is_flash_attn_2_available():
            raise JobError(
                f'attn_implementation "{opts.attn_implementation}" needs a CUDA GPU and the flash-attn '
                f'package, which {where} lacks: use "sdpa"'
            )
    return notes


# ---- 4. examples -------------------------------------------------------------------------------------------


def load_tokenizer(source: str, *, token: str | None = None) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(source, token=token)
    except (OSError, ValueError) as e:
        raise JobError(f"cannot load the tokenizer of {source!r}: {e}") from e


def default_max_length(tokenizer: PreTrainedTokenizerBase) -> int:
    limit = tokenizer.model_max_length
    return int(min(limit, 2048)) if isinstance(limit, int | float) and limit > 0 else 2048


def build_examples(
    rows: Sequence[tuple[str | None, str, str]], tokenizer: PreTrainedTokenizerBase, opts: Options, max_seq_length: int
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """Rows (system or None, user, assistant) → [{"input_ids", "labels"}], and counts of truncated/dropped rows.

    Labels are the input ids where the loss applies and IGNORE elsewhere: outside the assistant's tokens with
    train_on="assistant", nowhere with train_on="all". A conversation longer than max_seq_length keeps its first
    max_seq_length tokens; one left with nothing to learn (its answer cut off entirely) is dropped, as it would
    only add a NaN to the loss.
    """
    if opts.prompt_template is None and not chat_template_of(tokenizer):
        raise JobError(
            "the tokenizer has no chat template: set hyperparams.prompt_template, e.g. "
            '"prompt_template": "{system}\\n### User: {user}\\n### Assistant: {assistant}{eos_token}"'
        )
    examples, truncated, dropped = [], 0, 0
    for system, user, assistant in rows:
        ids, mask = encode(tokenizer, system, user, assistant, opts)
        labels = [t if m or opts.train_on == "all" else IGNORE for t, m in zip(ids, mask, strict=True)]
        if len(ids) > max_seq_length:
            truncated += 1
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        if all(label == IGNORE for label in labels[1:]):  # position 0 is never predicted
            dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    return examples, {"truncated_rows": truncated, "dropped_rows": dropped}


def chat_template_of(tokenizer: PreTrainedTokenizerBase) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def messages_of(system: str | None, user: str, assistant: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": user})
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return messages


def encode(
    tokenizer: PreTrainedTokenizerBase, system: str | None, user: str, assistant: str, opts: Options
) -> tuple[list[int], list[int]]:
    """Token ids of one conversation and a 0/1 mask of its assistant tokens."""
    if opts.prompt_template is not None:
        prompt, answer = render_prompt_template(opts.prompt_template, system, user, assistant, tokenizer.eos_token)
        return split_encode(tokenizer, prompt, answer, add_special_tokens=True)

    template = chat_template_of(tokenizer)
    messages = messages_of(system, user, assistant)
    try:
        if _GENERATION_MARKER.search(template or "") and getattr(tokenizer, "is_fast", False):
            enc = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            if any(enc["assistant_masks"]):
                return list(enc["input_ids"]), list(enc["assistant_masks"])
        # no {% generation %} markers: the prompt is what the template renders up to the generation prompt
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # jinja2 errors, e.g. a template that refuses a system turn
        raise JobError(
            f"the tokenizer's chat template cannot render a row ({type(e).__name__}: {e}); "
            "leave system_column out or set hyperparams.prompt_template"
        ) from e
    if not full.startswith(prompt):
        if opts.train_on == "all":
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            return list(ids), [1] * len(ids)
        raise JobError(
            "the chat template does not render a conversation as its prompt followed by the answer, so "
            "the answer tokens cannot be found: set hyperparams.prompt_template (or train_on 'all')"
        )
    return split_encode(tokenizer, prompt, full[len(prompt) :], add_special_tokens=False)


def render_prompt_template(
    template: str, system: str | None, user: str, assistant: str, eos_token: str | None
) -> tuple[str, str]:
    """(prompt, answer) texts: the template rendered up to {assistant}, and from there to its end."""

    def fill(text: str) -> str:
        # placeholders only, so braces elsewhere in the template or in the data stay as they are
        for name, value in (("system", system or ""), ("user", user), ("eos_token", eos_token or "")):
            text = text.replace("{" + name + "}", value)
        return text

    before, _, after = template.partition("{assistant}")
    return fill(before), assistant + fill(after)


def split_encode(
    tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, *, add_special_tokens: bool
) -> tuple[list[int], list[int]]:
    """Tokenize prompt + answer with a mask on the answer's tokens.

    The whole text tokenized at once, when its first tokens are exactly the prompt's (the prefix property);
    otherwise (a merge across the boundary) the two parts tokenized apart and joined — what the model sees at
    inference, where the prompt is tokenized alone and the answer generated after it.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    full_ids = tokenizer(prompt + answer, add_special_tokens=add_special_tokens)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        full_ids = prompt_ids + tokenizer(answer, add_special_tokens=False)["input_ids"]
    return list(full_ids), [0] * len(prompt_ids) + [1] * (len(full_ids) - len(prompt_ids))


def pack(examples: Sequence[dict[str, list[int]]], block_size: int) -> list[dict[str, list[int]]]:
    """Pack examples, in order, into blocks of at most block_size tokens (no example is split).

    Each example keeps its own position ids (0, 1, 2, … restarting at every example) and the first label of
    each is IGNORE, so no token is trained to predict the next example. Given position ids and no attention
    mask, transformers attends within each example only (block-diagonal causal mask; flash attention's
    variable-length kernels with flash_attention_2): a packed block computes what the examples would alone.
    """
    blocks: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        n = len(ex["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + n > block_size:
            blocks.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ex["input_ids"]
        current["labels"] += [IGNORE, *ex["labels"][1:]]
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        blocks.append(current)
    return blocks


@dataclasses.dataclass
class Collator:
    """Right-pads a batch: labels with IGNORE; plain examples get an attention mask, packed blocks (with
    position_ids) get none and a padding tail whose positions restart at 0, so it is a sequence of its own
    that no real token attends to."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in features[0]
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        batch["position_ids" if packed else "attention_mask"] = []
        for f in features:
            n = len(f["input_ids"])
            pad = longest - n
            batch["input_ids"].append(f["input_ids"] + [self.pad_token_id] * pad)
            batch["labels"].append(f["labels"] + [IGNORE] * pad)
            if packed:
                batch["position_ids"].append(f["position_ids"] + list(range(pad)))
            else:
                batch["attention_mask"].append([1] * n + [0] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


# ---- 5. model --------------------------------------------------------------------------------------------------


def lora_config(config: dict[str, Any], model_type: str) -> Any:
    """peft.LoraConfig from the lora_config hyperparam; unknown keys or bad values fail the job."""
    from peft import LoraConfig

    allowed = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    unknown = sorted(set(config) - allowed)
    if unknown:
        hints = [
            f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, allowed, n=1)) else repr(k)
            for k in unknown
        ]
        raise JobError(
            f"unknown lora_config key{'s' if len(unknown) > 1 else ''} {', '.join(hints)} (see peft.LoraConfig)"
        )
    kwargs = dict(config)
    kwargs.setdefault("task_type", "CAUSAL_LM")
    if not kwargs.get("target_modules") and not kwargs.get("target_parameters"):
        targets = LORA_TARGETS.get(model_type)
        kwargs["target_modules"] = list(targets) if targets else "all-linear"
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise JobError(f"lora_config rejected by peft: {e}") from e


def is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def load_model(
    source: str,
    opts: Options,
    *,
    token: str | None = None,
    adapter_dir: str | None = None,
    device: str = "cpu",
    gradient_checkpointing: bool = False,
) -> Any:
    """AutoModelForCausalLM from source; quantized when asked; wrapped in LoRA (new, or the stored adapter
    continued) when asked; ready for the Trainer (use_cache off, input grads on for checkpointing)."""
    kwargs: dict[str, Any] = {"token": token}
    if opts.torch_dtype:
        kwargs["dtype"] = DTYPES[opts.torch_dtype]
    if opts.attn_implementation:
        kwargs["attn_implementation"] = opts.attn_implementation
    if opts.quantized:
        from transformers import BitsAndBytesConfig

        if opts.load_in_4bit:
            compute = torch.float16 if DTYPES.get(opts.torch_dtype or "") == torch.float16 else torch.bfloat16
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            )
            kwargs.setdefault("dtype", compute)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": torch.cuda.current_device() if device == "cuda" else "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise JobError(f"cannot load model {source!r} as a causal LM: {e}") from e
    model.config.use_cache = False  # no KV cache while training (and packed blocks need none)

    if opts.quantized or adapter_dir or opts.lora_config is not None:
        try:
            from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
        except ImportError as e:
            raise JobError("LoRA needs peft on the worker: pip install 'pgml-tuned[lora]'") from e
        if opts.quantized:
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        if gradient_checkpointing:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still get gradients
        if adapter_dir:
            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
        else:
            config = lora_config(opts.lora_config or {}, model.config.model_type)
            try:
                model = get_peft_model(model, config)
            except (ValueError, TypeError) as e:  # e.g. target_modules that the model does not have
                raise JobError(f"lora_config does not fit {model.config.model_type} model {source!r}: {e}") from e
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ---- 6-7. train, evaluate, store -------------------------------------------------------------------------------


def make_trainer(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    args: TrainingArguments,
    train_set: list[dict[str, list[int]]],
    eval_set: list[dict[str, list[int]]] | None,
    callbacks: list[Any] | None = None,
) -> Trainer:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        data_collator=Collator(pad_id or 0, pad_to_multiple_of=8 if torch.cuda.is_available() else None),
        callbacks=callbacks,
    )


def perplexity(eval_loss: float | None) -> float | None:
    if eval_loss is None or not math.isfinite(eval_loss):
        return None
    return math.exp(min(eval_loss, 700.0))  # JSON has no infinity


def save(trainer: Trainer, out: Path) -> None:
    """The adapter (adapter_config.json + adapter_model.safetensors) or the full model, and the tokenizer.

    Trainer.save_model also writes training_args.bin (a pickle that can hold hub_token) and peft a README
    model card: neither is stored.
    """
    model = trainer.model
    base = model.get_base_model() if is_peft(model) else model
    base.config.use_cache = True  # for generation after reloading
    trainer.save_model(str(out))
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(str(out))
    for name in ("training_args.bin", "README.md"):
        (out / name).unlink(missing_ok=True)
