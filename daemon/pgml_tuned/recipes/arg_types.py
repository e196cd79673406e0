"""The JSON types each transformers.TrainingArguments field accepts, from its annotation.

Two users: scripts/training_arg_types.py writes them into pgml.training_arg_types (pgml.tune() checks at submit),
and the worker checks a job's training_args with them before it reads any data (a job queued by a schema older
than that table, or a transformers whose fields differ from the one the table was made from).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any

from ..errors import JobError

KINDS = ("integer", "number", "boolean", "string", "object", "array", "null")
DESCRIBED = {
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "string": "a string",
    "object": "a JSON object",
    "array": "a JSON array",
    "null": "null",
}


def json_kinds(annotation: object) -> list[str] | None:
    """The JSON kinds a value of `annotation` may have: integer (a whole number), number, boolean, string,
    object, array, null (in that order). None when one of its parts has no JSON form."""
    origin = typing.get_origin(annotation)
    kinds: list[str] = []
    if origin in (typing.Union, types.UnionType):
        for part in typing.get_args(annotation):
            sub = json_kinds(part)
            if sub is None:
                return None
            kinds += sub
    elif origin is typing.Literal:
        kinds = ["boolean" if isinstance(v, bool) else "string" for v in typing.get_args(annotation)]
    elif annotation is type(None):
        kinds = ["null"]
    else:
        base = origin or annotation
        simple = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object", list: "array"}
        if base in simple:
            kinds = [simple[base]]
        elif isinstance(base, type) and issubclass(base, enum.Enum):
            kinds = ["string"]
        else:
            return None
    return sorted(set(kinds), key=KINDS.index)


def python_name(annotation: object) -> str:
    """The annotation as a user reads it: `float`, `int | None`, `dict | str | None`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(python_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    base = origin or annotation
    return getattr(base, "__name__", str(base))


EXAMPLES = {"integer": 8, "number": 0.5, "boolean": True, "string": "...", "object": {}, "array": []}


def example(field: dataclasses.Field[Any], kinds: list[str]) -> Any:
    """A value to show in an error's HINT: the field's default when it is one of its JSON kinds (not null),
    else one of the first kind."""
    default = field.default
    if isinstance(default, enum.Enum):
        default = default.value
    if default is not None and default is not dataclasses.MISSING and kind_of(default) in kinds:
        return default
    if isinstance(default, int | float) and not isinstance(default, bool) and "number" in kinds:
        return default
    return EXAMPLES.get(kinds[0])


# The values transformers accepts for the numeric TrainingArguments fields, which their types do not say: key →
# (lowest, lowest allowed itself, highest, highest allowed itself, other values allowed). Rows of
# pgml.training_arg_types (min_value, min_inclusive, max_value, max_inclusive, also_allowed): pgml.tune() refuses
# `"learning_rate": -1` at submit, naming the range, instead of the job failing (or training nothing) later.
Range = tuple[float | None, bool, float | None, bool, tuple[float, ...]]
RANGES: dict[str, Range] = {
    "learning_rate": (0, False, None, False, ()),
    "num_train_epochs": (0, False, None, False, ()),
    "max_steps": (0, False, None, False, (-1,)),  # -1: num_train_epochs decides
    "per_device_train_batch_size": (1, True, None, False, ()),
    "per_device_eval_batch_size": (1, True, None, False, ()),
    "gradient_accumulation_steps": (1, True, None, False, ()),
    "eval_accumulation_steps": (1, True, None, False, ()),
    "warmup_ratio": (0, True, 1, False, ()),
    "warmup_steps": (0, True, None, False, ()),  # below 1: a fraction of the training steps
    "weight_decay": (0, True, None, False, ()),
    "max_grad_norm": (0, True, None, False, ()),
    "adam_beta1": (0, True, 1, False, ()),
    "adam_beta2": (0, True, 1, False, ()),
    "adam_epsilon": (0, True, None, False, ()),
    "label_smoothing_factor": (0, True, 1, False, ()),
    "logging_steps": (0, False, None, False, ()),  # below 1: a fraction of the training steps
    "eval_steps": (0, False, None, False, ()),
    "save_steps": (0, False, None, False, ()),
    "eval_delay": (0, True, None, False, ()),
    "seed": (0, True, None, False, ()),
    "data_seed": (0, True, None, False, ()),
    "dataloader_num_workers": (0, True, None, False, ()),
    "torch_empty_cache_steps": (1, True, None, False, ()),
}


@functools.cache
def training_arg_types() -> dict[str, tuple[list[str], str, Any]]:
    """key → (JSON kinds, annotation, an example value) for every TrainingArguments field whose type JSON can
    express."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    out = {}
    for field in dataclasses.fields(TrainingArguments):
        kinds = json_kinds(hints[field.name]) if field.init else None
        if kinds:
            out[field.name] = (kinds, python_name(hints[field.name]), example(field, kinds))
    return out


def kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object" if isinstance(value, dict) else "array"


def check_training_arg_types(given: dict[str, Any], secret_keys: frozenset[str] = frozenset()) -> None:
    """A JobError naming the first key of `given` (training_args) whose value is not of the type transformers
    declares, and that type — as pgml.tune() says it at submit."""
    known = training_arg_types()
    for key in sorted(given):
        if key not in known:
            continue
        kinds, python, _ = known[key]
        kind = kind_of(given[key])
        if kind in kinds or (kind == "integer" and "number" in kinds):
            continue
        if key in secret_keys:  # never a token's value, even a mistyped one
            shown = "a JSON " + ("number" if kind == "integer" else kind)
        else:
            shown = f"the string {given[key]!r}" if kind == "string" else repr(given[key])
        raise JobError(
            f"training_args.{key} must be {' or '.join(DESCRIBED[k] for k in kinds)}, not {shown} "
            f"(transformers.TrainingArguments declares {key}: {python})"
        )
