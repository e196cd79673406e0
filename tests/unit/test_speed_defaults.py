"""The speed defaults a job gets on a GPU (recipes/hf.py): only for what its training_args do not set."""

from __future__ import annotations

import os

import pytest

from pgml_tuned.recipes.hf import Gpu, spare_loader_workers, speed_defaults

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


def test_loader_processes_where_the_host_has_cores_to_spare() -> None:
    gpu = Gpu(bf16=True, tf32=True, loader_workers=2)
    chosen = speed_defaults(GUIDE, gpu)
    assert chosen["dataloader_num_workers"] == 2 and chosen["dataloader_persistent_workers"] is True
    assert "dataloader_num_workers" not in speed_defaults({**GUIDE, "dataloader_num_workers": 0}, gpu)
    given = {**GUIDE, "dataloader_persistent_workers": False}
    assert speed_defaults(given, gpu)["dataloader_num_workers"] == 2
    assert "dataloader_persistent_workers" not in speed_defaults(given, gpu)


def test_loader_workers_leave_every_rank_on_the_host_a_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert spare_loader_workers() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert spare_loader_workers() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert spare_loader_workers() == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert spare_loader_workers() == 1
