"""The speed defaults a job gets on a GPU (recipes/hf.py): only for what its training_args do not set."""

from __future__ import annotations

from pgml_tuned.recipes.hf import Gpu, speed_defaults

GUIDE = {"learning_rate": 2e-5, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 16}


def test_the_guides_settings_get_bf16_tf32_and_fused_adamw_on_an_ampere_gpu() -> None:
    chosen = speed_defaults(GUIDE, Gpu(bf16=True, tf32=True))
    assert chosen == {"bf16": True, "tf32": True, "optim": "adamw_torch_fused"}


def test_what_the_user_set_is_never_overridden() -> None:
    given = {"fp16": True, "tf32": False, "optim": "adamw_bnb_8bit", "per_device_eval_batch_size": 4}
    assert speed_defaults(given, Gpu(bf16=True, tf32=True)) == {}


def test_older_gpus_cpus_and_float16_weights() -> None:
    assert speed_defaults({}, Gpu()) == {"optim": "adamw_torch_fused", "per_device_eval_batch_size": 16}
    assert speed_defaults({"per_device_train_batch_size": 4}, None) == {}
    chosen = speed_defaults({}, Gpu(bf16=True, tf32=True), weights_dtype="float16")
    assert "bf16" not in chosen and chosen["tf32"] is True
