"""What the Python client (pgml_tuned.client) sends and answers, without a connection: the arguments of a chat
request from PostgresML's call signature, and the OpenAI-shaped completions and chunks made from the serving
lane's answers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InvalidInputError, JobFailedError, NotFoundError, PgmlError, TimedOutError

__all__ = [
    "RequestError",
    "answer",
    "chat_args",
    "chunk",
    "completion",
    "fingerprint",
    "messages_of",
    "rest_of",
    "split_model",
    "timed_out",
]


RequestError = PgmlError  # the name of earlier versions: the serving side failed the request, or nobody served it


def split_model(model: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """PostgresML takes the model as a name or as {"model": name, <options>}: the options become args."""
    if isinstance(model, str):
        return model, {}
    if not isinstance(model, Mapping) or not isinstance(model.get("model"), str):
        raise InvalidInputError(
            "model must be a name or a dict with a model name", 'e.g. "pgml:my_project" or {"model": "pgml:my_project"}'
        )
    options = {k: v for k, v in model.items() if k != "model"}
    return model["model"], options


def chat_args(
    options: dict[str, Any], max_tokens: int | None, temperature: float | None, n: int | None, chat_template: str | None
) -> dict[str, Any]:
    args = dict(options)
    for key in ("load_in_8bit", "load_in_4bit"):  # the guide passes "true" as a string
        if isinstance(args.get(key), str):
            args[key] = args[key].strip().lower() in ("1", "true", "yes")
    if max_tokens is not None:
        args["max_tokens"] = max_tokens
    if temperature is not None:
        args["temperature"] = temperature
    if n not in (None, 1):
        raise InvalidInputError("n > 1 is not supported", "ask once per completion")
    if chat_template is not None:
        args["chat_template"] = chat_template
    return args


def messages_of(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidInputError(
            "messages must be a non-empty list of dicts",
            'e.g. [{"role": "user", "content": "Hello"}]',
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidInputError(
                f"message {i} must be a dict with string role and content, got {m!r}"[:300],
                '{"role": "system" | "user" | "assistant", "content": "..."}',
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def fingerprint(model: str, result: Mapping[str, Any]) -> str:
    """Which model answered: the stored model id or hub revision the serving side reports, else the name."""
    source = result.get("fingerprint") or result.get("model_id") or model
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"pgml-tuned:{source}"))


def completion(model: str, result: Mapping[str, Any], usage: Mapping[str, Any] | None) -> dict[str, Any]:
    content = result.get("content")
    if content is None and isinstance(result.get("choices"), list):
        return dict(result)  # already in the OpenAI shape
    usage = dict(usage or result.get("usage") or {})
    prompt, completed = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    return {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content or ""},
                "finish_reason": result.get("finish_reason", "stop"),
            }
        ],
        "created": int(time.time()),
        "id": str(uuid.uuid4()),
        "model": model,
        "object": "chat.completion",
        "system_fingerprint": fingerprint(model, result),
        "usage": {"prompt_tokens": prompt, "completion_tokens": completed, "total_tokens": prompt + completed},
    }


def chunk(model: str, ident: str, created: int, fingerprint: str, text: str, finish: str | None) -> dict[str, Any]:
    delta: dict[str, Any] = {"content": text} if finish is None else {}
    return {
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        "created": created,
        "id": ident,
        "model": model,
        "object": "chat.completion.chunk",
        "system_fingerprint": fingerprint,
    }


def rest_of(result: Any, streamed: str) -> str:
    """What the answer holds beyond the pieces already yielded (pieces written just before the answer go with
    the request when the answer is taken)."""
    content = result.get("content") if isinstance(result, dict) else None
    if isinstance(content, str) and content.startswith(streamed):
        return content[len(streamed) :]
    return ""


def answer(row: Mapping[str, Any] | None, request_id: int) -> tuple[Any, Any]:
    if row is None:
        raise NotFoundError(
            f"request {request_id} is gone (it expired, or its serving process failed it twice)",
            "try again; pgml-tuned status shows the serving workers",
        )
    if row["status"] == "failed":
        raise JobFailedError(row["error"] or f"request {request_id} failed")
    return row["result"], row["usage"]


def timed_out(status: str, timeout: float) -> TimedOutError:
    """The error of a request nobody answered within `timeout` seconds (`status`: where it was then)."""
    if status == "queued":
        return TimedOutError(
            f"no pgml-tuned worker is serving: nobody took the request within {timeout:g} s",
            "start one (pgml-tuned serve; pgml-tuned status lists the workers), or pass a longer timeout",
        )
    return TimedOutError(
        f"the request timed out after {timeout:g} s while a worker was answering it",
        'pass a longer timeout: OpenSourceAI(url, timeout=...) or {"model": ..., "timeout": ...}',
    )
