"""Models by name: resolve a `model_name` to something loadable, and load it.

A model_name is one of
- `pgml:model:<id>`  model <id> of pgml.models (its files come from pgml.files),
- `pgml:<project>`   that project's latest successful model,
- a directory under the workers' model directories (PGML_MODEL_DIRS; never the worker's own state), or
- a Hugging Face hub id (the worker's hub cache; HF_HUB_OFFLINE=1 keeps it offline).
model_refs.py holds the rules; resolve() is the one place every path (tune, serving, predict_batch) applies them.
A stored LoRA adapter loads onto its recorded base model (itself any of the above).

Training recipes and (next) the inference lane load through here, so both see the same models the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import hub_access, model_refs
from .errors import JobError
from .model_files import CONFIG_FILES, outside_paths

# torch_dtype names users may write → the canonical name (torch is imported only when a model is loaded: a
# child that needs no model, and the worker, never import it)
DTYPES: dict[str, str] = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def torch_dtype(name: str) -> Any:
    """torch's dtype for a DTYPES name ("auto" stays "auto")."""
    import torch

    canonical = DTYPES[name]
    return canonical if canonical == "auto" else getattr(torch, canonical)


class ModelStore(Protocol):
    """Where stored models come from (the child's JobStore)."""

    def find_model(self, model_id: int | None, project: str, owner: str) -> dict[str, Any] | None: ...

    def download_model(self, model_id: int, dest: Path) -> Path: ...

    def hub_refusal(self, model_name: str, owner: str) -> str | None:
        """Why the hub allow-list (pgml.hub_allowlist) refuses the hub model for `owner`'s job; None if not."""
        ...


@dataclass(frozen=True)
class Resolved:
    name: str  # as given
    source: str  # a directory or hub id from_pretrained loads
    stored: dict[str, Any] | None  # the pgml.models row when it came from pgml

    @property
    def adapter_dir(self) -> str | None:
        """The directory of a LoRA adapter (adapter_config.json, no base weights), else None."""
        return self.source if (Path(self.source) / "adapter_config.json").is_file() else None

    def adapter_base(self) -> str | None:
        """What a LoRA adapter loads onto: the base recorded with the stored model, else the adapter's own."""
        if self.adapter_dir is None:
            return None
        recorded = (self.stored or {}).get("base_model")
        config = json.loads((Path(self.source) / "adapter_config.json").read_text())
        return recorded or config.get("base_model_name_or_path")


def resolve(
    model_name: str,
    store: ModelStore,
    workdir: Path,
    info: Callable[..., None],
    *,
    token: str | None = None,
    owner: str = "",
    places: model_refs.Places | None = None,
) -> Resolved:
    """A loadable source for `model_name` under the rules of model_refs: stored models are downloaded under workdir
    (only those `owner`, the job's or request's submitter, may read); hub models pass the allow-list and the
    private-model ledger for `owner` / `token`; directories must lie in the workers' model directories (`places`,
    default: this process's) and outside the worker's own state. Every model's configuration files are checked
    (refuse_outside_paths) before anything loads them."""
    ref_kind = model_refs.kind(model_name)
    if ref_kind == model_refs.DIRECTORY:
        source = model_refs.model_dir(model_name, places or model_refs.Places.from_env())
        refuse_outside_paths(source, model_name)
        return Resolved(model_name, str(source), None)
    if ref_kind == model_refs.HUB:
        if os.path.lexists(model_name):  # from_pretrained would load that local path instead of the hub model
            raise JobError(
                f"model_name {model_name!r} is also a path relative to the worker's working directory; "
                "name a hub model that is not, or a directory by its absolute path"
            )
        check_hub_model(model_name, store, token=token, owner=owner)
        configs = hub_configs(model_name, token)
        hub_access.note_fetched(model_name, token)
        refuse_outside_paths(configs, model_name)
        return Resolved(model_name, model_name, None)
    ref = model_name.removeprefix("pgml:")
    if ref.startswith("model:") and not ref.removeprefix("model:").isdigit():
        raise JobError(f"model_name {model_name!r}: write pgml:model:<id> with a numeric id")
    model_id = int(ref.removeprefix("model:")) if ref.startswith("model:") else None
    row = store.find_model(model_id, ref, owner)  # only models the job's submitter may read
    if row is None:
        what = f"model {model_id}" if model_id else f"a successful model in project {ref!r}"
        raise JobError(f"model_name {model_name!r}: there is no {what}")
    if row["status"] != "successful":
        raise JobError(f"model_name {model_name!r}: model {row['id']} is {row['status']}, not successful")
    dest = workdir / f"start-model-{row['id']}"
    store.download_model(row["id"], dest)
    refuse_outside_paths(dest, model_name)
    info(f"starting from stored model {row['id']} (project {row['project_name']})", model_id=row["id"])
    return Resolved(model_name, str(dest), dict(row))


def check_hub_model(model_name: str, store: ModelStore, *, token: str | None, owner: str) -> None:
    """Before a hub model is fetched or served from the worker's cache: the administrators' allow-list, then
    whether the job's token may read it (a private model another job's token fetched is not served)."""
    refusal = store.hub_refusal(model_name, owner)
    if refusal:
        raise JobError(refusal)
    hub_access.check_cached_access(model_name, token)


def refuse_outside_paths(model_dir: Path, name: str) -> None:
    """Refuse a model whose configuration names files outside its directory (a tokenizer_config.json saying
    "vocab": "/path/to/worker.key" would make the tokenizer read that file and save it with the model), or whose
    modules.json builds anything but sentence-transformers' own modules."""
    sentence_transformers_modules(model_dir, name)
    for file in CONFIG_FILES:
        path = model_dir / file
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise JobError(f"model {name!r}: {file} is not valid JSON ({e})") from e
        for key, value in outside_paths(config):
            raise JobError(
                f"model {name!r} refused: {file} names a file outside the model ({key} = {value!r}); "
                "a model's files may only refer to files inside its own directory"
            )


def sentence_transformers_modules(model_dir: Path, name: str) -> list[dict[str, Any]]:
    """The modules a sentence-transformers model's modules.json lists ([] without one), each a class of
    sentence-transformers itself: the file names the classes the loader imports and builds, so a model naming any
    other (`"type": "os.system"`, a module of its own) is refused before anything loads it."""
    path = model_dir / "modules.json"
    if not path.is_file():
        return []
    try:
        listed = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise JobError(f"model {name!r}: modules.json is not valid JSON ({e})") from e
    if not isinstance(listed, list) or not all(isinstance(m, dict) for m in listed):
        raise JobError(f"model {name!r}: modules.json must be a JSON array of modules")
    for module in listed:
        kind = str(module.get("type", ""))
        if not kind.startswith("sentence_transformers.") or not kind.replace(".", "").replace("_", "").isalnum():
            raise JobError(
                f"model {name!r} refused: modules.json names the module class {kind!r}; a stored or worker model may "
                "only be built from sentence-transformers' own modules (sentence_transformers.…)"
            )
    return listed


def load_sentence_transformer(source: str, name: str, *, token: str | None = None) -> Any:
    """A SentenceTransformer: a sentence-transformers model as it is, or a plain transformers encoder with mean
    pooling added. Never remote code; the modules must be sentence-transformers' own."""
    from sentence_transformers import SentenceTransformer

    if Path(source).is_dir():
        sentence_transformers_modules(Path(source), name)
    try:
        return SentenceTransformer(source, token=token, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise JobError(f"cannot load model {name!r} as a sentence-transformers model: {e}") from e


def load_cross_encoder(source: str, name: str, *, token: str | None = None) -> Any:
    """A CrossEncoder scoring (query, document) with one number: a reranker as it is, or a plain transformers
    encoder with a new 1-label head. A classifier with several labels is refused (it does not score relevance)."""
    from sentence_transformers import CrossEncoder

    if Path(source).is_dir():
        sentence_transformers_modules(Path(source), name)
    try:
        model = CrossEncoder(source, token=token, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise JobError(f"cannot load model {name!r} as a cross-encoder: {e}") from e
    if model.num_labels != 1:
        raise JobError(
            f"model {name!r} is a classifier with {model.num_labels} labels; text-ranking trains a reranker that "
            "scores each (query, document) with one number: start from an encoder (its 1-label head is added) or a "
            "cross-encoder"
        )
    return model


def hub_configs(model_id: str, token: str | None) -> Path:
    """The directory of a hub model's configuration files (fetched, or from the worker's hub cache)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=list(CONFIG_FILES), token=token))
    except Exception as e:  # not found, gated, offline without a cached copy: the loader would fail the same way
        if hub_access.unreachable(e):
            raise JobError(hub_access.unreachable_message(f"fetch model {model_id!r}")) from e
        raise JobError(f"cannot load model {model_id!r}: {type(e).__name__}: {e}") from e


def load_config(source: str, *, token: str | None = None) -> Any:
    """The model's configuration (its limits), or None when it cannot be read: loading the model says why."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, token=token)
    except (OSError, ValueError):
        return None


def load_tokenizer(source: str, *, token: str | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, token=token)
    except (OSError, ValueError) as e:
        raise JobError(f"cannot load the tokenizer of {source!r}: {e}") from e


def load_sequence_classifier(source: str, name: str, *, label_names: list[str], token: str | None = None) -> Any:
    """AutoModelForSequenceClassification with a head for `label_names` (ids in that order)."""
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            token=token,
            ignore_mismatched_sizes=True,
        )
    except OSError as e:
        raise JobError(f"cannot load model {name!r}: {e}") from e


def load_causal_lm(
    source: str,
    *,
    token: str | None = None,
    dtype: str | None = None,
    attn_implementation: str | None = None,
    quantize: str | None = None,
    device: str = "cpu",
) -> Any:
    """AutoModelForCausalLM; `quantize` "8bit" or "4bit" (nf4, double quantization) through bitsandbytes."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"token": token}
    if dtype:
        kwargs["dtype"] = torch_dtype(dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantize:
        from transformers import BitsAndBytesConfig

        if quantize == "4bit":
            compute = torch.float16 if DTYPES.get(dtype or "") == "float16" else torch.bfloat16
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            )
            kwargs.setdefault("dtype", compute)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": torch.cuda.current_device() if device == "cuda" else "cpu"}
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise JobError(f"cannot load model {source!r} as a causal LM: {e}") from e


def peft_module() -> Any:
    try:
        import peft
    except ImportError as e:
        raise JobError("LoRA needs peft on the worker: pip install 'pgml-tuned[lora]'") from e
    return peft


def attach_adapter(model: Any, adapter_dir: str, *, trainable: bool) -> Any:
    """A stored LoRA adapter on its (already loaded) base model."""
    return peft_module().PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)


def is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
