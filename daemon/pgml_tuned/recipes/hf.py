"""Hugging Face plumbing shared by the recipes: TrainingArguments from hyperparams, the callback that
streams logs into PostgreSQL, hub settings, and the train → evaluate → save → store sequence."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback, TrainingArguments

from ..child.context import JobContext
from ..child.dist import on_cpu
from ..errors import JobError
from ..hub_access import hub_offline
from ..secrets import SECRET_KEYS
from ..states import requested_nodes
from .arg_types import check_training_arg_types

# Keys older tutorials use that transformers 5 renamed.
RENAMED = {"evaluation_strategy": "eval_strategy", "no_cuda": "use_cpu", "tokenizer": "processing_class"}
# Keys we set ourselves: training runs in a scratch directory and logs go to pgml.logs.
MANAGED = ("output_dir", "logging_dir")


def allowed_reporters() -> frozenset[str]:
    """report_to integrations the operator allows (PGML_ALLOWED_REPORTERS, comma-separated)."""
    return frozenset(r.strip() for r in os.environ.get("PGML_ALLOWED_REPORTERS", "").split(",") if r.strip())


def model_token(ctx: JobContext) -> str | None:
    """The token for downloading gated/private models (never stored or logged)."""
    return ctx.secret(*SECRET_KEYS, "training_args.hub_token")


# training_args keys that can name a file on the worker: only inline values (JSON objects) are accepted.
FILE_VALUED = ("deepspeed", "fsdp_config", "accelerator_config", "resume_from_checkpoint")
# report_to integrations that keep everything on the worker (none does: the curves are in pgml.logs).
LOCAL_REPORTERS = frozenset({"none"})


def check_outward(
    given: dict[str, Any], *, job_token: bool, offline: bool, allowed_reporters: frozenset[str] = frozenset()
) -> None:
    """Refuse training_args that reach outside the job: files on the worker, services the operator has not
    allowed, or the hub with anything but the job's own credential."""
    for key in FILE_VALUED:
        value = given.get(key)
        if isinstance(value, str) and value:
            raise JobError(
                f"training_args.{key} names a file ({value!r}); a job may not read the worker's files: "
                + (
                    "pgml-tuned resumes from the job's stored checkpoints by itself"
                    if key == "resume_from_checkpoint"
                    else f'give "{key}" inline, as a JSON object'
                )
            )
    reporters = given.get("report_to")
    names = [reporters] if isinstance(reporters, str) else list(reporters or [])
    for name in names:
        if name not in LOCAL_REPORTERS | allowed_reporters:
            raise JobError(
                f"training_args.report_to {name!r} would send the job's metrics to a service outside pgml-tuned, "
                "which this worker does not allow; every log is in pgml.logs — remove report_to (an operator can "
                "allow integrations with PGML_ALLOWED_REPORTERS)"
            )
    if given.get("push_to_hub") and not offline and not job_token:
        raise JobError(
            "training_args.push_to_hub needs the job's own Hugging Face token (a worker never pushes with its own "
            'login): add "hub_token": "hf_..." to training_args, or leave push_to_hub out — the model is stored '
            "in pgml.files either way"
        )


def model_limit(tokenizer: Any, config: Any) -> tuple[int, str] | None:
    """The most tokens the model takes at once, and where that limit comes from: the smaller of the tokenizer's
    model_max_length (when it is a real limit, not transformers' "no limit" sentinel) and the configuration's
    max_position_embeddings (n_positions for GPT-2-like models)."""
    limits = []
    for source in (config, getattr(config, "get_text_config", lambda: None)()):
        for attr in ("max_position_embeddings", "n_positions"):
            value = getattr(source, attr, None)
            if isinstance(value, int) and value > 0:
                limits.append((value, f"its config's {attr}"))
                break
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 1_000_000:
        limits.append((value, "its tokenizer's model_max_length"))
    return min(limits) if limits else None


def check_max_seq_length(ctx: JobContext, tokenizer: Any, config: Any) -> None:
    """hyperparams.max_seq_length above the model's limit fails before training, naming the limit (not later
    as `The size of tensor a (962) must match the size of tensor b (512)`)."""
    requested = ctx.hyperparams.get("max_seq_length")
    limit = model_limit(tokenizer, config)
    if isinstance(requested, int | float) and limit and requested > limit[0]:
        raise JobError(
            f"hyperparams.max_seq_length {int(requested)} is more than model {ctx.spec['model_name']!r} takes: "
            f'at most {limit[0]} tokens ({limit[1]}); use "max_seq_length": {limit[0]} or less, or leave it out'
        )


def check_training_args(ctx: JobContext) -> None:
    """hyperparams.training_args as TrainingArguments takes them: known keys ("did you mean"), values of the
    types it declares, nothing reaching outside the job. Recipes call it before they read data."""
    given = ctx.training_args
    allowed = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    for key in given:
        if key not in allowed:
            hint = RENAMED.get(key) or next(iter(difflib.get_close_matches(key, allowed, n=1)), None)
            raise JobError(
                f"unknown training_args key {key!r}"
                + (f"; did you mean {hint!r}?" if hint else "")
                + " (see transformers.TrainingArguments)"
            )
    check_training_arg_types(given, frozenset(SECRET_KEYS))
    check_outward(
        given,
        job_token=ctx.secret("training_args.hub_token", "hub_token", "token") is not None,
        offline=hub_offline(),
        allowed_reporters=allowed_reporters(),
    )


def training_arguments(
    ctx: JobContext,
    *,
    n_train: int,
    overrides: dict[str, Any] | None = None,
    cls: type[TrainingArguments] = TrainingArguments,
) -> TrainingArguments:
    """TrainingArguments from hyperparams.training_args, passed through exhaustively.

    An unknown key fails the job naming it. Defaults that differ from transformers': logging every
    ~5% of training (at most every 500 steps) so progress shows in pgml.logs; no local checkpoints unless
    asked for (they are stored in PostgreSQL when save_strategy/save_steps is given); no progress bars. `cls`: a
    subclass the recipe's Trainer needs (sentence-transformers' arguments), built from the same keys.
    """
    given = ctx.training_args
    check_training_args(ctx)
    args: dict[str, Any] = {k: v for k, v in given.items() if k not in MANAGED}
    for k in MANAGED:
        if k in given:
            ctx.info(f"training_args.{k} is managed by pgml-tuned and was ignored", level="warning")

    batch = (
        int(args.get("per_device_train_batch_size", 8))
        * int(args.get("gradient_accumulation_steps", 1))
        * ctx.rank.world_size
    )
    epochs = float(args.get("num_train_epochs", 3))
    total = (
        int(args["max_steps"])
        if int(args.get("max_steps", -1) or -1) > 0
        else max(1, int(epochs * -(-n_train // max(1, batch))))
    )
    args.setdefault("logging_steps", max(1, min(500, total // 20)))
    if "save_strategy" not in given and "save_steps" not in given:
        args["save_strategy"] = "no"
    args.setdefault("disable_tqdm", True)
    args.setdefault("report_to", "none")
    chosen = speed_defaults(given, gpu_capabilities(ctx), weights_dtype=str(ctx.hyperparams.get("torch_dtype") or ""))
    if chosen:
        args.update(chosen)
        ctx.info(
            "chosen for speed on this GPU: "
            + ", ".join(f"{k}={v!r}" for k, v in chosen.items())
            + " (set any of them in training_args to choose otherwise)",
            speed_defaults=chosen,
        )

    if args.get("push_to_hub"):
        if hub_offline():
            args["push_to_hub"] = False
            message = "push_to_hub ignored: this worker runs with HF_HUB_OFFLINE=1; the model is stored in pgml.files"
            ctx.info(message, level="warning")
        else:
            args.setdefault("hub_model_id", ctx.spec["project_name"])
            token = ctx.secret("training_args.hub_token", "hub_token", "token")
            if token:
                # through this process's environment, not TrainingArguments: the Trainer pickles its arguments
                # into training_args.bin, which is stored with the model and every checkpoint
                os.environ["HF_TOKEN"] = token
    if ctx.rank.distributed and on_cpu(ctx.hyperparams):
        args["use_cpu"] = True  # resources.procs: ranks on CPUs (gloo), whatever GPUs the machine has
        if given.get("fsdp") or given.get("deepspeed"):
            # accelerate shards (FSDP) or hands over to DeepSpeed only on accelerators; on CPU ranks it runs DDP
            which = "fsdp" if given.get("fsdp") else "deepspeed"
            message = (
                f"training_args.{which} applies to GPU ranks (resources.gpus); these CPU ranks "
                "(resources.procs) train with DDP: every rank holds the whole model"
            )
            ctx.info(message, level="warning")
            ctx.log({"warning": message})
    elif requested_nodes(ctx.hyperparams) > 1:
        check_across_hosts(given)
    args.update(overrides or {})
    args["output_dir"] = str(ctx.output_root / "trainer")
    try:
        return cls(**args)
    except (ValueError, TypeError, ImportError) as e:
        raise JobError(f"training_args rejected by transformers: {e}") from e


@dataclasses.dataclass(frozen=True)
class Gpu:
    """What the job's GPU supports, as far as the speed defaults care."""

    bf16: bool = False  # bfloat16 mixed precision (Ampere and newer)
    tf32: bool = False  # TF32 matmuls (compute capability 8.0 and newer)
    loader_workers: int = 0  # data-loader processes this rank can give a CPU core each (0: batches on the main thread)


def gpu_capabilities(ctx: JobContext) -> Gpu | None:
    """The job's GPU, or None when it trains on CPUs (no GPU, use_cpu, resources.procs)."""
    if ctx.training_args.get("use_cpu") or (ctx.rank.distributed and on_cpu(ctx.hyperparams)):
        return None
    return this_gpu()


def this_gpu() -> Gpu | None:
    """What this process's CUDA device offers (bf16, TF32), or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, _ = torch.cuda.get_device_capability()
    return Gpu(bf16=bool(torch.cuda.is_bf16_supported()), tf32=major >= 8, loader_workers=spare_loader_workers())


def spare_loader_workers(most: int = 2) -> int:
    """Data-loader processes for this rank: up to `most`, while every rank on this host keeps a core of its own
    (LOCAL_WORLD_SIZE ranks share the cores this process may run on)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    return max(0, min(most, cores // ranks_here - 1))


def speed_defaults(given: dict[str, Any], gpu: Gpu | None, *, weights_dtype: str = "") -> dict[str, Any]:
    """On a GPU, what makes the Trainer fast, for each setting the user did not give (the guide's training_args give
    none of them): bf16 mixed precision where the GPU has it (not over float16 weights), TF32 matmuls, the fused
    AdamW kernel, an evaluation batch twice the training one (no gradients to hold), batches prepared by data-loader
    processes where the host has cores to spare. transformers 5 already loads models with SDPA attention and the
    recipes pad each batch to its longest row. Nothing on CPUs."""
    if gpu is None:
        return {}
    chosen: dict[str, Any] = {}
    precision = {"bf16", "fp16", "bf16_full_eval", "fp16_full_eval"} & set(given)
    if gpu.bf16 and not precision and weights_dtype != "float16":
        chosen["bf16"] = True
    if gpu.tf32 and "tf32" not in given:
        chosen["tf32"] = True
    if "optim" not in given:
        chosen["optim"] = "adamw_torch_fused"
    if "per_device_eval_batch_size" not in given:
        chosen["per_device_eval_batch_size"] = 2 * int(given.get("per_device_train_batch_size", 8))
    if gpu.loader_workers and "dataloader_num_workers" not in given:
        # padding and collating a batch on the main thread costs ~9 ms of a step's CPU time (DistilBERT-sized, batch
        # 16 × 512 tokens, H200 host), which the GPU then waits for: loader processes prepare the next batches
        chosen["dataloader_num_workers"] = gpu.loader_workers
        if "dataloader_persistent_workers" not in given:
            chosen["dataloader_persistent_workers"] = True  # not restarted for every epoch and evaluation
    return chosen


def check_across_hosts(given: dict[str, Any]) -> None:
    """A job across several hosts (resources.nodes) stores the checkpoints its rank 0 writes, on the leader's host:
    DDP (rank 0 writes the whole state) and FSDP with a full state dict. Sharded states (FSDP's sharded state dict,
    DeepSpeed ZeRO) would leave the other hosts' shards out of the checkpoint: refused before training starts."""
    if given.get("deepspeed"):
        raise JobError(
            "training_args.deepspeed across several hosts (resources.nodes > 1) is not supported: each host's ranks "
            "write their own ZeRO shards, which the job's checkpoints (stored by rank 0) would miss; use fsdp with "
            'fsdp_config {"state_dict_type": "FULL_STATE_DICT"}, or run on one host (resources.nodes 1)'
        )
    config = given.get("fsdp_config")
    kind = str(config.get("state_dict_type") or "") if isinstance(config, dict) else ""
    if given.get("fsdp") and kind.upper() != "FULL_STATE_DICT":
        raise JobError(
            "training_args.fsdp across several hosts (resources.nodes > 1) needs a full state dict in its "
            'checkpoints: add "fsdp_config": {"state_dict_type": "FULL_STATE_DICT"} (rank 0 then gathers the whole '
            "model; a sharded state dict would leave the other hosts' shards out of the stored checkpoint)"
        )


class PgmlCallback(TrainerCallback):
    """Streams every Trainer log event into pgml.logs (with step, max_steps) and honours SIGTERM / SIGINT."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    def on_log(
        self, args: TrainingArguments, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not logs:
            return
        entry = dict(logs)
        entry.setdefault("epoch", state.epoch)
        entry["step"] = state.global_step
        entry["max_steps"] = state.max_steps
        entry["world_size"] = self.ctx.rank.world_size
        if self.ctx.stop_requested and "train_runtime" in entry:
            # the summary Trainer.train() logs when it stops early: this attempt's, not the end of training
            summary = {k: v for k, v in entry.items() if k not in ("step", "max_steps")}
            self.ctx.info(interrupted_summary(self.ctx.attempt, entry), stopped_at_step=state.global_step, **summary)
            return
        self.ctx.log(entry)

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        # SIGTERM / SIGINT: checkpoint now, stop, and let another attempt resume (every rank stops at the same step)
        if self.ctx.rank.any(self.ctx.stop_requested):
            self.ctx.stop_requested = True
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        """Every checkpoint the Trainer writes goes into PostgreSQL (pruned to save_total_limit, default 2), in the
        background while training goes on (child/uploader.py). The directory is moved out of the Trainer's way,
        unless load_best_model_at_end needs it back at the end (then it is hard-linked)."""
        src = Path(args.output_dir or ".") / f"checkpoint-{state.global_step}"
        self.ctx.store_checkpoint(
            state.global_step, src, keep=args.save_total_limit or 2, move=not args.load_best_model_at_end
        )


def train(ctx: JobContext, trainer: Trainer) -> dict[str, Any]:
    """trainer.train(), resuming from this job's latest checkpoint in PostgreSQL if an earlier attempt left one;
    raises Interrupted when a signal stopped it (the checkpoint it saved lets the next attempt resume). The last
    checkpoint's upload may still run when it returns: evaluation overlaps it, and the job's commit
    (ctx.save_results) waits for it."""
    resume = ctx.resume_checkpoint()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if ctx.stop_requested:
        ctx.wait_checkpoints()  # the checkpoint the signal asked for is in PostgreSQL before the attempt exits
        raise ctx.interrupted(f"at step {trainer.state.global_step} of {trainer.state.max_steps}")
    return dict(output.metrics)


def interrupted_summary(attempt: int, entry: dict[str, Any]) -> str:
    """What the summary of an attempt stopped early says (stored as an info row, never as the end of training)."""
    loss = entry.get("train_loss")
    so_far = f" (train_loss so far {loss:.4g})" if isinstance(loss, int | float) else ""
    return (
        f"attempt {attempt} stopped at step {entry.get('step')} of {entry.get('max_steps')} after "
        f"{float(entry.get('train_runtime') or 0):.1f} s of training{so_far}; the next attempt resumes from its "
        "checkpoint"
    )


def save_model(trainer: Trainer, out: Path) -> None:
    """The model (or LoRA adapter) and its tokenizer, as from_pretrained loads them.

    Trainer.save_model also writes training_args.bin (a pickle that can hold hub_token) and peft a README
    model card: neither is stored.
    """
    trainer.save_model(str(out))  # every rank (FSDP gathers the weights); the Trainer's main process writes
    if not trainer.args.should_save:
        return
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(str(out))
    for name in ("training_args.bin", "README.md"):
        (out / name).unlink(missing_ok=True)


def evaluate_and_store(
    ctx: JobContext,
    trainer: Trainer,
    metrics: dict[str, Any],
    *,
    base_model: str | None = None,
    derive: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    save: Callable[[Trainer, Path], None] = save_model,
) -> dict[str, Any]:
    """Evaluate on the held-out rows, add derived metrics, save the model, commit files and metrics."""
    metrics = {**metrics, **trainer.evaluate(), "world_size": ctx.rank.world_size}
    if derive:
        metrics.update(derive(metrics))
    out = ctx.output_root / "model"
    save(trainer, out)
    ctx.save_results(out, metrics, base_model=base_model)
    return metrics


def train_evaluate_store(ctx: JobContext, trainer: Trainer, *, base_model: str | None = None) -> dict[str, Any]:
    """Train (resuming from a stored checkpoint), evaluate, save and store."""
    return evaluate_and_store(ctx, trainer, train(ctx, trainer), base_model=base_model)
