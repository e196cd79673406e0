"""A model directory's files, checked before pgml-tuned stores them or puts them where workers load from.

Bring-your-own-model (`pgml-tuned models import`, `pgml-tuned hub add`) takes a directory a person copied in; this
module decides whether it may go in, and says how to fix what it refuses:

- weights are safetensors only, each file's header whole and its tensors inside the file: pickle files (.bin, .pt,
  .pth, .pkl, .ckpt, ...) can run code when torch loads them, so they are refused with the command that converts
  them; other weight formats (.h5, .msgpack, .onnx, .gguf) are not loaded;
- no code: no .py (or other code) files, no "auto_map" and no "trust_remote_code" in the configuration files
  (transformers would import the model's own code);
- the configuration files are valid JSON and name no file outside the directory (what models.refuse_outside_paths
  checks before every load);
- config.json (a full model) or adapter_config.json (a PEFT adapter, whose base is named) is there;
- every file is a regular file inside the directory (a symbolic link out of it, e.g. to a key file, is refused);
  hidden files and folders (.git, .cache, .gitattributes) are left out.

The SQL side checks again what it is given (sql/functions/76_imports.sql): this is the first line, with the hints.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Configuration files transformers and peft read (and that name other files to read): checked before loading.
CONFIG_FILES = (
    "config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "adapter_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    # sentence-transformers' (modules.json also names the classes it builds: models.sentence_transformers_modules)
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
# Keys whose values are names, text or token contents, never files the loaders open.
NOT_FILE_KEYS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "base_model_name_or_path",
        "chat_template",
        "added_tokens_decoder",
        "added_tokens",
        "content",
        "id2label",
        "label2id",
    }
)
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"})
CODE_SUFFIXES = frozenset({".py", ".pyc", ".pyo", ".so", ".dll", ".dylib", ".sh", ".exe"})
OTHER_WEIGHTS = frozenset({".h5", ".msgpack", ".onnx", ".gguf", ".ggml", ".tflite", ".ot", ".keras"})
TRAINING_STATE = re.compile(r"^(training_args\.bin|optimizer\.\w+|scheduler\.\w+|rng_state.*)$")
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on a header

# The task of a project an imported model goes into, from its architecture (config.json "architectures") or its
# adapter's task_type: the tasks whose models the serving lane and the recipes load.
ARCHITECTURE_TASKS = (("ForSequenceClassification", "text-classification"), ("ForCausalLM", "conversation"))
PEFT_TASKS = {"SEQ_CLS": "text-classification", "CAUSAL_LM": "conversation"}
IMPORT_TASKS = ("text-classification", "text-pair-classification", "conversation")


class ModelFileError(ValueError):
    """A model directory refused: `message` names the file and the problem, `hint` the fix."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(f"{message}\n  HINT: {hint}")
        self.message = message
        self.hint = hint


def outside_paths(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(key path, value) of every string in a parsed JSON config that names a file outside the model's own
    directory: an absolute path, a home-relative one, or one with a `..` segment."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k not in NOT_FILE_KEYS:
                yield from outside_paths(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from outside_paths(v, f"{where}[{i}]")
    elif isinstance(value, str):
        if value.startswith(("/", "~", "\\")) or _DRIVE.match(value) or ".." in re.split(r"[\\/]", value):
            yield where, value


def _has_key(value: Any, key: str) -> Any:
    """The value of `key` anywhere in a parsed JSON document (None when it is nowhere)."""
    if isinstance(value, dict):
        if key in value:
            return value[key] if value[key] is not None else True
        value = list(value.values())
    if isinstance(value, list):
        for v in value:
            found = _has_key(v, key)
            if found is not None:
                return found
    return None


@dataclass(frozen=True)
class ModelDir:
    root: Path  # the real path of the directory
    files: tuple[tuple[str, Path, int], ...]  # (relative posix path, path, bytes), sorted
    configs: dict[str, Any]  # the configuration files, parsed (by name)

    @property
    def adapter(self) -> bool:
        return "adapter_config.json" in self.configs

    @property
    def base_model(self) -> str | None:
        """What an adapter names as its base (base_model_name_or_path); None for a full model."""
        base = self.configs.get("adapter_config.json", {}).get("base_model_name_or_path")
        return str(base) if base else None

    @property
    def bytes(self) -> int:
        return sum(size for _, _, size in self.files)

    def task(self) -> str | None:
        """The task its architecture (or an adapter's task_type) says, None when it says none we know."""
        if self.adapter:
            return PEFT_TASKS.get(str(self.configs["adapter_config.json"].get("task_type") or ""))
        for arch in self.configs.get("config.json", {}).get("architectures") or []:
            for suffix, task in ARCHITECTURE_TASKS:
                if str(arch).endswith(suffix):
                    return task
        return None

    def manifest(self) -> list[dict[str, Any]]:
        return [{"path": rel, "bytes": size} for rel, _, size in self.files]


def file_refusal(rel: str) -> ModelFileError | None:
    """Why a file (by its path in the model directory) may not be imported, or None."""
    name = rel.rsplit("/", 1)[-1]
    suffix = Path(name).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if TRAINING_STATE.match(name.lower()):
            return ModelFileError(
                f"{rel} is a pickle file of the training state (not part of the model)", f"delete {rel}"
            )
        return ModelFileError(
            f"{rel} is a pickle file: pickled weights can run code when they are loaded, so only safetensors weights "
            "are imported",
            f'convert it to safetensors, then delete {rel}: python -c "import transformers as t; '
            "m = t.AutoModel.from_pretrained('DIR', use_safetensors=False); "
            "m.save_pretrained('DIR', safe_serialization=True)\" (the AutoModelFor... class of its kind: "
            "AutoModelForSequenceClassification, AutoModelForCausalLM; for a PEFT adapter, PeftModel's "
            "save_pretrained(DIR, safe_serialization=True))",
        )
    if suffix in CODE_SUFFIXES:
        return ModelFileError(
            f"{rel} is code: models that need their own code (trust_remote_code) are never loaded by pgml-tuned",
            f"import a model of an architecture transformers has built in, without {rel}",
        )
    if suffix in OTHER_WEIGHTS:
        return ModelFileError(
            f"{rel} holds weights in a format pgml-tuned does not load (safetensors only)",
            "save the model with transformers as safetensors (save_pretrained(DIR, safe_serialization=True)), or "
            f"delete {rel} if the directory has safetensors weights too",
        )
    return None


def check_safetensors(path: Path, rel: str) -> None:
    """The header of a safetensors file is whole, valid JSON, and its tensors lie inside the file."""
    size = path.stat().st_size
    bad = ModelFileError(
        f"{rel} is not a whole safetensors file",
        "save the weights again with save_pretrained(DIR, safe_serialization=True)",
    )
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise bad
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise bad
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            raise bad from None
    if not isinstance(header, dict):
        raise bad
    ends = [
        int(t["data_offsets"][1])
        for k, t in header.items()
        if k != "__metadata__" and isinstance(t, dict) and isinstance(t.get("data_offsets"), list)
    ]
    if 8 + n + max(ends, default=0) != size:
        raise ModelFileError(
            f"{rel}: its header describes {max(ends, default=0)} bytes of tensors, the file holds {size - 8 - n} "
            "(cut short, or not a safetensors file)",
            "copy the file again, or save the weights again with save_pretrained(DIR, safe_serialization=True)",
        )


def _entries(root: Path) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        for d in dirnames:
            if (here / d).is_symlink():
                yield (here / d).relative_to(root).as_posix(), here / d
        for name in sorted(filenames):
            if not name.startswith("."):
                yield (here / name).relative_to(root).as_posix(), here / name


def inspect(directory: Path) -> ModelDir:
    """The checked model directory (a ModelFileError naming the first problem and its fix)."""
    if not directory.is_dir():
        raise ModelFileError(f"{directory} is not a directory", "name the directory save_pretrained wrote")
    root = Path(os.path.realpath(directory))
    found: list[tuple[str, Path, int]] = []
    for rel, path in _entries(root):
        real = Path(os.path.realpath(path))
        if path.is_symlink() and not real.is_relative_to(root):
            raise ModelFileError(
                f"{rel} is a symbolic link to {real}, outside the model directory",
                f"copy the file itself into {directory} (or delete the link)",
            )
        if path.is_dir():
            continue  # a link to a folder inside: its files are found under their own names
        if not real.is_file():
            raise ModelFileError(f"{rel} is not a regular file", f"delete {rel}")
        refusal = file_refusal(rel)
        if refusal is not None:
            raise refusal
        found.append((rel, path, real.stat().st_size))
    names = {rel for rel, _, _ in found}
    configs: dict[str, Any] = {}
    for name in CONFIG_FILES:
        if name not in names:
            continue
        try:
            config = json.loads((root / name).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelFileError(f"{name} is not valid JSON ({e})", f"fix or delete {name}") from None
        if _has_key(config, "auto_map") is not None:
            raise ModelFileError(
                f'{name} has an "auto_map": the model needs code of its own (trust_remote_code), which pgml-tuned '
                "never runs",
                f'import a model of an architecture transformers has built in; if it is one, delete "auto_map" '
                f"from {name}",
            )
        if _has_key(config, "trust_remote_code") is True:
            raise ModelFileError(
                f"{name} sets trust_remote_code: pgml-tuned never runs a model's own code",
                f"delete trust_remote_code from {name}",
            )
        for key, value in outside_paths(config):
            raise ModelFileError(
                f"{name} names a file outside the model ({key} = {value!r})",
                "a model's files may only refer to files inside its own directory: use a relative file name",
            )
        configs[name] = config
    if "config.json" not in configs and "adapter_config.json" not in configs:
        raise ModelFileError(
            f"{directory} has no config.json (nor adapter_config.json): it is not a saved transformers model or "
            "PEFT adapter",
            "import the directory save_pretrained wrote (config.json, model.safetensors, the tokenizer's files), "
            "or an adapter's (adapter_config.json, adapter_model.safetensors)",
        )
    weights = [(rel, path) for rel, path, _ in found if rel.endswith(".safetensors")]
    if not weights:
        raise ModelFileError(
            f"{directory} has no .safetensors weights",
            "save the model with save_pretrained(DIR, safe_serialization=True) and import that directory",
        )
    for rel, path in weights:
        check_safetensors(path, rel)
    return ModelDir(root, tuple(found), configs)
