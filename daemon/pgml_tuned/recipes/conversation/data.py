"""Conversation recipe, step 4: rows → chat messages → token ids with labels; packing; the collator.

Plain functions with no JobContext: tests and benchmarks drive them directly.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ...errors import JobError
from .options import Options

IGNORE = -100  # label of a token the loss skips
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


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
            enc: Any = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            if any(enc["assistant_masks"]):
                return list(enc["input_ids"]), list(enc["assistant_masks"])
        # no {% generation %} markers: the prompt is what the template renders up to the generation prompt
        prompt = str(tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True))
        full = str(tokenizer.apply_chat_template(messages, tokenize=False))
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
