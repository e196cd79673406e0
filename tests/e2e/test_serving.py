"""The inference lane as its callers meet it: requests submitted with pgml._request_submit (as an administrator
vouching for a user, as the pgml.transform loopback does), answers polled with pgml._request_answer, a real daemon
and its serving process, tiny models stored in pgml.files or in the offline hub cache. The answers are compared
with the same transformers code run in this process on the same files."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
import torch
from psycopg.types.json import Jsonb

from pgml_tuned import hub_cache
from tests.conftest import USER, as_login, connect, wait_for, wait_job, wait_serving
from tests.support import models as testing
from tests.support.stored import add_model

pytestmark = pytest.mark.slow

LABELS = {0: "negative", 1: "positive"}
TEXTS = ["The film is wonderful.", "Dull and predictable; I want my money back.", "An okay heist movie."]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sentiment of: shares rose."}]


# ---- tiny models, built once ----
def build_classifier(base: Path, dest: Path, seed: int) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}
    )
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(base).save_pretrained(dest)
    return dest


def randomize_lora(model: Any) -> None:
    """A fresh LoRA adapter changes nothing (B = 0): give it weights so that serving it on its base shows."""
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, session_env: Path) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("serving-models")
    base = testing.build_tiny_classifier_base(root / "bert")
    out = {
        "classifier": build_classifier(base, root / "classifier", 1),
        "classifier2": build_classifier(base, root / "classifier2", 2),
        "llama": testing.build_tiny_llama(root / "llama"),
    }
    hub_cache.add(out["classifier"], "tiny/classifier", session_env / "hf")
    hub_cache.add(out["llama"], "tiny/llama", session_env / "hf")

    clf = AutoModelForSequenceClassification.from_pretrained(out["classifier"])
    peft_clf = get_peft_model(
        clf, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    )
    randomize_lora(peft_clf)
    peft_clf.save_pretrained(root / "classifier-lora")
    AutoTokenizer.from_pretrained(out["classifier"]).save_pretrained(root / "classifier-lora")
    out["classifier_lora"] = root / "classifier-lora"

    lm = AutoModelForCausalLM.from_pretrained(out["llama"])
    peft_lm = get_peft_model(lm, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora(peft_lm)
    peft_lm.save_pretrained(root / "llama-lora")
    AutoTokenizer.from_pretrained(out["llama"]).save_pretrained(root / "llama-lora")
    out["llama_lora"] = root / "llama-lora"
    return out


def store_model(
    su: psycopg.Connection[dict[str, Any]], owner: str, project: str, task: str, path: Path, base: str | None = None
) -> int:
    return add_model(su, owner, project, task, base=base, path=path)


# ---- asking ----
def submit(
    ops: psycopg.Connection[dict[str, Any]], kind: str, model: str, inputs: Any, args: Any = None, who: str = USER
) -> int:
    row = ops.execute(
        "SELECT pgml._request_submit(%s, %s, %s, %s, %s) AS id",
        (who, kind, model, Jsonb(args or {}), None if inputs is None else Jsonb(inputs)),
    ).fetchone()
    assert row is not None
    return int(row["id"])


def answer(ops: psycopg.Connection[dict[str, Any]], request_id: int, timeout: float = 90) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        row = ops.execute("SELECT * FROM pgml._request_answer(%s)", (request_id,)).fetchone()
        assert row is not None, f"request {request_id} is gone"
        return row if row["status"] in ("done", "failed") else None

    return wait_for(finished, timeout, interval=0.005, what=f"the answer to request {request_id}")


def ask(ops: psycopg.Connection[dict[str, Any]], kind: str, model: str, inputs: Any, args: Any = None) -> Any:
    got = answer(ops, submit(ops, kind, model, inputs, args))
    assert got["status"] == "done", got["error"]
    return got


def in_process_classify(path: Path, adapter: Path | None = None) -> list[dict[str, Any]]:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    model = AutoModelForSequenceClassification.from_pretrained(path)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    pipe = pipeline("text-classification", model=model.eval(), tokenizer=AutoTokenizer.from_pretrained(path))
    return list(pipe(TEXTS))


def same_answers(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert all(abs(g["score"] - w["score"]) < 1e-4 for g, w in zip(got, want, strict=True)), (got, want)


@pytest.fixture
def serving(daemon: Any, su: psycopg.Connection[dict[str, Any]]) -> Any:
    d = daemon()
    wait_serving(su)
    return d


# ---- tests ----
def test_classification_equals_the_in_process_pipeline(
    serving: Any, ops: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]], tiny: dict[str, Path]
) -> None:
    full = store_model(su, USER, "reviews", "text-classification", tiny["classifier"])
    lora = store_model(su, USER, "reviews_lora", "text-classification", tiny["classifier_lora"], base="tiny/classifier")
    want_full = in_process_classify(tiny["classifier"])
    want_lora = in_process_classify(tiny["classifier"], tiny["classifier_lora"])
    assert [w["score"] for w in want_full] != [w["score"] for w in want_lora]  # the adapter matters
    for model in (f"pgml:model:{full}", "pgml:reviews", "reviews", "tiny/classifier"):
        got = ask(ops, "classify", model, TEXTS)["result"]
        assert set(got[0]) == {"label", "score"} and got[0]["label"] in LABELS.values()
        same_answers(got, want_full)
    same_answers(ask(ops, "classify", f"pgml:model:{lora}", TEXTS)["result"], want_lora)
    # args reach the pipeline: top_k gives every label
    top = ask(ops, "classify", "pgml:reviews", TEXTS[:1], {"top_k": 2})["result"]
    assert sorted(x["label"] for x in top[0]) == ["negative", "positive"]
    # the fleet registry shows what the worker keeps warm (from the next heartbeat on)
    cached = wait_for(
        lambda: (
            (r := su.execute("SELECT models_cached FROM pgml.worker_status WHERE state = 'live'").fetchone())
            and f"pgml:model:{lora}" in r["models_cached"]
            and r["models_cached"]
        ),
        30,
        what="the registry to list the cached models",
    )
    assert f"pgml:model:{full}" in cached and "tiny/classifier" in cached


def test_deployment_switch_is_served_at_once(
    serving: Any, ops: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]], tiny: dict[str, Path]
) -> None:
    first = store_model(su, USER, "switch", "text-classification", tiny["classifier"])
    second = store_model(su, USER, "switch", "text-classification", tiny["classifier2"])
    want1, want2 = in_process_classify(tiny["classifier"]), in_process_classify(tiny["classifier2"])
    same_answers(ask(ops, "classify", "pgml:switch", TEXTS)["result"], want2)  # no deployment: the latest
    su.execute(
        "INSERT INTO pgml.deployments (project_id, model_id) SELECT project_id, id FROM pgml.models WHERE id = %s",
        (first,),
    )
    same_answers(ask(ops, "classify", "pgml:switch", TEXTS)["result"], want1)
    su.execute(
        "INSERT INTO pgml.deployments (project_id, model_id) SELECT project_id, id FROM pgml.models WHERE id = %s",
        (second,),
    )
    same_answers(ask(ops, "classify", "switch", TEXTS)["result"], want2)


def in_process_chat(path: Path, adapter: Path | None, messages: Any, max_new_tokens: int) -> tuple[list[int], str, int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    with torch.inference_mode():
        out = model.eval().generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, len(ids) :].tolist()
    n = next((i + 1 for i, t in enumerate(new) if t == tok.eos_token_id), len(new))
    return ids, tok.decode(new[:n], skip_special_tokens=True), n


def test_chat_usage_streaming_and_adapters(
    serving: Any, ops: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]], tiny: dict[str, Path]
) -> None:
    lora = store_model(su, USER, "chat", "conversation", tiny["llama_lora"], base="tiny/llama")
    for model, adapter in (("tiny/llama", None), (f"pgml:model:{lora}", tiny["llama_lora"])):
        ids, text, n = in_process_chat(tiny["llama"], adapter, CHAT, 12)
        got = ask(ops, "chat", model, CHAT, {"max_tokens": 12, "temperature": 0, "repetition_penalty": 1.0})
        assert got["result"]["content"] == text and got["result"]["role"] == "assistant"
        assert got["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
    # generate: prompts as text, one answer each, usage summed
    prompts = ["Shares rose", "The film"]
    got = ask(ops, "generate", "tiny/llama", prompts, {"max_new_tokens": 5, "min_new_tokens": 5})
    assert len(got["result"]) == 2 and got["usage"]["completion_tokens"] == 10
    assert got["usage"]["prompt_tokens"] == sum(len(testing_tokenizer(tiny)(p)["input_ids"]) for p in prompts)
    # streaming: chunks are readable while the request runs, and add up to the answer
    rid = submit(ops, "chat", "tiny/llama", CHAT, {"stream": True, "max_tokens": 200, "min_new_tokens": 200})
    seen_running, pieces, last = False, [], -1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = ops.execute("SELECT status FROM pgml._request_answer(%s)", (rid,)).fetchone()
        assert status is not None
        chunks = ops.execute("SELECT seq, text FROM pgml._request_chunks(%s, %s)", (rid, last)).fetchall()
        # (an answered request is consumed by _request_answer: its chunks go with it)
        if status["status"] in ("done", "failed"):
            break
        if chunks:
            seen_running = True
            pieces += [c["text"] for c in chunks]
            last = chunks[-1]["seq"]
        time.sleep(0.005)
    assert seen_running, "no chunk was readable before the end"
    assert pieces, "streamed nothing"


def testing_tokenizer(tiny: dict[str, Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["llama"])


def test_streamed_chunks_add_up_to_the_answer(
    serving: Any, ops: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]], tiny: dict[str, Path]
) -> None:
    rid = submit(ops, "chat", "tiny/llama", CHAT, {"stream": True, "max_tokens": 30, "min_new_tokens": 30})
    # read the chunks as they come, then the answer (which consumes the request and its chunks). Whether it has
    # ended is looked at (without consuming it) before the chunks are read: once it has, that read has every piece,
    # and only then is the answer taken (taken between a read and the last pieces, it would delete those with it)
    got = None
    pieces: list[str] = []
    last = -1
    deadline = time.monotonic() + 60
    while got is None and time.monotonic() < deadline:
        ended = su.execute("SELECT status IN ('done', 'failed') AS e FROM pgml.requests WHERE id = %s", (rid,))
        ended_row = ended.fetchone()
        chunks = ops.execute("SELECT seq, text FROM pgml._request_chunks(%s, %s)", (rid, last)).fetchall()
        pieces += [c["text"] for c in chunks]
        last = chunks[-1]["seq"] if chunks else last
        if ended_row is not None and ended_row["e"]:
            got = ops.execute("SELECT * FROM pgml._request_answer(%s)", (rid,)).fetchone()
        time.sleep(0.005)
    assert got is not None and got["status"] == "done", got
    assert "".join(pieces) == got["result"]["content"]


def serving_pid(d: Any) -> int:
    def find() -> int | None:
        for child in psutil.Process(d.proc.pid).children():
            if "pgml_tuned.serving" in " ".join(child.cmdline()):
                return child.pid
        return None

    return int(wait_for(find, 60, what="the serving process"))


def wait_running(su: psycopg.Connection[dict[str, Any]], rid: int) -> None:
    def running() -> bool:
        row = su.execute("SELECT status FROM pgml.requests WHERE id = %s", (rid,)).fetchone()
        return row is not None and row["status"] == "running"

    wait_for(running, 60, interval=0.002, what=f"request {rid} to run")


@pytest.mark.serial  # restarted and answered within 30 s: a generation of 32 x 150 tokens, CPU-bound
def test_a_killed_serving_process_is_restarted_and_its_request_retried(
    serving: Any, ops: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]], tiny: dict[str, Path]
) -> None:
    ask(ops, "generate", "tiny/llama", ["warm"], {"max_new_tokens": 2})
    pid = serving_pid(serving)
    prompts = [f"Shares rose {i}" for i in range(32)]
    rid = submit(ops, "generate", "tiny/llama", prompts, {"max_new_tokens": 150, "min_new_tokens": 150})
    wait_for(
        lambda: (
            (r := su.execute("SELECT status FROM pgml.requests WHERE id = %s", (rid,)).fetchone())
            and r["status"] == "running"
        ),
        30,
        interval=0.002,
    )
    killed_at = time.monotonic()
    psutil.Process(pid).kill()
    got = answer(ops, rid, timeout=60)
    assert got["status"] == "done", got  # retried once on the new serving process
    assert len(got["result"]) == 32
    assert serving_pid(serving) != pid
    assert time.monotonic() - killed_at < 30
    # killed twice: failed, saying why, within seconds
    pid = serving_pid(serving)
    rid = submit(ops, "generate", "tiny/llama", prompts, {"max_new_tokens": 150, "min_new_tokens": 150})
    for _ in range(2):
        wait_for(
            lambda: (
                (r := su.execute("SELECT status FROM pgml.requests WHERE id = %s", (rid,)).fetchone())
                and r["status"] == "running"
            ),
            60,
            interval=0.002,
        )
        psutil.Process(serving_pid(serving)).kill()
        time.sleep(0.3)
    got = answer(ops, rid, timeout=30)
    assert got["status"] == "failed" and "stopped while answering" in got["error"], got
    # the daemon kept serving: training jobs and requests alike
    job = ops.execute("SELECT job_id FROM pgml.tune('noop_project', task => 'noop', model_name => 'none')").fetchone()
    assert job is not None
    assert wait_job(ops, job["job_id"], timeout=60)["status"] == "succeeded"
    ask(ops, "classify", "tiny/classifier", TEXTS)


def test_a_burst_leaves_the_tables_empty(
    serving: Any, su: psycopg.Connection[dict[str, Any]], su_dsn: str, tiny: dict[str, Path]
) -> None:
    """1000 calls of pgml.transform from 8 sessions at once (through each session's loopback): every one answered,
    and nothing of them is left in the tables."""
    errors: list[BaseException] = []
    task = '{"task": "text-classification", "model": "tiny/classifier"}'

    def client(n: int) -> None:
        try:
            with connect(as_login(su_dsn, USER)) as c:
                for i in range(n):
                    got = c.execute(
                        "SELECT pgml.transform(%s::jsonb, inputs => %s::text[]) AS t",
                        (task, [f"request {i} was wonderful"]),
                    ).fetchone()
                    assert got is not None and got["t"][0]["label"] in LABELS.values()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(125,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    # a call's answer is removed by a statement its loopback is sent as the call returns (pgml._loopback_send):
    # each session's last one is gone moments after the session ended
    deadline = time.monotonic() + 10
    while su.execute("SELECT count(*) AS n FROM pgml.requests").fetchone() != {"n": 0}:
        assert time.monotonic() < deadline, su.execute("SELECT id, status FROM pgml.requests").fetchall()
        time.sleep(0.05)
    assert su.execute("SELECT count(*) AS n FROM pgml.request_chunks").fetchone() == {"n": 0}


def test_worker_side_errors_answer_clearly(serving: Any, ops: psycopg.Connection[dict[str, Any]]) -> None:
    # an arg outside the allow-list is refused at submit (0033); the serving process checks again
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="args frobnicate is not allowed in a chat request"):
        submit(ops, "chat", "tiny/llama", CHAT, {"frobnicate": 1})
    got = answer(ops, submit(ops, "classify", "no-such/model", ["x"]))
    assert got["status"] == "failed" and "no-such/model" in got["error"]
