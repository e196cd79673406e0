"""The argument parser of `pgml-tuned`: one subcommand each, and a --flag for each Settings field (config.py)
that has one, typed and helped by it."""

from __future__ import annotations

import argparse
from dataclasses import fields

from .. import __version__
from ..config import Settings, field_type
from .admin import cmd_db, cmd_gc, cmd_keys, cmd_migrate
from .jobs import cmd_cancel, cmd_logs, cmd_status, cmd_wait
from .models import cmd_download, cmd_hub_add, cmd_import
from .services import cmd_dashboard, cmd_demo, cmd_serve

DESCRIPTION = """`pgml-tuned`: migrate, serve, demo, status, wait, logs, cancel, download, models import, hub add,
dashboard, gc, db, keys.

The DSN comes from --dsn, else PGML_DSN, else the embedded PostgreSQL under $PGML_HOME.
"""


COMMON_SETTINGS = ("dsn", "home", "log_format", "log_level")  # every command takes these; serve takes all


def add_setting_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """A --flag for each named Settings field (all that have one when names is None), typed and helped by it."""
    for f in fields(Settings):
        if not f.metadata.get("flag", True) or (names is not None and f.name not in names):
            continue
        kind = field_type(f)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind if kind in (int, float) else str,
            choices=f.metadata.get("choices"),
            help=f.metadata.get("help"),
            metavar=None if f.metadata.get("choices") else f.name.split("_")[-1].upper(),
        )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add_setting_flags(common, COMMON_SETTINGS)

    p = argparse.ArgumentParser(prog="pgml-tuned", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"pgml-tuned {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("migrate", parents=[common], help="install/upgrade the pgml schema (idempotent)").set_defaults(
        fn=cmd_migrate
    )

    s = sub.add_parser("serve", parents=[common], help="run the training daemon")
    s.add_argument("--drain", action="store_true", help="run queued jobs, exit 0 when the queue is empty")
    add_setting_flags(s, tuple(f.name for f in fields(Settings) if f.name not in COMMON_SETTINGS))
    s.add_argument(
        "--allow-superuser",
        action="store_true",
        help="serve even as a login that bypasses row-level security (a superuser, BYPASSRLS, a member of "
        "pgml_owner; or PGML_ALLOW_SUPERUSER=1): a throwaway test database only; refused otherwise, with the SQL "
        "of a worker login",
    )
    s.add_argument(
        "--migrate",
        action="store_true",
        help="apply pending migrations first (needs an administrator's DSN; workers normally run with the "
        "pgml_worker role, and an administrator runs `pgml-tuned migrate`)",
    )
    s.set_defaults(fn=cmd_serve)

    d = sub.add_parser("demo", parents=[common], help="end-to-end fine-tune on bundled data, offline")
    d.add_argument("--epochs", type=float, default=3.0, help="training epochs of the demo's fine-tune (default 3)")
    d.set_defaults(fn=cmd_demo)

    st = sub.add_parser("status", parents=[common], help="queue summary and recent jobs, or one job")
    st.add_argument("job", type=int, nargs="?", help="a job id: print that job's whole row as JSON")
    st.add_argument("--limit", type=int, default=20, help="show at most this many of the latest jobs (default 20)")
    st.add_argument(
        "--json", action="store_true", help="print the queue summary and the jobs as JSON (intervals in seconds)"
    )
    st.set_defaults(fn=cmd_status)

    lg = sub.add_parser(
        "logs",
        parents=[common],
        help='print a job\'s log rows (JSON lines: training rows, and its info/warning/error lines with a "kind" '
        'and a "message"); exit 1 if it failed or was cancelled',
    )
    lg.add_argument("job", type=int, help="the job id (pgml.tune's job_id)")
    lg.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="keep printing until the job ends, with its live progress line and final line (model id, download "
        "command) on stderr",
    )
    lg.set_defaults(fn=cmd_logs)

    w = sub.add_parser(
        "wait",
        parents=[common],
        help="follow jobs to their end with a live progress line each (step, %%, ETA, loss, eval metrics), then "
        "their metrics, model id and download command; exit 1 if one failed or was cancelled",
    )
    w.add_argument("jobs", type=int, nargs="+", metavar="job", help="the job ids (pgml.tune's job_id)")
    w.add_argument(
        "--interval",
        type=float,
        default=10.0,
        help="when stdout is not a terminal: print a job's progress line at most this often, in seconds (default 10)",
    )
    w.set_defaults(fn=cmd_wait)

    c = sub.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    c.add_argument("job", type=int, help="the job id (pgml.tune's job_id)")
    c.set_defaults(fn=cmd_cancel)

    dl = sub.add_parser("download", parents=[common], help="reassemble a model's files from pgml.files")
    dl.add_argument("model_id", type=int, help="the model id (pgml.jobs.model_id, `pgml-tuned status`), not a job id")
    dl.add_argument("dest", help="directory to write the model's files into (created if missing)")
    dl.set_defaults(fn=cmd_download)

    mo = sub.add_parser("models", help="models import DIR --project NAME: bring your own model into pgml.files")
    mo_sub = mo.add_subparsers(
        dest="models_command", required=True, help="import: a local model directory into pgml.files"
    )
    mi = mo_sub.add_parser(
        "import",
        parents=[common],
        help="store a local model directory (or PEFT adapter) as the deployed model of a project: pgml:NAME",
        description="Stores the model saved in DIR (config.json and safetensors weights, the tokenizer's files; or a "
        "PEFT adapter: adapter_config.json and adapter_model.safetensors) in pgml.files as a model of project NAME "
        "(yours; created if needed) and deploys it, in one transaction: pgml:NAME then serves it (pgml.transform, "
        "chat) and starts fine-tunes from it on every worker, with no hub. Refused, before anything is written: "
        "pickle files (.bin, .pt, ...: convert them to safetensors), code (.py, auto_map, trust_remote_code), "
        "configuration naming files outside DIR, a directory without config.json.",
    )
    mi.add_argument("dir", help="the model directory (what save_pretrained wrote)")
    mi.add_argument("--project", required=True, help="the project: the model is then pgml:PROJECT")
    mi.add_argument(
        "--task",
        choices=["text-classification", "text-pair-classification", "conversation"],
        help="the project's task (default: from config.json's architectures: *ForSequenceClassification → "
        "text-classification, *ForCausalLM → conversation; an adapter's task_type)",
    )
    mi.add_argument(
        "--base",
        help="an adapter's base model (default: base_model_name_or_path of adapter_config.json): pgml:<project>, "
        "pgml:model:<id>, a hub id on the allow-list, or a directory under the workers' model directories",
    )
    mi.add_argument(
        "--owner",
        help="administrators: import into this login's project (its pgml:PROJECT), not your own",
    )
    mi.set_defaults(fn=cmd_import)

    hub = sub.add_parser("hub", help="hub add DIR --as ORG/NAME: a local model in the workers' Hugging Face cache")
    hub_sub = hub.add_subparsers(
        dest="hub_command", required=True, help="add: a local model directory into a Hugging Face cache"
    )
    ha = hub_sub.add_parser(
        "add",
        help="put a local model directory into the Hugging Face cache under a hub id, for workers offline",
        description="Copies the model saved in DIR into a Hugging Face hub cache (huggingface_hub's layout: "
        "models--ORG--NAME/blobs, snapshots/<revision>, refs/main), so that workers load it by its hub id with "
        "HF_HUB_OFFLINE=1, as if they had downloaded it. Run it on each worker host (or on a shared cache). The same "
        "checks as `models import` (safetensors only, no code); atomic; adding the same files again changes nothing. "
        "The hub allow-list (pgml.hub_allowlist) still applies to the id.",
    )
    ha.add_argument("dir", help="the model directory (what save_pretrained wrote)")
    ha.add_argument("--as", dest="repo_id", required=True, metavar="ORG/NAME", help="the hub id to load it by")
    ha.add_argument(
        "--hf-home",
        help="the Hugging Face home whose hub cache (HF_HOME/hub) gets it (default: this process's, as "
        "huggingface_hub finds it: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub; run it with "
        "the worker's environment)",
    )
    ha.set_defaults(fn=cmd_hub_add)

    dash = sub.add_parser(
        "dashboard",
        parents=[common],
        help="a read-only web page: jobs, live loss/eval curves, two models side by side, a model's files",
    )
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    dash.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765; 0: any free port)")
    dash.set_defaults(fn=cmd_dashboard)

    k = sub.add_parser(
        "keys",
        parents=[common],
        help="sealing keys of inline tokens (administrators): generate --out FILE, register FILE, list, "
        "activate KEY_ID, retire KEY_ID",
    )
    k.add_argument(
        "action", choices=["generate", "register", "list", "activate", "retire"], help="what to do with the keys"
    )
    k.add_argument("file", nargs="?", help="register: the private key file; activate/retire: the key id")
    k.add_argument("--out", help="generate: the new private key file (never overwritten)")
    k.add_argument("--bits", type=int, default=3072, help="generate: RSA key size (default 3072)")
    k.add_argument("--no-activate", action="store_true", help="register: do not make it the sealing key yet")
    k.set_defaults(fn=cmd_keys)

    g = sub.add_parser(
        "gc",
        parents=[common],
        help="show (and with --apply free) what old jobs hold: unused model files, old log rows, leftovers of "
        "ended jobs (administrators)",
        description="Lists what pgml.gc would free, as an administrator's login (a member of pgml_admin). Model "
        "files: a project keeps its deployed model, its best model (the deployment metric), its --keep-last newest "
        "successful models and every model another one is based on or a queued job starts from; the files of its "
        "other models are freed (their rows, metrics and logs stay). Log rows: older than --logs-older-than. Ended "
        "jobs: checkpoints and the copy of the training rows (those kept by materialize_snapshot only with "
        "--include-kept). Dry run unless --apply.",
    )
    g.add_argument("--apply", action="store_true", help="delete what is listed (default: only list it)")
    g.add_argument(
        "--keep-last", type=int, default=1, help="successful models to keep per project, newest first (default 1)"
    )
    g.add_argument("--logs-older-than", metavar="AGE", help="also free log rows older than AGE (30d, 12h, 2w, 90min)")
    g.add_argument(
        "--include-kept",
        action="store_true",
        help="also free checkpoints and training rows that tune(materialize_snapshot => true) kept",
    )
    g.set_defaults(fn=cmd_gc)

    e = sub.add_parser("db", parents=[common], help="the embedded PostgreSQL: psql command, dsn, stop")
    e.add_argument(
        "action",
        choices=["psql", "dsn", "stop"],
        help="psql: print the command that connects to it; dsn: print its DSN; stop: stop the server",
    )
    e.set_defaults(fn=cmd_db)
    return p
