"""Tiny Hugging Face datasets in the `datasets` cache, for tests, benchmarks and offline demos.

With ``HF_HUB_OFFLINE=1``, ``datasets.load_dataset("imdb")`` loads what the cache holds for that hub name: the
newest ``$HF_DATASETS_CACHE/<namespace>___<name>/<config>/<version>/<hash>/`` directory whose
``dataset_info.json`` names ``<config>``, holding one ``<name>-<split>.arrow`` file per split. This module builds
such a directory through the ``datasets`` library itself (the ``parquet`` builder over local files, exactly
what a download would have prepared) and moves it under the hub name, so the real hub code path resolves it.
Nothing here touches the network.

- :func:`install_dataset` -- any splits (column -> values) with their ``Features`` under a hub name
- :func:`install_imdb` -- ``imdb``: train / test / unsupervised, ``text`` + ``label`` (ClassLabel neg/pos,
  -1 in the unsupervised split, as the real one)
- :func:`install_fingpt_sentiment` -- ``FinGPT/fingpt-sentiment-train``: ``input``, ``output``, ``instruction``
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
from datasets import ClassLabel, Features, Value

__all__ = ["datasets_cache", "imdb_rows", "install_dataset", "install_fingpt_sentiment", "install_imdb"]


def datasets_cache() -> Path:
    """The cache `datasets` reads: $HF_DATASETS_CACHE, else $HF_HOME/datasets."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "datasets"


def install_dataset(
    repo_id: str,
    splits: Mapping[str, Mapping[str, Sequence[Any]]],
    features: Features,
    *,
    config: str = "default",
    cache_dir: Path | None = None,
) -> Path:
    """Place `splits` ({split: {column: values}}) in the datasets cache as hub dataset `repo_id` / `config`;
    returns the directory. Installing the same name again replaces it."""
    cache = Path(cache_dir or datasets_cache())
    *namespace, name = repo_id.split("/")
    root = cache / "___".join([*namespace, name])
    with tempfile.TemporaryDirectory(prefix="pgml-ds-") as tmp:
        files = {}
        for split, columns in splits.items():
            path = Path(tmp) / f"{split}.parquet"
            datasets.Dataset.from_dict(dict(columns), features=features).to_parquet(str(path))
            files[split] = str(path)
        built = datasets.load_dataset("parquet", data_files=files, features=features, cache_dir=f"{tmp}/cache")
        prepared = Path(built[next(iter(splits))].cache_files[0]["filename"]).parent
        shutil.rmtree(root / config, ignore_errors=True)
        dest = root / config / prepared.parent.name / prepared.name
        dest.parent.mkdir(parents=True)
        shutil.copytree(prepared, dest, ignore=shutil.ignore_patterns("*.lock"))
    for arrow in dest.glob("parquet-*.arrow"):
        arrow.rename(dest / arrow.name.replace("parquet-", f"{name}-", 1))
    info = json.loads((dest / "dataset_info.json").read_text())
    info.update(config_name=config, dataset_name=name)
    (dest / "dataset_info.json").write_text(json.dumps(info))
    return dest


IMDB_FEATURES = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})

_GOOD = ["a delightful, moving film", "superb acting and a gripping plot", "loved every minute of it"]
_BAD = ["a dull, tedious mess", "the plot was predictable and the acting awful", "I want those hours back"]


def imdb_rows(n: int, split: str, seed: int = 0) -> dict[str, list[Any]]:
    """n IMDB-shaped reviews (~1.3 kB each, like the real ones) for `split`; label -1 in 'unsupervised'."""
    texts, labels = [], []
    for i in range(n):
        label = (i + seed) % 2
        phrase = (_GOOD if label else _BAD)[i % 3]
        texts.append(f"{split} review {i}: {phrase}. " + " ".join([phrase] * 40))
        labels.append(-1 if split == "unsupervised" else label)
    return {"text": texts, "label": labels}


def install_imdb(
    train: int = 6, test: int = 4, unsupervised: int = 2, *, cache_dir: Path | None = None, repo_id: str = "imdb"
) -> Path:
    """`imdb` (config plain_text) with the real dataset's splits and features, `train`/`test`/`unsupervised`
    rows each."""
    splits = {
        "train": imdb_rows(train, "train"),
        "test": imdb_rows(test, "test", seed=1),
        "unsupervised": imdb_rows(unsupervised, "unsupervised"),
    }
    return install_dataset(repo_id, splits, IMDB_FEATURES, config="plain_text", cache_dir=cache_dir)


FINGPT_FEATURES = Features({"input": Value("string"), "output": Value("string"), "instruction": Value("string")})


def install_fingpt_sentiment(rows: int = 8, *, cache_dir: Path | None = None) -> Path:
    """`FinGPT/fingpt-sentiment-train`: one train split of (input, output, instruction), as the real one."""
    sentiments = ["positive", "negative", "neutral", "mildly positive", "moderately negative"]
    columns: dict[str, list[Any]] = {
        "input": [f"Company {i} reported quarterly results {i % 3} percent above forecasts." for i in range(rows)],
        "output": [sentiments[i % len(sentiments)] for i in range(rows)],
        "instruction": ["What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."]
        * rows,
    }
    return install_dataset("FinGPT/fingpt-sentiment-train", {"train": columns}, FINGPT_FEATURES, cache_dir=cache_dir)
