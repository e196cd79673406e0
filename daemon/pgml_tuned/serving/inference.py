"""Answers from a loaded model (blocking, no database: the server runs these in a thread).

- classify: the transformers text-classification pipeline over every input of a batch at once; per input
  `{"label": <id2label name>, "score": <float>}` (with `top_k`, a list of them), the guide's shape.
- generate: prompts (texts, or chat conversations through the tokenizer's chat template) left-padded into one
  `model.generate`; per prompt the text, why it stopped, and real token counts. A streamed request runs alone,
  its text pieces handed to `on_text` as the tokens come.
- embed: SentenceTransformer.encode over every text of a batch at once; per text its vector as a real[] literal
  (nine significant digits, which give the same float32 back, formatted by numpy for all values at once: the
  answer is a JSON array of these strings, which pgml.embed casts to real[] with no JSON number parsed).
- adapters: on a base with LoRA adapters loaded unmerged (cache.py, --lora-serving multi), classify and generate
  take each row's adapter name (cache.BASE for none): one forward pass serves requests for different adapters.
- rank: CrossEncoder.predict over every (query, document) pair of a batch at once; per document its score.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import JobError
from .cache import Loaded, adapters_for_rows


@dataclass(frozen=True)
class Arg:
    type: str  # integer | number | boolean | string | flag (true/false, or a string saying so)
    # pipeline | generate | encode (SentenceTransformer.encode) | lane (the lane's own) | call (pgml.rank's own,
    # applied to the answer in SQL) | ignored (accepted from clients, never passed on)
    use: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None


# The args a request of each kind may carry: the same table as pgml._request_args() (70_requests.sql), which refuses
# anything else at submit; a test keeps the two equal. The serving process checks again (defence in depth): nothing
# outside it (num_workers, device_map, trust_remote_code, model_kwargs, ...) reaches transformers.
_COMMON = {
    "timeout": Arg("number", "lane", 0.1, 3600),
    "load_in_8bit": Arg("flag", "ignored"),
    "load_in_4bit": Arg("flag", "ignored"),
    "cache_model": Arg("flag", "ignored"),
}
_GENERATE = {
    "stream": Arg("boolean", "lane"),
    "max_new_tokens": Arg("integer", "generate", 1, 4096),
    "max_tokens": Arg("integer", "generate", 1, 4096),
    "min_new_tokens": Arg("integer", "generate", 0, 4096),
    "temperature": Arg("number", "generate", 0, 100),
    "top_p": Arg("number", "generate", 0, 1),
    "top_k": Arg("integer", "generate", 0, 1000),
    "typical_p": Arg("number", "generate", 0, 1),
    "repetition_penalty": Arg("number", "generate", 0.01, 100),
    "length_penalty": Arg("number", "generate", -100, 100),
    "no_repeat_ngram_size": Arg("integer", "generate", 0, 64),
    "num_beams": Arg("integer", "generate", 1, 8),
    "do_sample": Arg("boolean", "generate"),
}
ARGS: dict[str, dict[str, Arg]] = {
    "classify": {
        **_COMMON,
        "top_k": Arg("integer", "pipeline", 1, 1000),
        "function_to_apply": Arg("string", "pipeline", choices=("sigmoid", "softmax", "none")),
        "truncation": Arg("boolean", "pipeline"),
        "max_length": Arg("integer", "pipeline", 1, 8192),
        "batch_size": Arg("integer", "pipeline", 1, 64),
    },
    "generate": {**_COMMON, **_GENERATE},
    "chat": {**_COMMON, **_GENERATE},
    "embed": {
        **_COMMON,
        "normalize": Arg("boolean", "encode"),
        "prompt": Arg("string", "encode"),
        "prompt_name": Arg("string", "encode"),
        "truncate_dim": Arg("integer", "encode", 1, 65536),
    },
    "rank": {**_COMMON, "top_k": Arg("integer", "call", 1, 1000), "return_documents": Arg("boolean", "call")},
}
MAX_NEW_TOKENS = 4096


def _fits(arg: Arg, value: Any) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if arg.type == "integer":
        ok = number and float(value).is_integer()
    elif arg.type == "number":
        ok = number
    elif arg.type == "boolean":
        ok = isinstance(value, bool)
    elif arg.type == "string":
        ok = isinstance(value, str) and (arg.choices is None or value in arg.choices)
    else:  # flag
        ok = value is None or isinstance(value, (bool, str))
    if ok and number and arg.min is not None and arg.max is not None:
        ok = arg.min <= value <= arg.max
    return ok


def check_args(kind: str, args: dict[str, Any]) -> None:
    """Raises JobError naming every arg outside the allow-list of `kind`, or the first out of its bounds."""
    allowed = ARGS.get(kind, {})
    unknown = sorted(k for k in args if k not in allowed)
    if unknown:
        raise JobError(
            f"args {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not allowed in a {kind} request; "
            f"allowed: {', '.join(sorted(k for k, a in allowed.items() if a.use != 'ignored'))}"
        )
    for k, v in args.items():
        if not _fits(allowed[k], v):
            raise JobError(f"args.{k} = {json.dumps(v)[:100]} is outside what a {kind} request takes")


def pipeline_args(args: dict[str, Any]) -> dict[str, Any]:
    """What goes to the text-classification pipeline's call: the allowed pipeline args, nothing else."""
    allowed = ARGS["classify"]
    return {k: _plain(allowed[k], v) for k, v in args.items() if k in allowed and allowed[k].use == "pipeline"}


def _plain(arg: Arg, value: Any) -> Any:
    """An integer arg as an int (JSON may say 32.0)."""
    return int(value) if arg.type == "integer" and isinstance(value, float) else value


def generation_kwargs(args: dict[str, Any]) -> dict[str, Any]:
    """generate()'s keyword arguments from a request's args (OpenAI names accepted: max_tokens)."""
    kw: dict[str, Any] = {}
    for k, v in args.items():
        arg = _GENERATE.get(k)
        if arg is not None and arg.use == "generate":  # not the lane's own, nor what is accepted and ignored
            kw["max_new_tokens" if k == "max_tokens" else k] = _plain(arg, v)
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


def batch_key(kind: str, args: dict[str, Any]) -> str:
    """Requests whose args give the same call can share a batch."""
    allowed = ARGS.get(kind, {})
    same = {k: v for k, v in args.items() if k in allowed and allowed[k].use not in ("lane", "ignored", "call")}
    return json.dumps(same, sort_keys=True)


def classify(loaded: Loaded, texts: list[str], args: dict[str, Any], adapters: list[str] | None = None) -> list[Any]:
    kwargs = pipeline_args(args)
    kwargs.setdefault("batch_size", min(len(texts), 64))
    if loaded.peft is not None:  # each row through its own adapter: the texts in one forward pass, in order
        kwargs["batch_size"] = len(texts)
    kwargs.update(truncation_args(loaded, kwargs))
    try:
        with adapters_for_rows(loaded, adapters):
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


def prompt_ids(loaded: Loaded, kind: str, prompt: Any, tokenizer: Any = None) -> list[int]:
    """The token ids of a prompt: a text as the tokenizer encodes it, a conversation through its chat template
    (`tokenizer`: an adapter's own, else the model's)."""
    tok = tokenizer or loaded.tokenizer
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
    loaded: Loaded,
    prompts: list[list[int]],
    kwargs: dict[str, Any],
    on_text: Callable[[str], None] | None = None,
    adapters: list[str] | None = None,
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
    with torch.inference_mode(), adapters_for_rows(loaded, adapters, kwargs.get("num_beams")):
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


def encode_args(args: dict[str, Any]) -> dict[str, Any]:
    """SentenceTransformer.encode's keyword arguments from an embed request's args."""
    allowed = ARGS["embed"]
    kw = {k: _plain(allowed[k], v) for k, v in args.items() if k in allowed and allowed[k].use == "encode"}
    if "normalize" in kw:
        kw["normalize_embeddings"] = kw.pop("normalize")
    return kw


def encode(loaded: Loaded, texts: list[str], args: dict[str, Any], batch_size: int = 64) -> Any:
    """The texts' vectors, a float32 array of one row per text (`batch_size` texts per forward pass; encode sorts
    them by length)."""
    import numpy as np

    kw = encode_args(args)
    dim = loaded.model.get_sentence_embedding_dimension()
    if dim is not None and kw.get("truncate_dim", 0) > dim:
        raise JobError(f"truncate_dim {kw['truncate_dim']} is over the {dim} dimensions of {loaded.key.name!r}")
    try:
        vectors = loaded.model.encode(
            texts, batch_size=min(len(texts), batch_size), convert_to_numpy=True, show_progress_bar=False, **kw
        )
    except (KeyError, ValueError, TypeError) as e:  # an unknown prompt_name, ...
        raise JobError(f"embedding with {loaded.key.name!r} and args {json.dumps(kw)}: {e}") from e
    vectors = np.asarray(vectors, dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise JobError(f"model {loaded.key.name!r} returned a vector that is not finite (NaN or infinity)")
    return vectors


def embed(loaded: Loaded, texts: list[str], args: dict[str, Any], batch_size: int = 64) -> list[str]:
    """One real[] literal per text (what pgml.embed_batch COPYs)."""
    return real_literals(encode(loaded, texts, args, batch_size))


_DIGITS: Any = None  # the three ASCII digits of 0..999 (a numpy table, made on first use)
_WIDTH = 15  # a value: sign, nine digits, "e", the exponent's sign and two digits; then a comma


def real_literals(vectors: Any) -> list[str]:
    """Each row of a 2-D float32 array as a real[] literal, each value with nine significant digits (which give the
    same float32 back) as `+123456789e-10`. numpy writes every value at once: Python's per-value formatting cost as
    much as the model's forward pass on 1,000 short texts."""
    import numpy as np

    global _DIGITS
    if _DIGITS is None:
        _DIGITS = np.array([[ord(c) for c in f"{i:03d}"] for i in range(1000)], dtype=np.uint8)
    v = np.asarray(vectors, dtype=np.float32)
    n, d = v.shape
    if not n or not d:
        return ["{}"] * n
    x = v.astype(np.float64).ravel()
    a = np.abs(x)
    with np.errstate(divide="ignore"):
        e = np.floor(np.log10(a))
    e[a == 0] = 0
    m = np.rint(a * np.power(10.0, 8 - e))  # nine digits: 100000000 <= m < 1000000000 (0 for 0)
    off = (m >= 1e9).astype(np.float64) - ((m < 1e8) & (a > 0))  # log10 rounded across a power of ten
    if off.any():
        e += off
        m = np.rint(a * np.power(10.0, 8 - e))
    digits = m.astype(np.int64)
    exp = e.astype(np.int64) - 8
    out = np.empty((x.size, _WIDTH), dtype=np.uint8)
    out[:, 0] = np.where(np.signbit(x) & (a > 0), ord("-"), ord("+"))
    out[:, 1:4] = _DIGITS[digits // 1_000_000]
    out[:, 4:7] = _DIGITS[(digits // 1000) % 1000]
    out[:, 7:10] = _DIGITS[digits % 1000]
    out[:, 10] = ord("e")
    out[:, 11] = np.where(exp < 0, ord("-"), ord("+"))
    out[:, 12:14] = _DIGITS[np.abs(exp), 1:]
    out[:, 14] = ord(",")
    row = d * _WIDTH
    buf = out.tobytes()
    return ["{" + buf[i * row : (i + 1) * row - 1].decode("ascii") + "}" for i in range(n)]


def rank(loaded: Loaded, pairs: list[tuple[str, str]]) -> list[float]:
    """The cross-encoder's score of each (query, document) pair."""
    scores = loaded.model.predict(pairs, batch_size=min(len(pairs), 64), convert_to_numpy=True, show_progress_bar=False)
    return [float(x) for x in scores.reshape(-1).tolist()]
