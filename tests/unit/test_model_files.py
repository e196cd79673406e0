"""Bring your own model, without a database: the checks of a model directory (pgml_tuned.model_files) and
`pgml-tuned hub add` (pgml_tuned.hub_cache), whose result transformers loads offline by the hub id."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pgml_tuned import hub_cache
from pgml_tuned.model_files import ModelFileError, inspect
from tests.support.models import build_tiny_classifier_base, build_tiny_llama


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_classifier_base(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def copy_of(model: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(model, dest)
    return dest


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgml_tuned.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})},
    )


def test_a_saved_model_passes(tiny_bert: Path, tiny_llama: Path) -> None:
    bert = inspect(tiny_bert)
    assert not bert.adapter and bert.base_model is None
    assert {"config.json", "model.safetensors"} <= {rel for rel, _, _ in bert.files}
    assert inspect(tiny_llama).task() == "conversation"


def edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def pickle_bin(d: Path) -> None:
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")


def training_args(d: Path) -> None:
    (d / "training_args.bin").write_bytes(b"\x80\x04")


def code_file(d: Path) -> None:
    (d / "modeling_evil.py").write_text("import os\n")


def auto_map(d: Path) -> None:
    edit_json(d / "config.json", auto_map={"AutoModel": "modeling_evil.EvilModel"})


def remote_code(d: Path) -> None:
    edit_json(d / "tokenizer_config.json", trust_remote_code=True)


def outside(d: Path) -> None:
    edit_json(d / "tokenizer_config.json", vocab_file="/etc/passwd")


def no_config(d: Path) -> None:
    (d / "config.json").unlink()


def cut_weights(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def link_out(d: Path) -> None:
    (d / "vocab.txt").symlink_to("/etc/hostname")


def gguf(d: Path) -> None:
    (d / "model.gguf").write_bytes(b"GGUF")


@pytest.mark.parametrize(
    ("spoil", "message", "hint"),
    [
        (pickle_bin, "pytorch_model.bin is a pickle file", "safe_serialization=True"),
        (training_args, "training_args.bin is a pickle file of the training state", "delete training_args.bin"),
        (code_file, "modeling_evil.py is code", "built in"),
        (auto_map, 'config.json has an "auto_map"', 'delete "auto_map"'),
        (remote_code, "tokenizer_config.json sets trust_remote_code", "delete trust_remote_code"),
        (outside, "names a file outside the model", "relative file name"),
        (no_config, "has no config.json", "save_pretrained"),
        (cut_weights, "model.safetensors", "safe_serialization=True"),
        (link_out, "vocab.txt is a symbolic link", "copy the file itself"),
        (gguf, "model.gguf holds weights in a format", "safetensors"),
    ],
)
def test_refusals_name_the_file_and_the_fix(
    tiny_bert: Path, tmp_path: Path, spoil: object, message: str, hint: str
) -> None:
    d = copy_of(tiny_bert, tmp_path)
    spoil(d)  # type: ignore[operator]
    with pytest.raises(ModelFileError) as e:
        inspect(d)
    assert message in e.value.message and hint in e.value.hint


def test_hidden_files_are_left_out(tiny_bert: Path, tmp_path: Path) -> None:
    d = copy_of(tiny_bert, tmp_path)
    (d / ".git").mkdir()
    (d / ".git" / "pack.bin").write_bytes(b"\x80")
    (d / ".gitattributes").write_text("*.bin lfs\n")
    assert not [rel for rel, _, _ in inspect(d).files if rel.startswith(".")]


# ---- hub add ----
OFFLINE_CHECK = textwrap.dedent(
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    AutoModel.from_pretrained("pgml-test/tiny-bert")
    bert = AutoModelForSequenceClassification.from_pretrained("pgml-test/tiny-bert", num_labels=2)
    bert_tok = AutoTokenizer.from_pretrained("pgml-test/tiny-bert")
    with torch.no_grad():
        print("bert", tuple(bert(**bert_tok(["the film"], return_tensors="pt")).logits.shape))
    llama = AutoModelForCausalLM.from_pretrained("tiny-llama")
    llama_tok = AutoTokenizer.from_pretrained("tiny-llama")
    print("llama", llama_tok.chat_template is not None, llama_tok.eos_token)
    try:
        AutoTokenizer.from_pretrained("pgml-test/not-installed")
    except OSError:
        print("missing raises")
    """
)


def test_hub_add_layout_and_idempotence(tiny_bert: Path, tmp_path: Path) -> None:
    home = tmp_path / "hf"
    first = cli("hub", "add", str(tiny_bert), "--as", "pgml-test/tiny-bert", "--hf-home", str(home))
    assert first.returncode == 0, first.stderr
    repo = home / "hub" / "models--pgml-test--tiny-bert"
    revision = (repo / "refs" / "main").read_text()
    assert re.fullmatch(r"[0-9a-f]{40}", revision)
    snapshot = repo / "snapshots" / revision
    assert f"added pgml-test/tiny-bert in the Hugging Face cache {home / 'hub'}" in first.stdout
    assert "SELECT pgml.hub_allow('pgml-test/tiny-bert');" in first.stdout
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(p.name for p in tiny_bert.iterdir())
    for link in snapshot.iterdir():
        assert link.read_bytes() == (tiny_bert / link.name).read_bytes()
        assert link.is_symlink() and link.resolve().parent == (repo / "blobs").resolve()
    assert not [p for p in (repo / "snapshots").iterdir() if p.name.startswith(".")]  # no staging left

    again = cli("hub", "add", str(tiny_bert), "--as", "pgml-test/tiny-bert", "--hf-home", str(home))
    assert again.returncode == 0 and "already there, unchanged" in again.stdout
    assert sorted(p.name for p in (repo / "snapshots").iterdir()) == [revision]

    changed = copy_of(tiny_bert, tmp_path)
    edit_json(changed / "config.json", id2label={"0": "no", "1": "yes"})
    assert hub_cache.add(changed, "pgml-test/tiny-bert", home).changed
    assert (repo / "refs" / "main").read_text() != revision  # refs/main points at the new snapshot


@pytest.mark.parametrize("bad", ["a/b/c", "org/../x", "org--x/y", "/abs/path", "bad id", "x" * 97])
def test_hub_add_refuses_a_bad_repo_id(tiny_bert: Path, tmp_path: Path, bad: str) -> None:
    out = cli("hub", "add", str(tiny_bert), "--as", bad, "--hf-home", str(tmp_path / "hf"))
    assert out.returncode == 1
    assert "is not a hub id" in out.stderr and "HINT: write ORG/NAME" in out.stderr
    assert not (tmp_path / "hf").exists()


def test_hub_add_refuses_what_import_refuses(tiny_bert: Path, tmp_path: Path) -> None:
    d = copy_of(tiny_bert, tmp_path)
    pickle_bin(d)
    out = cli("hub", "add", str(d), "--as", "org/name", "--hf-home", str(tmp_path / "hf"))
    assert out.returncode == 1
    assert "pytorch_model.bin is a pickle file" in out.stderr and "HINT: convert it to safetensors" in out.stderr
    assert not (tmp_path / "hf").exists()


def test_hub_add_loads_offline_by_its_id(tiny_bert: Path, tiny_llama: Path, tmp_path: Path) -> None:
    """What the brief of `hub add` promises: from_pretrained('ORG/NAME') with HF_HUB_OFFLINE=1, HF_HOME that dir."""
    home = tmp_path / "hf"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path))
    for model, repo_id in ((tiny_bert, "pgml-test/tiny-bert"), (tiny_llama, "tiny-llama")):
        out = subprocess.run(
            [sys.executable, "-m", "pgml_tuned.cli", "hub", "add", str(model), "--as", repo_id],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert str(home / "hub") in out.stdout  # the default: this process's HF_HOME
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_CHECK], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["bert (1, 2)", "llama True </s>", "missing raises"]
