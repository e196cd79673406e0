"""training_args that would reach outside the job are refused before training, naming the fix."""

from __future__ import annotations

from typing import Any

import pytest

from pgml_tuned.errors import JobError
from pgml_tuned.recipes.hf import check_outward


@pytest.mark.parametrize(
    ("given", "token", "offline", "allowed", "error"),
    [
        ({"deepspeed": "/etc/ds_config.json"}, False, False, set(), "deepspeed names a file"),
        ({"fsdp_config": "../fsdp.json"}, False, False, set(), "fsdp_config names a file"),
        ({"accelerator_config": "/root/acc.json"}, False, False, set(), "inline, as a JSON object"),
        ({"resume_from_checkpoint": "/data/other-job"}, False, False, set(), "stored checkpoints by itself"),
        ({"report_to": "wandb"}, False, False, set(), "report_to 'wandb'"),
        ({"report_to": ["none", "mlflow"]}, False, False, set(), "report_to 'mlflow'"),
        ({"report_to": "all"}, False, False, set(), "report_to 'all'"),
        ({"push_to_hub": True}, False, False, set(), "needs the job's own Hugging Face token"),
        ({"push_to_hub": True, "hub_model_id": "me/model"}, False, False, set(), "own Hugging Face token"),
        # allowed
        ({"deepspeed": {"zero_optimization": {"stage": 2}}, "fsdp_config": {}}, False, False, set(), None),
        ({"report_to": "none"}, False, False, set(), None),
        ({"report_to": ["wandb"]}, False, False, {"wandb"}, None),
        ({"push_to_hub": True}, True, False, set(), None),
        ({"push_to_hub": True}, False, True, set(), None),  # offline: ignored with a warning later
        ({"num_train_epochs": 1, "learning_rate": 2e-5}, False, False, set(), None),
    ],
)
def test_check_outward(given: dict[str, Any], token: bool, offline: bool, allowed: set[str], error: str | None) -> None:
    if error is None:
        check_outward(given, job_token=token, offline=offline, allowed_reporters=frozenset(allowed))
    else:
        with pytest.raises(JobError, match=error):
            check_outward(given, job_token=token, offline=offline, allowed_reporters=frozenset(allowed))
