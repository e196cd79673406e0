"""The package's layers: every import points down. A module may import only modules of a lower rank, so
there is no import cycle and no module reaches up (the worker never imports the child or the recipes; the
child loads recipes by name through the task registry). A new module needs a rank here."""

from __future__ import annotations

import ast
from pathlib import Path

import pgml_tuned

PACKAGE = Path(pgml_tuned.__file__).parent

RANKS = {
    # the bottom: pure vocabulary and setup, importing nothing of ours (or only each other's names)
    "pgml_tuned": 0,
    "errors": 0,
    "states": 0,
    "tasks": 0,
    "splits": 0,
    "logconfig": 0,
    "config": 0,
    "secrets": 0,
    "embedded": 0,
    "client_shapes": 1,  # what the client sends and answers, without a connection (its errors: errors)
    "db": 1,
    "listening": 2,  # LISTEN proved to work, or polling (the worker's listener, the serving lane)
    "catalog": 2,  # the schema as normalised text (sql/catalog.sql): scripts/schema_dump, the schema tests
    "hub_access": 1,
    "model_refs": 1,  # what a model_name may be: stored, a hub id, a listed directory (never the worker's state)
    "client_requests": 2,  # the client's round trip of a request: psycopg and sql/client.sql (db.q)
    "client": 3,  # PostgresML's OpenSourceAI (pgml_tuned.OpenSourceAI loads it lazily)
    "files": 2,
    "model_files": 1,  # a model directory checked before it is stored or cached (bring your own model)
    "hub_cache": 2,  # a local model put into a Hugging Face cache under a hub id (`pgml-tuned hub add`)
    "models": 4,
    # the child process
    "child": 4,
    "child.events": 4,
    "child.uploader": 4,
    "child.writes": 4,
    "child.rendezvous": 4,  # where a job's ranks meet: the store's address and the per-attempt secret
    "child.store": 5,
    "child.dist": 5,
    "child.context": 6,
    "child.__main__": 7,
    # the recipes (above the child: they run inside it)
    "recipes": 7,
    "recipes.arg_types": 6,  # training_args value types (errors only)
    "recipes.hf": 7,
    "recipes.rows": 7,
    "recipes.noop": 8,
    "recipes.load_dataset": 8,
    "recipes.predict_batch": 8,
    "recipes.text_classification": 8,
    "recipes.retrieval": 8,  # what the two retrieval recipes share: splits by query, the ranking metrics
    "recipes.text_embedding": 9,
    "recipes.text_ranking": 9,
    "recipes.embed_batch": 9,  # predict_batch's loop over a table, with the serving lane's encoder
    "recipes.conversation.options": 8,
    "recipes.conversation.data": 9,
    "recipes.conversation.model": 10,
    "recipes.conversation.recipe": 11,
    "recipes.conversation": 12,
    # the worker (beside the child: it never imports it)
    "worker": 4,
    "worker.scratch": 3,
    "worker.process": 4,
    "worker.backend": 4,  # the Backend interface
    "worker.gang": 4,
    "worker.pg": 5,  # the Backend in PostgreSQL: the worker's statements
    "worker.fleet": 5,
    "worker.serving": 5,
    "worker.attempt": 5,
    "worker.metrics": 6,
    "worker.heartbeat": 6,
    "worker.daemon": 7,
    # the serving process (beside the child and the worker: neither imports it)
    "serving": 4,
    "serving.lora_rows": 4,  # mixed-adapter batches on stacked LoRA weights (torch and peft only)
    "serving.admission": 5,  # every request's submitter checked against its model, warm or not
    "serving.cache": 5,
    "serving.inference": 6,
    "serving.requests": 7,  # the lane's statements (embed answers as binary real[])
    "serving.server": 8,
    "serving.__main__": 9,
    # the front
    "demo": 8,
    "dashboard": 8,
    "dashboard.server": 8,
    "cli.dsn": 9,  # the database a command talks to, CliError, sql/cli.sql
    "cli.output": 9,
    "cli.jobs": 10,
    "cli.models": 10,
    "cli.admin": 10,
    "cli.services": 10,
    "cli.parser": 11,
    "cli.app": 12,
    "cli": 13,
    "cli.__main__": 13,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or "pgml_tuned"


def imports_of(path: Path) -> set[str]:
    """Our modules that `path` imports (relative or absolute), as RANKS keys."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" and name != "pgml_tuned" else name.split(".")[:-1]
    if name == "pgml_tuned":
        package = []
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else list(package)
                mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("pgml_tuned"):
                mod = node.module.removeprefix("pgml_tuned").lstrip(".")
            else:
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}" if mod else alias.name
                targets.append(sub if sub in RANKS else mod or "pgml_tuned")
        elif isinstance(node, ast.Import):
            targets += [
                a.name.removeprefix("pgml_tuned").lstrip(".") or "pgml_tuned"
                for a in node.names
                if a.name.startswith("pgml_tuned")
            ]
        found.update(targets)
    found.discard(name)
    return found


def test_every_module_has_a_rank() -> None:
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert modules == set(RANKS), f"unranked: {sorted(modules - set(RANKS))}, gone: {sorted(set(RANKS) - modules)}"


def test_imports_point_down() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        for target in imports_of(path):
            assert target in RANKS, f"{name} imports {target!r}, which is not a module of the package"
            if RANKS[target] >= RANKS[name]:
                upward.append(f"{name} (rank {RANKS[name]}) imports {target} (rank {RANKS[target]})")
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_the_worker_never_imports_the_child_or_the_recipes() -> None:
    for path in (PACKAGE / "worker").rglob("*.py"):
        assert not {t for t in imports_of(path) if t.startswith(("child", "recipes", "models"))}, path


def test_the_worker_and_a_noop_child_start_without_torch() -> None:
    """The daemon, the CLI and a child that needs no model never pay for importing torch (seconds)."""
    import subprocess
    import sys

    code = (
        "import sys, pgml_tuned.cli, pgml_tuned.worker.daemon, pgml_tuned.child.__main__, "
        "pgml_tuned.recipes.noop; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
