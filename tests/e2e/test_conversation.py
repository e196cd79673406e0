"""The conversation recipe as a user meets it: the seed's LoRA SQL verbatim, a daemon, then the adapter in
pgml.files reloaded onto its base model; failures that name their fix; continuing from stored models."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql
import pytest
import torch
from psycopg.rows import dict_row

from pgml_tuned import hub_cache
from pgml_tuned.files import download_model
from tests import seed
from tests.conftest import DaemonProc, wait_job
from tests.support import models as testing
from tests.support.hf_datasets import FINGPT_FEATURES, install_dataset

pytestmark = pytest.mark.slow

FINANCE = testing.DATA / "finance_chat.csv"
LLAMA_HUB_ID = "meta-llama/Llama-2-7b-chat-hf"
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, session_env: Path) -> Path:
    path = testing.build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")
    # the seed names a gated hub model: serve the tiny one under that id from the offline hub cache
    hub_cache.add(path, LLAMA_HUB_ID, session_env / "hf")
    return path


@pytest.fixture(scope="session")
def tiny_llama_no_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-plain", chat_template=False)


def load_fingpt(
    conn: psycopg.Connection[dict[str, Any]],
    table: str = 'pgml."FinGPT/fingpt-sentiment-train"',
    rows: int | None = None,
) -> None:
    """The table `pgml.load_dataset('FinGPT/fingpt-sentiment-train')` makes, from the bundled sample."""
    with open(FINANCE, newline="") as f:
        data = list(csv.DictReader(f))[:rows]
    conn.execute(f"CREATE TABLE {table} (instruction text, input text, output text)")
    with conn.cursor() as cur, cur.copy(f"COPY {table} (instruction, input, output) FROM STDIN") as copy:
        for r in data:
            copy.write_row((r["instruction"], r["input"], r["output"]))


def infos(d: DaemonProc, job_id: int) -> list[str]:
    """The job.info messages the daemon logged for one job."""
    out = []
    for line in d.output().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("job_id") == job_id and event.get("event") == "job.info":
            out.append(str(event.get("message")))
    return out


def first_loss(conn: psycopg.Connection[dict[str, Any]], job_id: int) -> float:
    row = conn.execute(
        "SELECT (logs->>'loss')::float AS loss FROM pgml.logs WHERE job_id = %s AND logs ? 'loss' "
        "ORDER BY (logs->>'step')::int, id LIMIT 1",
        (job_id,),
    ).fetchone()
    assert row is not None, f"job {job_id} logged no loss"
    return float(row["loss"])


def files_of(conn: psycopg.Connection[dict[str, Any]], model_id: int) -> dict[str, int]:
    return {
        r["path"]: int(r["bytes"])
        for r in conn.execute(
            "SELECT path, sum(length(data)) AS bytes FROM pgml.files WHERE model_id = %s GROUP BY path", (model_id,)
        )
    }


def test_seed_llama2_lora_end_to_end(
    conn: psycopg.Connection[dict[str, Any]],
    su: psycopg.Connection[dict[str, Any]],
    daemon: Any,
    tiny_llama: Path,
    tmp_path: Path,
    session_env: Path,
) -> None:
    # the guide's first statement, verbatim: the dataset from the worker's offline datasets cache (the bundled
    # sample, as `FinGPT/fingpt-sentiment-train` would be after a download)
    with open(FINANCE, newline="") as f:
        sample = list(csv.DictReader(f))
    columns = {k: [r[k] for r in sample] for k in ("input", "output", "instruction")}
    install_dataset("FinGPT/fingpt-sentiment-train", {"train": columns}, FINGPT_FEATURES)
    d = daemon("--concurrency", "2")
    loaded = conn.execute(seed.find("SELECT pgml.load_dataset('FinGPT/fingpt-sentiment-train')")).fetchone()
    assert tuple(loaded["load_dataset"]) == ('pgml."FinGPT/fingpt-sentiment-train"', str(len(sample)))
    conn.execute(seed.find(seed.FINGPT_SHUFFLED_VIEW))
    conn.execute(seed.find(seed.FINGPT_TRAIN_VIEW))
    tune = seed.find(seed.TUNE_LLAMA)
    assert '"optim" : "adamw_bnb_8bit"' in tune and '"load_in_8bit" : false' in tune and "HF_TOKEN" in tune

    # What this worker can do is measured, not assumed: bitsandbytes ≥ 0.45 runs its 8-bit optimizers on CPU
    # too, so the seed's exact SQL trains here; where they cannot run, it fails at once naming optim.
    from pgml_tuned.recipes import conversation as cv

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bnb_works = cv.probe_bitsandbytes(device, "optimizer") is None
    seed_job = seed.job_id(conn.execute(tune).fetchone()["tune"])
    torch_job = None
    if not bnb_works:
        torch_job = seed.job_id(conn.execute(tune.replace('"adamw_bnb_8bit"', '"adamw_torch"')).fetchone()["tune"])
    # a request no machine can honour fails before the data is read or a weight is loaded
    both = tune.replace("'fingpt-llama2-7b-chat'", "'fingpt-both-quant'").replace(
        '"load_in_8bit" : false', '"load_in_8bit" : true, "load_in_4bit" : true'
    )
    both_job = seed.job_id(conn.execute(both).fetchone()["tune"])

    done = {j: wait_job(conn, j, 240) for j in (seed_job, torch_job, both_job) if j is not None}

    failed = done[both_job]
    assert failed["status"] == "failed"
    assert "load_in_8bit and load_in_4bit are both true: set one of them" in failed["error"]
    assert not any(m.startswith("read ") for m in infos(d, both_job)), "it read the data before failing"
    said = conn.execute("SELECT kind, logs FROM pgml.logs WHERE job_id = %s ORDER BY id", (both_job,)).fetchall()
    assert not [r for r in said if r["kind"] == "train" or r["logs"]["message"].startswith("read ")], said
    assert said[-1]["kind"] == "error" and "load_in_8bit and load_in_4bit" in said[-1]["logs"]["message"]

    if bnb_works:
        trained = done[seed_job]
        assert any(m.startswith("trained with optimizer bitsandbytes.") for m in infos(d, seed_job))
    else:
        assert done[seed_job]["status"] == "failed"
        assert 'training_args.optim "adamw_bnb_8bit"' in done[seed_job]["error"]
        assert '"optim": "adamw_torch"' in done[seed_job]["error"]
        assert not any(m.startswith("read ") for m in infos(d, seed_job))
        trained = done[torch_job]
    assert trained["status"] == "succeeded", trained["error"]
    model_id = trained["model_id"]

    model = conn.execute("SELECT * FROM pgml.models WHERE id = %s", (model_id,)).fetchone()
    assert model["status"] == "successful" and model["base_model"] == LLAMA_HUB_ID
    metrics = model["metrics"]
    assert isinstance(metrics["eval_loss"], float)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    # test_size 0.8 of the 120-row train view is the test set (pgml's convention), 24 rows train
    assert (metrics["train_rows"], metrics["test_rows"], metrics["truncated_rows"]) == (24, 96, 0)
    assert conn.execute("SELECT 1 FROM pgml.logs WHERE job_id = %s AND logs ? 'loss'", (trained["id"],)).fetchone()

    # only the adapter and the tokenizer are stored: a few MB at most (here, kilobytes)
    stored = files_of(conn, model_id)
    assert ADAPTER_FILES <= set(stored) <= ADAPTER_FILES | TOKENIZER_FILES, stored
    assert sum(stored.values()) < 1_000_000

    # the hub token is in no table and in no output (looked for as a superuser: every row of every table)
    tables = [
        r["relname"]
        for r in su.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'pgml' AND c.relkind = 'r'"
        )
    ]
    for table in tables:
        query = psycopg.sql.SQL("SELECT count(*) AS n FROM pgml.{} t WHERE t::text LIKE '%%HF_TOKEN%%'")
        assert su.execute(query.format(psycopg.sql.Identifier(table))).fetchone()["n"] == 0, table
    in_files = "SELECT count(*) AS n FROM pgml.file_parts WHERE position('HF_TOKEN'::bytea IN data) > 0"
    assert su.execute(in_files).fetchone()["n"] == 0
    assert "HF_TOKEN" not in d.output()

    # reload: the adapter onto its recorded base model, and generate
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with psycopg.connect(conn.info.dsn, row_factory=dict_row) as c2:
        out = download_model(c2, model_id, tmp_path / "reloaded")
    weights = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items()), "the adapter did not train"
    # through the hub cache the daemon used (this process may have imported huggingface_hub before
    # session_env set HF_HOME and HF_HUB_OFFLINE, so name both)
    base = AutoModelForCausalLM.from_pretrained(
        model["base_model"], cache_dir=session_env / "hf" / "hub", local_files_only=True
    )
    tuned = PeftModel.from_pretrained(base, out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "What is the sentiment of this news?"},
            {"role": "user", "content": "Shares rose 4.2% after the company raised its forecast."},
        ],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    generated = tuned.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4


def submit(
    conn: psycopg.Connection[dict[str, Any]], project: str, model_name: str, relation: str = "chat", **hyperparams: Any
) -> int:
    hp = {
        "dataset_args": {"system_column": "instruction", "user_column": "input", "assistant_column": "output"},
        "training_args": {
            "num_train_epochs": 2,
            "per_device_train_batch_size": 8,
            "logging_steps": 1,
            "seed": 7,
            "learning_rate": 5e-3,
        },
        **hyperparams,
    }
    row = conn.execute(
        "SELECT job_id FROM pgml.tune(%s, task => 'conversation', relation_name => %s, model_name => %s, "
        "test_size => 0.25, test_sampling => 'stratified', hyperparams => %s::jsonb)",
        (project, relation, model_name, json.dumps(hp)),
    ).fetchone()
    return int(row["job_id"])


def test_failures_name_the_fix_and_prompt_templates_pack(
    conn: psycopg.Connection[dict[str, Any]], daemon: Any, tiny_llama_no_template: Path
) -> None:
    load_fingpt(conn, "chat", rows=40)
    # a missing column is caught by pgml.tune() itself: nothing is queued
    with pytest.raises(psycopg.errors.UndefinedColumn) as e:
        submit(
            conn,
            "bad",
            str(tiny_llama_no_template),
            dataset_args={"user_column": "question", "assistant_column": "output"},
        )
    assert "column 'question' (dataset_args.user_column) does not exist in public.chat" in str(e.value)
    assert conn.execute("SELECT count(*) AS n FROM pgml.jobs").fetchone()["n"] == 0

    # a tokenizer without a chat template needs a prompt_template ...
    no_template = submit(conn, "plain", str(tiny_llama_no_template))
    # ... and with one it trains: no system turn, loss on everything, conversations packed into 256-token blocks
    packed = submit(
        conn,
        "plain_packed",
        str(tiny_llama_no_template),
        dataset_args={"user_column": "input", "assistant_column": "output"},
        packing=True,
        train_on="all",
        max_seq_length=256,
        prompt_template="{system}### User: {user}\n### Assistant: {assistant}{eos_token}",
    )
    # max_seq_length above the model's 256 positions: refused before a token is encoded
    too_long = submit(conn, "too_long", str(tiny_llama_no_template), max_seq_length=4096)
    daemon("--concurrency", "2")
    failed, ok = wait_job(conn, no_template, 240), wait_job(conn, packed, 240)
    refused = wait_job(conn, too_long, 240)
    assert refused["status"] == "failed"
    assert "hyperparams.max_seq_length 4096 is more than model" in refused["error"]
    assert "at most 256 tokens" in refused["error"], refused["error"]
    assert failed["status"] == "failed"
    assert "the tokenizer has no chat template: set hyperparams.prompt_template" in failed["error"]
    assert ok["status"] == "succeeded", ok["error"]
    metrics = ok["metrics"]
    assert metrics["train_rows"] == 30 and 0 < metrics["packed_blocks"] <= 15
    assert math.isfinite(metrics["eval_loss"]) and math.isfinite(metrics["train_loss"])
    stored = files_of(conn, ok["model_id"])
    assert "model.safetensors" in stored and "training_args.bin" not in stored  # full fine-tuning: the model


def test_continuing_from_stored_models(conn: psycopg.Connection[dict[str, Any]], daemon: Any, tiny_llama: Path) -> None:
    load_fingpt(conn, "chat", rows=64)
    full_a = submit(conn, "conv_full", str(tiny_llama))
    lora_c = submit(
        conn,
        "conv_lora",
        str(tiny_llama),
        lora_config={"r": 4, "lora_alpha": 8},
        training_args={
            "num_train_epochs": 2,
            "per_device_train_batch_size": 8,
            "logging_steps": 1,
            "seed": 7,
            "learning_rate": 2e-2,
        },
    )
    d = daemon("--concurrency", "2")
    a, c = wait_job(conn, full_a, 240), wait_job(conn, lora_c, 240)
    assert a["status"] == "succeeded", a["error"]
    assert c["status"] == "succeeded", c["error"]
    # the second round starts from the first round's stored weights, on the same data, split and seed
    full_b = submit(conn, "conv_full", "pgml:conv_full")
    lora_d = submit(
        conn,
        "conv_lora_more",
        f"pgml:model:{c['model_id']}",
        training_args={
            "num_train_epochs": 1,
            "per_device_train_batch_size": 8,
            "logging_steps": 1,
            "seed": 7,
            "learning_rate": 2e-2,
        },
    )
    b, dd = wait_job(conn, full_b, 240), wait_job(conn, lora_d, 240)
    assert b["status"] == "succeeded", b["error"]
    assert dd["status"] == "succeeded", dd["error"]

    assert first_loss(conn, full_b) < first_loss(conn, full_a) - 1.0
    assert first_loss(conn, lora_d) < first_loss(conn, lora_c) - 0.2
    assert any(f"starting from stored model {a['model_id']}" in m for m in infos(d, full_b))
    assert any("continuing the stored LoRA adapter" in m for m in infos(d, lora_d))

    models = {
        r["id"]: r
        for r in conn.execute(
            "SELECT id, base_model FROM pgml.models WHERE id = ANY(%s)",
            ([a["model_id"], b["model_id"], c["model_id"], dd["model_id"]],),
        )
    }
    assert models[a["model_id"]]["base_model"] is None and models[b["model_id"]]["base_model"] is None
    assert models[c["model_id"]]["base_model"] == models[dd["model_id"]]["base_model"] == str(tiny_llama)
    assert "model.safetensors" in files_of(conn, b["model_id"])
    assert ADAPTER_FILES <= set(files_of(conn, dd["model_id"])) <= ADAPTER_FILES | TOKENIZER_FILES
