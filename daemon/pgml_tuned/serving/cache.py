"""Models by request: the cache key a request's model name stands for, loading that model, and a warm LRU cache
bounded by memory.

The key of a stored model is its id (`pgml:model:<id>`), found per batch from the request's name and submitter
(pgml.<project> = its deployed model, read again for every batch: a new deployment is served at once, and an
old model's entry simply ages out of the cache). Hub ids and directories (by their real path) are their own keys,
whoever loaded them first: every request's submitter passes admission.py before a cached model answers it. Loading
resolves through models.py (only models the submitter may read; config files checked), downloads stored files
into a directory per model id (kept: a model's files never change), and puts a LoRA adapter on its recorded base,
merged for speed. Embedding models load as a SentenceTransformer (a sentence-transformers directory, or a plain
encoder with mean pooling), rerankers as a CrossEncoder (a sequence classifier with one output).
"""

from __future__ import annotations

import contextlib
import gc
import shutil
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import db, files, logconfig, model_refs, models
from ..errors import JobError

log = logconfig.get("pgml_tuned.serving.cache")

CLASSIFY = "classify"
GENERATE = "generate"
EMBED = "embed"
RANK = "rank"


def family(kind: str) -> str:
    """Which kind of loaded model a request kind needs."""
    return kind if kind in (CLASSIFY, EMBED, RANK) else GENERATE


@dataclass(frozen=True)
class ModelKey:
    family: str  # classify | generate | embed | rank
    name: str  # a hub id, a worker directory, or pgml:model:<id>
    owner: str  # whose rights load it (the submitter of the request that first needed it)

    @property
    def cache_key(self) -> tuple[str, str]:
        return (self.family, self.name)


@dataclass
class Loaded:
    key: ModelKey
    model: Any
    tokenizer: Any
    device: str
    nbytes: int
    pipeline: Any = None  # text-classification
    hub_ids: tuple[str, ...] = ()  # the hub models a stored model was loaded onto (checked again when served warm)


class SyncStore:
    """models.ModelStore for the loading thread: its own short connections; stored files cached per model id."""

    def __init__(self, dsn: str, cache_dir: Path) -> None:
        self.dsn = dsn
        self.cache_dir = cache_dir

    def find_model(self, model_id: int | None, project: str, owner: str) -> dict[str, Any] | None:
        ref = f"model:{model_id}" if model_id is not None else project
        with db.sync_connect(self.dsn, app="pgml-tuned serving") as conn:
            row = conn.execute(db.q("serving_model"), {"owner": owner, "ref": ref}).fetchone()
        return dict(row) if row else None

    def hub_refusal(self, model_name: str, owner: str) -> str | None:
        """Why the hub allow-list refuses `model_name` to `owner` (None: it does not)."""
        with db.sync_connect(self.dsn, app="pgml-tuned serving") as conn:
            row = conn.execute(db.q("hub_refusal"), {"model_name": model_name, "owner": owner}).fetchone()
        return row["error"] if row else None

    def download_model(self, model_id: int, dest: Path) -> Path:
        if (dest / ".complete").is_file():
            return dest
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with db.sync_connect(self.dsn, app="pgml-tuned serving") as conn:
            files.download_model(conn, model_id, partial, "serving_model_files")
        (partial / ".complete").touch()
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)
        return dest


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_bytes(model: Any) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def load(key: ModelKey, store: models.ModelStore, cache_dir: Path) -> Loaded:
    """Load what `key` names (blocking: run it in a thread); stored models are downloaded under cache_dir. The
    serving process and the predict_batch recipe (with the child's store) load the same way."""
    import torch
    from transformers import AutoModelForSequenceClassification, pipeline

    def info(*args: Any, **kwargs: Any) -> None:
        log.info("serving.model_source", model=key.name, note=args[0] if args else "")

    resolved = models.resolve(key.name, store, cache_dir, info, owner=key.owner)
    adapter = resolved.adapter_dir
    hub_ids: tuple[str, ...] = ()
    weights, tokenizer_source = resolved.source, resolved.source
    if adapter is not None:
        base_name = resolved.adapter_base()
        if not base_name:
            raise JobError(f"model {key.name!r} is a LoRA adapter with no recorded base model")
        weights = models.resolve(base_name, store, cache_dir, info, owner=key.owner).source
        if model_refs.kind(base_name) == model_refs.HUB:
            hub_ids = (base_name,)
        if not (Path(adapter) / "tokenizer_config.json").is_file():
            tokenizer_source = weights
    dev = device()
    if key.family in (EMBED, RANK):
        if adapter is not None:
            raise JobError(f"model {key.name!r} is a LoRA adapter: pgml.embed and pgml.rank serve whole models")
        return load_sentence_model(key, weights, dev)
    tokenizer = models.load_tokenizer(tokenizer_source)
    with torch.inference_mode():
        if key.family == CLASSIFY:
            try:
                model = AutoModelForSequenceClassification.from_pretrained(weights)
            except (OSError, ValueError) as e:
                raise JobError(f"cannot load model {key.name!r} as a text classifier: {e}") from e
        else:
            model = models.load_causal_lm(weights, device=dev)
        if adapter is not None:
            model = models.attach_adapter(model, adapter, trainable=False).merge_and_unload()
        model.to(dev).eval()
    loaded = Loaded(key, model, tokenizer, dev, model_bytes(model), hub_ids=hub_ids)
    if key.family == CLASSIFY:
        loaded.pipeline = pipeline("text-classification", model=model, tokenizer=tokenizer, device=dev)
    elif tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return loaded


def load_sentence_model(key: ModelKey, source: str, dev: str) -> Loaded:
    """A SentenceTransformer (EMBED) or a CrossEncoder (RANK) from a resolved source: never remote code (a module
    class outside sentence_transformers is refused by the library without trust_remote_code)."""
    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer

    try:
        with torch.inference_mode():
            if key.family == EMBED:
                model: Any = SentenceTransformer(source, device=dev, trust_remote_code=False)
            else:
                model = CrossEncoder(source, device=dev, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        what = "an embedding model" if key.family == EMBED else "a cross-encoder"
        raise JobError(f"cannot load model {key.name!r} as {what}: {e}") from e
    if key.family == RANK and model.config.num_labels != 1:
        raise JobError(
            f"model {key.name!r} has {model.config.num_labels} outputs: a cross-encoder for pgml.rank has one (a score)"
        )
    model.eval()
    return Loaded(key, model, model.tokenizer, dev, model_bytes(model))


class ModelCache:
    """Loaded models, least recently used first out, their weights summing to at most `limit_bytes` (the model
    just loaded always stays, even alone over the limit)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.entries: OrderedDict[tuple[str, str], Loaded] = OrderedDict()

    def get(self, key: ModelKey) -> Loaded | None:
        loaded = self.entries.get(key.cache_key)
        if loaded is not None:
            self.entries.move_to_end(key.cache_key)
        return loaded

    def put(self, loaded: Loaded) -> list[str]:
        """Keep `loaded`; evict the least recently used over the limit; return the names evicted."""
        self.entries[loaded.key.cache_key] = loaded
        self.entries.move_to_end(loaded.key.cache_key)
        evicted = []
        while len(self.entries) > 1 and self.total_bytes > self.limit_bytes:
            _, old = self.entries.popitem(last=False)
            evicted.append(old.key.name)
        if evicted:
            free_memory()
        return evicted

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())


def free_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


Loader = Callable[[ModelKey], Loaded]
