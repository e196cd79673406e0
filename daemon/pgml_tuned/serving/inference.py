"""Answers from a loaded model (blocking, no database: the server runs these in a thread).

- classify: the transformers text-classification pipeline over every input of a batch at once; per input
  `{"label": <id2label name>, "score": <float>}` (with `top_k`, a list of them), the guide's shape.
- generate: prompts (texts, or chat conversations through the tokenizer's chat template) left-padded into one
  `model.generate`; per prompt the text, why it stopped, and real token counts. A streamed request runs alone,
  its text pieces handed to `on_text` as the tokens come.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import JobError
from .cache import Loaded

OURS = frozenset({"stream", "timeout"})  # the lane's own args, never passed on
# what a client may send that concerns loading or the client (the OpenAI-shaped call sends them): not generate's
IGNORED = frozenset({"load_in_8bit", "load_in_4bit", "dtype", "torch_dtype", "cache_model", "model", "device"})
GENERATE_ARGS = frozenset(
    {
        "max_new_tokens",
        "min_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "do_sample",
        "num_beams",
        "no_repeat_ngram_size",
        "length_penalty",
        "typical_p",
    }
)
MAX_NEW_TOKENS = 4096


def pipeline_args(args: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in args.items() if k not in OURS and k not in IGNORED}


def generation_kwargs(args: dict[str, Any]) -> dict[str, Any]:
    """generate()'s keyword arguments from a request's args (OpenAI names accepted: max_tokens)."""
    kw: dict[str, Any] = {}
    for k, v in pipeline_args(args).items():
        if k == "max_tokens":
            k = "max_new_tokens"
        if k not in GENERATE_ARGS:
            raise JobError(f"unknown generation argument {k!r}; known: max_tokens, {', '.join(sorted(GENERATE_ARGS))}")
        kw[k] = v
    kw.setdefault("max_new_tokens", 64)
    if not isinstance(kw["max_new_tokens"], int) or not 1 <= kw["max_new_tokens"] <= MAX_NEW_TOKENS:
        raise JobError(
            f"max_new_tokens must be a whole number from 1 to {MAX_NEW_TOKENS}, got {kw['max_new_tokens']!r}"
        )
    temperature = kw.get("temperature")
    if temperature is not None and temperature <= 0:  # OpenAI's 0: greedy
        kw.pop("temperature")
        kw["do_sample"] = False
    elif temperature is not None:
        kw.setdefault("do_sample", True)
    if not kw.get("do_sample"):
        for k in ("temperature", "top_p", "top_k", "typical_p"):
            kw.pop(k, None)
    return kw


def batch_key(args: dict[str, Any]) -> str:
    """Requests whose args give the same call can share a batch."""
    return json.dumps(pipeline_args(args), sort_keys=True)


def classify(loaded: Loaded, texts: list[str], args: dict[str, Any]) -> list[Any]:
    kwargs = pipeline_args(args)
    kwargs.setdefault("batch_size", min(len(texts), 64))
    kwargs.update(truncation_args(loaded, kwargs))
    try:
        out = loaded.pipeline(texts, **kwargs)
    except (TypeError, ValueError) as e:
        raise JobError(f"text-classification with args {json.dumps(kwargs)}: {e}") from e
    return [plain(x) for x in out]


def truncation_args(loaded: Loaded, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Long inputs are cut to what the model takes (as training cut them), unless the caller says otherwise:
    `truncation` defaults to true, `max_length` to the model's positions when the tokenizer knows no limit."""
    out: dict[str, Any] = {"truncation": kwargs.get("truncation", True)}
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if "max_length" not in kwargs and isinstance(limit, int) and loaded.tokenizer.model_max_length > limit:
        out["max_length"] = limit
    return out


def plain(value: Any) -> Any:
    """JSON-ready: numpy/torch scalars as floats."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


def prompt_ids(loaded: Loaded, kind: str, prompt: Any) -> list[int]:
    """The token ids of a prompt: a text as the tokenizer encodes it, a conversation through its chat template."""
    tok = loaded.tokenizer
    if kind == "chat":
        if not tok.chat_template:
            raise JobError(
                f"model {loaded.key.name!r} has no chat template: send its prompts as text (kind 'generate'), "
                "or serve a model whose tokenizer has one"
            )
        try:
            ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        except Exception as e:  # jinja raises its own errors (unknown roles, ...)
            raise JobError(f"the chat template of {loaded.key.name!r} refused the messages: {e}") from e
        return list(ids)
    return list(tok(prompt)["input_ids"])


@dataclass
class Generated:
    text: str
    finish_reason: str  # stop | length
    prompt_tokens: int
    completion_tokens: int


def generate(
    loaded: Loaded, prompts: list[list[int]], kwargs: dict[str, Any], on_text: Callable[[str], None] | None = None
) -> list[Generated]:
    import torch

    tok, model = loaded.tokenizer, loaded.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=loaded.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=loaded.device)
    streamer = None
    if on_text is not None:
        from transformers import TextStreamer

        send = on_text

        class Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    send(storable(text))

        streamer = Streamer(tok, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        try:
            out = model.generate(
                input_ids=input_ids, attention_mask=mask, pad_token_id=pad, streamer=streamer, **kwargs
            )
        except (TypeError, ValueError) as e:
            raise JobError(f"generate() with {json.dumps(kwargs)}: {e}") from e
    answers = []
    for prompt, row in zip(prompts, out[:, width:].tolist(), strict=True):
        stop = next((i for i, t in enumerate(row) if t in eos_ids), None)
        n = len(row) if stop is None else stop + 1  # after its stop, a row holds only padding
        answers.append(
            Generated(
                storable(tok.decode(row[:n], skip_special_tokens=True)),
                "length" if stop is None else "stop",
                len(prompt),
                n,
            )
        )
    return answers


def storable(text: str) -> str:
    """Text PostgreSQL can store (no NUL: a model may generate one), NULs as U+FFFD."""
    return text.replace("\x00", "\ufffd")


def usage(answers: list[Generated]) -> dict[str, int]:
    prompt = sum(a.prompt_tokens for a in answers)
    completion = sum(a.completion_tokens for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
