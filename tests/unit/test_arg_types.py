"""training_args values against the types transformers.TrainingArguments declares (the worker's check; the
same table, generated, is pgml.tune()'s at submit)."""

from __future__ import annotations

import typing
from typing import Any

import pytest

from pgml_tuned.errors import JobError
from pgml_tuned.recipes.arg_types import check_training_arg_types, json_kinds, python_name


def test_kinds_of_annotations() -> None:
    assert json_kinds(float) == ["number"] and json_kinds(int | None) == ["integer", "null"]
    assert json_kinds(dict[str, Any] | str | None) == ["string", "object", "null"]
    assert json_kinds(typing.Union[str, None, typing.Literal[False]]) == ["boolean", "string", "null"]  # noqa: UP007
    assert json_kinds(list[str]) == ["array"] and json_kinds(object) is None
    assert python_name(dict | str | None) == "dict | str | None"


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"num_train_epochs": "one"}, "training_args.num_train_epochs must be a number, not the string 'one' "
                                      "(transformers.TrainingArguments declares num_train_epochs: float)"),
        ({"per_device_train_batch_size": 2.5}, "per_device_train_batch_size must be a whole number, not 2.5"),
        ({"fp16": "yes"}, "training_args.fp16 must be true or false, not the string 'yes'"),
        ({"eval_steps": [1]}, "training_args.eval_steps must be a number or null, not [1]"),
        ({"hub_token": 123}, "training_args.hub_token must be a string or null, not a JSON number"),
    ],
)  # fmt: skip
def test_a_wrong_type_names_the_key_and_the_type(given: dict[str, Any], message: str) -> None:
    with pytest.raises(JobError) as e:
        check_training_arg_types(given, frozenset({"hub_token"}))
    assert message in str(e.value), str(e.value)


def test_the_right_types_pass() -> None:
    check_training_arg_types(
        {"num_train_epochs": 3, "learning_rate": 2e-5, "per_device_train_batch_size": 8.0, "fp16": False,
         "eval_steps": None, "lr_scheduler_type": "linear", "report_to": ["none"], "not_a_field": object()}
    )  # fmt: skip


def test_hints_show_the_default_as_an_example() -> None:
    from pgml_tuned.recipes.arg_types import training_arg_types

    known = training_arg_types()
    assert known["num_train_epochs"][2] == 3.0 and known["lr_scheduler_type"][2] == "linear"
    assert known["fp16"][2] is False and known["eval_steps"][2] == 0.5  # default None: an example of its kind
