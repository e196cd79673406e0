"""Conversation recipe, step 1: the recipe's hyperparams (Options) and what this worker can do.

A job that asks for something the worker cannot run (bitsandbytes kernels, bf16, flash attention) fails at
once, saying what to change, before any data is read or weights are loaded — nothing falls back silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ...errors import JobError
from ...models import DTYPES

TRAIN_ON = ("assistant", "all")
# training_args.optim values that run bitsandbytes optimizers.
BNB_OPTIMIZERS = frozenset(
    "adamw_bnb_8bit adamw_8bit paged_adamw_8bit paged_adamw_32bit ademamix ademamix_8bit "
    "paged_ademamix_8bit paged_ademamix_32bit lion_8bit lion_32bit paged_lion_8bit paged_lion_32bit rmsprop_bnb "
    "rmsprop_bnb_8bit rmsprop_bnb_32bit".split()
)


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

    @property
    def quantize(self) -> str | None:
        """ "4bit", "8bit" or None: how models.load_causal_lm quantizes the base."""
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None


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
        if opts.load_in_4bit and not bf16_ok(device) and DTYPES.get(opts.torch_dtype or "") != "float16":
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
    if DTYPES.get(opts.torch_dtype or "") == "bfloat16" and not bf16_ok(device):
        raise JobError(f'torch_dtype "bfloat16" is not supported on {where}: use "float32" or "float16"')
    if opts.attn_implementation and opts.attn_implementation.startswith("flash_attention"):
        from transformers.utils import is_flash_attn_2_available

        if device != "cuda" or not is_flash_attn_2_available():
            raise JobError(
                f'attn_implementation "{opts.attn_implementation}" needs a CUDA GPU and the flash-attn '
                f'package, which {where} lacks: use "sdpa"'
            )
    return notes
