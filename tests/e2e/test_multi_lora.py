"""Many LoRA adapters on one base model (--lora-serving multi, the default): the serving process keeps one copy of
the base, loads each adapter onto it unmerged from pgml.files on first use, and answers requests for different
adapters (and for the base) in one forward pass. Every answer is compared with the adapter merged on its own, in
this process, greedy."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
import torch
from psycopg.types.json import Jsonb

from pgml_tuned import hub_cache
from tests.conftest import OTHER_USER, USER, wait_for, wait_serving
from tests.e2e.test_fleet import metrics_port, scrape
from tests.e2e.test_serving import (
    CHAT,
    TEXTS,
    answer,
    build_classifier,
    in_process_chat,
    in_process_classify,
    same_answers,
    store_model,
)
from tests.support import models as testing

pytestmark = pytest.mark.slow

LLAMA, CLASSIFIER = "tiny/mlora-llama", "tiny/mlora-classifier"
ARGS = {"max_tokens": 8, "temperature": 0, "repetition_penalty": 1.0}


def random_lora(model: Any, seed: int) -> None:
    """Non-zero B (a fresh adapter changes nothing), different for each seed; a classifier's head of its own
    (modules_to_save: a copy of the base's head, otherwise the same for every adapter) different too."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.normal_(0, 0.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, session_env: Path) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("multi-lora")
    out = {"llama": testing.build_tiny_llama(root / "llama")}
    base = testing.build_tiny_classifier_base(root / "bert")
    out["classifier"] = build_classifier(base, root / "classifier", 1)
    hub_cache.add(out["llama"], LLAMA, session_env / "hf")
    hub_cache.add(out["classifier"], CLASSIFIER, session_env / "hf")
    for i in range(4):
        lm = get_peft_model(
            AutoModelForCausalLM.from_pretrained(out["llama"]),
            LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]),
        )
        random_lora(lm, 10 + i)
        lm.save_pretrained(str(root / f"llama-lora-{i}"))
        out[f"llama_lora{i}"] = root / f"llama-lora-{i}"
    for i in range(2):
        clf = get_peft_model(
            AutoModelForSequenceClassification.from_pretrained(out["classifier"]),
            LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
        )
        random_lora(clf, 20 + i)
        clf.save_pretrained(str(root / f"classifier-lora-{i}"))
        out[f"classifier_lora{i}"] = root / f"classifier-lora-{i}"
    return out


def submit_all(ops: psycopg.Connection[dict[str, Any]], asks: list[tuple[str, str, str, Any, Any]]) -> list[int]:
    """(who, kind, model, inputs, args) submitted in one transaction: the serving process claims them together."""
    with ops.transaction():
        return [
            ops.execute(
                "SELECT pgml._request_submit(%s, %s, %s, %s, %s) AS id",
                (who, kind, model, Jsonb(args), Jsonb(inputs)),
            ).fetchone()["id"]  # type: ignore[index]
            for who, kind, model, inputs, args in asks
        ]


def loads(port: int, kind: str) -> float:
    return scrape(port).get(("pgml_serving_loads_total", (("kind", kind),)), 0.0)


def test_mixed_adapters_answer_as_merged_across_users_with_eviction(
    daemon: Any, ops: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]], tiny: dict[str, Path]
) -> None:
    d = daemon("--adapter-cache-count", "2", "--metrics-port", "0")
    port = metrics_port(d)
    wait_serving(su)
    ids = [store_model(su, USER, f"chat{i}", "conversation", tiny[f"llama_lora{i}"], base=LLAMA) for i in range(3)]
    other = store_model(su, OTHER_USER, "theirs", "conversation", tiny["llama_lora3"], base=LLAMA)
    want = {LLAMA: in_process_chat(tiny["llama"], None, CHAT, 8)[1]}
    for i, model_id in enumerate([*ids, other]):
        want[f"pgml:model:{model_id}"] = in_process_chat(tiny["llama"], tiny[f"llama_lora{i}"], CHAT, 8)[1]
    assert len(set(want.values())) == 5, want  # every adapter changes the answer

    # another user's adapter is refused (at the submit already) before anything is loaded
    with pytest.raises(psycopg.errors.UndefinedObject, match=f"no such model that {USER} may use"):
        submit_all(ops, [(USER, "chat", f"pgml:model:{other}", CHAT, ARGS)])
    assert loads(port, "adapter") == 0 and f'"model": "pgml:model:{other}"' not in d.output()

    # two users' adapters and the base, round-robin, claimed together: 4 adapters through an LRU of 2
    order = [*[(USER, f"pgml:model:{i}") for i in ids], (OTHER_USER, f"pgml:model:{other}"), (USER, LLAMA)] * 2
    for _ in range(2):
        got = [answer(ops, r) for r in submit_all(ops, [(who, "chat", m, CHAT, ARGS) for who, m in order])]
        for (_, model), g in zip(order, got, strict=True):
            assert g["status"] == "done", g["error"]
            assert g["result"]["content"] == want[model], model
    # a streamed request on an adapter: the same answer
    streamed = answer(ops, submit_all(ops, [(USER, "chat", f"pgml:model:{ids[1]}", CHAT, {**ARGS, "stream": True})])[0])
    assert streamed["result"]["content"] == want[f"pgml:model:{ids[1]}"]

    samples = scrape(port)
    assert samples[("pgml_serving_models_loaded", (("kind", "base"),))] == 1  # one copy of the base
    assert samples[("pgml_serving_models_loaded", (("kind", "adapter"),))] == 2
    assert samples[("pgml_serving_loads_total", (("kind", "adapter"),))] >= 4
    assert samples[("pgml_serving_evictions_total", (("kind", "adapter"),))] >= 2
    assert samples[("pgml_serving_load_seconds_count", (("kind", "adapter"),))] >= 4
    assert samples[("pgml_serving_last_eviction_timestamp_seconds", (("kind", "adapter"),))] > 0
    # the fleet registry: the base and the two adapters loaded now
    cached = wait_for(
        lambda: (
            (r := su.execute("SELECT models_cached FROM pgml.worker_status WHERE state = 'live'").fetchone())
            and len(r["models_cached"]) == 3
            and r["models_cached"]
        ),
        30,
        what="the registry to list the base and two adapters",
    )
    assert cached[0] == LLAMA and all(m.startswith("pgml:model:") for m in cached[1:])
    # and what /metrics counts: the same loads, evictions and their times (once the heartbeat has written them)
    samples = scrape(port)
    count = {k: samples[(f"pgml_serving_{k}_total", (("kind", "adapter"),))] for k in ("loads", "evictions")}
    serving = wait_for(
        lambda: (
            (r := su.execute("SELECT serving FROM pgml.worker_status WHERE state = 'live'").fetchone())
            and r["serving"].get("loads", {}).get("adapter") == count["loads"]
            and r["serving"]
        ),
        30,
        what="the registry to count the serving process's loads",
    )
    assert serving["bases"] == 1 and serving["adapters"] == 2 and serving["adapter_mb"] > 0, serving
    assert serving["loads"] == {"base": 1, "adapter": count["loads"]} and count["loads"] >= 4, serving
    assert serving["evictions"] == {"base": 0, "adapter": count["evictions"]} and count["evictions"] >= 2, serving
    adapter_seconds = samples[("pgml_serving_load_seconds_sum", (("kind", "adapter"),))]
    assert serving["load_seconds"]["adapter"] == pytest.approx(adapter_seconds, abs=0.01) and adapter_seconds > 0
    assert serving["last_eviction_at"]["base"] is None and serving["last_load_at"]["base"] is not None
    evicted_at = dt.datetime.fromisoformat(serving["last_eviction_at"]["adapter"]).timestamp()
    assert evicted_at == pytest.approx(
        samples[("pgml_serving_last_eviction_timestamp_seconds", (("kind", "adapter"),))], abs=0.01
    )
    assert dt.datetime.fromisoformat(serving["last_load_at"]["adapter"]).timestamp() >= evicted_at
    lines = [json.loads(x) for x in d.output().splitlines() if '"serving.adapter_loaded"' in x]
    assert all(line["base"] == LLAMA for line in lines) and any(line["evicted_adapters"] for line in lines)


def test_mixed_classification_and_no_stale_adapter(
    daemon: Any, ops: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]], tiny: dict[str, Path]
) -> None:
    d = daemon()
    wait_serving(su)
    first = store_model(su, USER, "sent", "text-classification", tiny["classifier_lora0"], base=CLASSIFIER)
    second = store_model(su, USER, "sent", "text-classification", tiny["classifier_lora1"], base=CLASSIFIER)
    want = {
        CLASSIFIER: in_process_classify(tiny["classifier"]),
        first: in_process_classify(tiny["classifier"], tiny["classifier_lora0"]),
        second: in_process_classify(tiny["classifier"], tiny["classifier_lora1"]),
    }
    models = [CLASSIFIER, f"pgml:model:{first}", f"pgml:model:{second}"]
    got = [answer(ops, r) for r in submit_all(ops, [(USER, "classify", m, TEXTS, {}) for m in models])]
    for key, g in zip([CLASSIFIER, first, second], got, strict=True):
        assert g["status"] == "done", g["error"]
        same_answers(g["result"], want[key])
    # one copy of the base, both adapters loaded onto it
    loads = [json.loads(x) for x in d.output().splitlines() if '"serving.model_loaded"' in x]
    assert [x["model"] for x in loads] == [CLASSIFIER], loads
    onto = [json.loads(x) for x in d.output().splitlines() if '"serving.adapter_loaded"' in x]
    assert sorted(x["model"] for x in onto) == [f"pgml:model:{first}", f"pgml:model:{second}"]
    # pgml:sent is its latest model while none is deployed; deploying the first (warm) serves it at once
    same_answers(answer(ops, submit_all(ops, [(USER, "classify", "pgml:sent", TEXTS, {})])[0])["result"], want[second])
    su.execute(
        "INSERT INTO pgml.deployments (project_id, model_id) SELECT project_id, id FROM pgml.models WHERE id = %s",
        (first,),
    )
    same_answers(answer(ops, submit_all(ops, [(USER, "classify", "pgml:sent", TEXTS, {})])[0])["result"], want[first])
    # deleted while warm, with a request for it already queued (committed together): refused, not served stale
    with su.transaction():
        (queued,) = submit_all(su, [(USER, "classify", f"pgml:model:{first}", TEXTS, {})])
        su.execute("DELETE FROM pgml.deployments WHERE model_id = %s", (first,))
        su.execute("DELETE FROM pgml.models WHERE id = %s", (first,))
    gone = answer(ops, queued)
    assert gone["status"] == "failed" and "no such model" in gone["error"], gone
    same_answers(answer(ops, submit_all(ops, [(USER, "classify", "pgml:sent", TEXTS, {})])[0])["result"], want[second])
