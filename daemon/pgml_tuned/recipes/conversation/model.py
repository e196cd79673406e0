"""Conversation recipe, steps 5-7: the model ready for training (quantized, LoRA new or continued, or full),
the Trainer, and what is saved.

Loading itself (hub id, directory or stored model; 8/4-bit) is pgml_tuned.models, shared with inference.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments

from ...errors import JobError
from ...models import attach_adapter, is_peft, load_causal_lm, peft_module
from ..hf import save_model
from .data import Collator
from .options import Options

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


def load_model(
    source: str,
    opts: Options,
    *,
    token: str | None = None,
    adapter_dir: str | None = None,
    device: str = "cpu",
    gradient_checkpointing: bool = False,
) -> Any:
    """The causal LM from source (quantized when asked), wrapped in LoRA (new, or the stored adapter
    continued) when asked, ready for the Trainer (use_cache off, input grads on for checkpointing)."""
    model = load_causal_lm(
        source,
        token=token,
        dtype=opts.torch_dtype,
        attn_implementation=opts.attn_implementation,
        quantize=opts.quantize,
        device=device,
    )
    model.config.use_cache = False  # no KV cache while training (and packed blocks need none)

    if opts.quantized or adapter_dir or opts.lora_config is not None:
        peft = peft_module()
        if opts.quantized:
            model = peft.prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        if gradient_checkpointing:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still get gradients
        if adapter_dir:
            model = attach_adapter(model, adapter_dir, trainable=True)
        else:
            config = lora_config(opts.lora_config or {}, model.config.model_type)
            try:
                model = peft.get_peft_model(model, config)
            except (ValueError, TypeError) as e:  # e.g. target_modules that the model does not have
                raise JobError(f"lora_config does not fit {model.config.model_type} model {source!r}: {e}") from e
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


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
    """The adapter (adapter_config.json + adapter_model.safetensors) or the full model, and the tokenizer,
    with the KV cache switched back on for generation after reloading."""
    model: Any = trainer.model
    base = model.get_base_model() if is_peft(model) else model
    base.config.use_cache = True
    save_model(trainer, out)
