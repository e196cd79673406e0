"""Models by request: the cache key a request's model name stands for, loading that model, and a warm LRU cache
bounded by memory.

The key of a stored model is its id (`pgml:model:<id>`), found per batch from the request's name and submitter
(pgml.<project> = its deployed model, read again for every batch: a new deployment is served at once, and an
old model's entry simply ages out of the cache). Hub ids and directories (by their real path) are their own keys,
whoever loaded them first: every request's submitter passes admission.py before a cached model answers it. Loading
resolves through models.py (only models the submitter may read; config files checked), downloads stored files
into a directory per model id (kept: a model's files never change).

A LoRA adapter (a stored model with a recorded base) is served one of two ways (--lora-serving):
- multi (the default): its base is loaded once (the ModelCache entry of the base's own name, shared with requests
  for the base itself) and the adapter is loaded onto it unmerged (peft's load_adapter, under a name of its own),
  kept in an AdapterCache of its own (count and bytes bounded, least recently used out by delete_adapter; the base
  stays). Requests for different adapters of one base then run as one batch (peft's adapter_names: each row of a
  forward pass through its own adapter, "__base__" for none). Evicting a base drops its adapters with it.
- merged: the adapter merged into a copy of its base of its own (one ModelCache entry per adapter).
Embedding models load as a SentenceTransformer (a sentence-transformers directory, or a plain
encoder with mean pooling), rerankers as a CrossEncoder (a sequence classifier with one output).
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import db, files, logconfig, model_refs, models
from ..errors import JobError
from . import lora_rows

log = logconfig.get("pgml_tuned.serving.cache")

CLASSIFY = "classify"
GENERATE = "generate"
EMBED = "embed"
RANK = "rank"
BASE = lora_rows.BASE  # the adapter name of a row with no adapter, in a mixed batch


def family(kind: str) -> str:
    """Which kind of loaded model a request kind needs."""
    return kind if kind in (CLASSIFY, EMBED, RANK) else GENERATE


@dataclass(frozen=True)
class ModelKey:
    family: str  # classify | generate | embed | rank
    name: str  # a hub id, a worker directory, or pgml:model:<id>
    owner: str  # whose rights load it (the submitter of the request that first needed it)
    # a LoRA adapter served unmerged (--lora-serving multi): the cache name of the base it loads onto
    base: str | None = None

    @property
    def cache_key(self) -> tuple[str, str]:
        return (self.family, self.name)

    @property
    def base_key(self) -> ModelKey:
        """What a forward pass for this key runs on: its base for an unmerged adapter, else itself."""
        return ModelKey(self.family, self.base, self.owner) if self.base is not None else self


@dataclass
class Loaded:
    key: ModelKey
    model: Any
    tokenizer: Any
    device: str
    nbytes: int
    pipeline: Any = None  # text-classification
    hub_ids: tuple[str, ...] = ()  # the hub models a stored model was loaded onto (checked again when served warm)
    peft: Any = None  # the PeftModel around `model` once adapters are loaded onto it (multi), else None
    adapters: set[str] = field(default_factory=set)  # the peft names of the adapters loaded onto it
    # its adapters' weights stacked for mixed batches (lora_rows.py), built at the first batch after a load or an
    # unload; False: they cannot be (not plain LoRA on linear layers), peft's own mixed batches serve them
    stacks: Any = None


@dataclass
class Adapter:
    """A LoRA adapter loaded, unmerged, onto a base in the ModelCache."""

    key: ModelKey
    base: tuple[str, str]  # its base's cache key
    name: str  # its name in the base's PeftModel
    nbytes: int
    seconds: float  # from PostgreSQL to loaded
    tokenizer: Any  # its own when it carries one (same vocabulary as the base), else the base's


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
    elif model_refs.kind(key.name) == model_refs.HUB:
        hub_ids = (key.name,)
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

    def put(self, loaded: Loaded, keep: tuple[str, str] | None = None) -> list[Loaded]:
        """Keep `loaded`; evict the least recently used over the limit (never `keep`: the base a running batch
        needs); return those evicted."""
        self.entries[loaded.key.cache_key] = loaded
        self.entries.move_to_end(loaded.key.cache_key)
        evicted = []
        for k in list(self.entries):
            if len(self.entries) <= 1 or self.total_bytes <= self.limit_bytes:
                break
            if k not in (keep, loaded.key.cache_key):
                evicted.append(self.entries.pop(k))
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


def load_adapter(key: ModelKey, base: Loaded, store: models.ModelStore, cache_dir: Path, name: str) -> Adapter:
    """Fetch the adapter `key` names (only if its submitter may read it: models.resolve) and load it, unmerged,
    onto `base` as `name` (blocking: run it in a thread). The first adapter wraps the base in a PeftModel (in place:
    the base's modules gain the LoRA layers, and every forward pass then names its rows' adapters)."""
    import torch

    started = time.monotonic()

    def info(*args: Any, **kwargs: Any) -> None:
        log.info("serving.model_source", model=key.name, note=args[0] if args else "")

    resolved = models.resolve(key.name, store, cache_dir, info, owner=key.owner)
    adapter_dir = resolved.adapter_dir
    if adapter_dir is None:
        raise JobError(
            f"model {key.name!r} records the base model {key.base!r} but its files are not a LoRA adapter "
            "(no adapter_config.json)"
        )
    tokenizer = base.tokenizer
    if (Path(adapter_dir) / "tokenizer_config.json").is_file():
        tokenizer = models.load_tokenizer(adapter_dir)
        if len(tokenizer) != len(base.tokenizer):
            raise JobError(
                f"the tokenizer of adapter {key.name!r} has {len(tokenizer)} tokens, its base {key.base!r} "
                f"{len(base.tokenizer)}: an adapter served on a shared base uses the base's vocabulary"
            )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    peft = models.peft_module()
    with torch.no_grad():
        try:
            if base.peft is None:
                base.peft = peft.PeftModel.from_pretrained(base.model, adapter_dir, adapter_name=name)
            else:
                base.peft.load_adapter(adapter_dir, adapter_name=name, is_trainable=False)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise JobError(f"cannot load adapter {key.name!r} onto {key.base!r}: {type(e).__name__}: {e}") from e
        base.peft.to(base.device).eval()
    base.adapters.add(name)
    base.stacks = None
    nbytes = sum(
        p.numel() * p.element_size() for n, p in base.peft.named_parameters() if f".{name}." in n or n.endswith(name)
    )
    return Adapter(key, base.key.cache_key, name, nbytes, time.monotonic() - started, tokenizer)


def unload_adapter(base: Loaded, name: str) -> None:
    """Take an adapter off its base (delete_adapter); the last one unwraps the base (peft cannot run a PeftModel
    with no adapter left): its modules are the plain base's again."""
    if name not in base.adapters:
        return
    base.adapters.discard(name)
    base.stacks = None
    if base.adapters:
        base.peft.delete_adapter(name)
    else:
        base.model = base.peft.unload()
        base.peft = None
        if base.pipeline is not None:
            base.pipeline.model = base.model


@contextlib.contextmanager
def adapters_for_rows(loaded: Loaded, names: list[str] | None, num_beams: int | None = None) -> Iterator[None]:
    """Every forward pass in this context runs row i through adapter names[i] (BASE: none). A base that has
    adapters loaded always needs this (outside it, peft would apply its active adapter to every row)."""
    if loaded.peft is None:
        if names and any(n != BASE for n in names):
            raise JobError(f"model {loaded.key.name!r} has no adapter loaded for this batch")  # a bug if it happens
        yield
        return
    if not names:
        raise JobError(f"model {loaded.key.name!r} has adapters loaded: a batch on it names each row's adapter")
    if loaded.stacks is None:
        loaded.stacks = lora_rows.Stacks.build(loaded.peft, loaded.adapters) or False
    if loaded.stacks:  # two batched matmuls a layer, whatever the adapters (lora_rows.py)
        with lora_rows.rows(loaded.stacks, names):
            yield
        return
    with loaded.peft.base_model._enable_peft_forward_hooks(adapter_names=names, num_beams=num_beams):
        yield


class AdapterCache:
    """Adapters loaded onto bases, least recently used first out, at most `limit_count` of them and `limit_bytes`
    of their weights (those a running batch needs are never evicted, even over the limit)."""

    def __init__(self, limit_count: int, limit_bytes: int) -> None:
        self.limit_count = limit_count
        self.limit_bytes = limit_bytes
        self.entries: OrderedDict[tuple[str, str], Adapter] = OrderedDict()
        self.serial = 0

    def next_name(self) -> str:
        self.serial += 1
        return f"adapter_{self.serial}"

    def get(self, key: ModelKey) -> Adapter | None:
        adapter = self.entries.get(key.cache_key)
        if adapter is not None:
            self.entries.move_to_end(key.cache_key)
        return adapter

    def put(self, adapter: Adapter, keep: set[tuple[str, str]]) -> list[Adapter]:
        """Keep `adapter`; return those evicted over the limits (the caller takes them off their bases)."""
        self.entries[adapter.key.cache_key] = adapter
        self.entries.move_to_end(adapter.key.cache_key)
        evicted = []
        for k in list(self.entries):
            if len(self.entries) <= self.limit_count and self.total_bytes <= self.limit_bytes:
                break
            if k not in keep and k != adapter.key.cache_key:
                evicted.append(self.entries.pop(k))
        return evicted

    def tokenizer(self, name: str) -> Any:
        """The tokenizer of the adapter loaded as `name` (None: the base's)."""
        return next((a.tokenizer for a in self.entries.values() if a.name == name), None)

    def drop_base(self, base: tuple[str, str]) -> list[Adapter]:
        """The adapters of a base evicted from the ModelCache (gone with it)."""
        gone = [a for a in self.entries.values() if a.base == base]
        for a in gone:
            del self.entries[a.key.cache_key]
        return gone

    @property
    def total_bytes(self) -> int:
        return sum(a.nbytes for a in self.entries.values())
