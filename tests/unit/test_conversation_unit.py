"""The conversation recipe's pure parts, without a database: tokens and labels, truncation, packing, options,
LoRA settings and the checks of what the machine can do."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from pgml_tuned.errors import JobError
from pgml_tuned.models import is_peft
from pgml_tuned.recipes import conversation as cv
from pgml_tuned.recipes.conversation import data as cv_data
from tests.support import models as testing

ROWS = [
    ("Be brief.", "Sentiment of: shares fell 8.4% after a profit warning.", "negative"),
    (None, "Sentiment of: operating profit climbed to EUR 23 million.", "positive"),
    ("Answer from {negative/neutral/positive}.", "Net sales were unchanged.", "neutral"),
]
TEMPLATE = "### System: {system}\n### User: {user}\n### Assistant: {assistant}{eos_token}"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.build_tiny_llama(tmp_path_factory.mktemp("conv") / "llama")


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.build_tiny_llama(tmp_path_factory.mktemp("conv") / "plain", chat_template=False, verify=False)


@pytest.fixture
def tok(llama_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(llama_dir)


@pytest.fixture
def plain_tok(plain_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(plain_dir)


def learned(tok: PreTrainedTokenizerBase, example: dict[str, list[int]]) -> str:
    return tok.decode([t for t in example["labels"] if t != cv.IGNORE])


def test_labels_mask_exactly_the_non_assistant_tokens(tok: PreTrainedTokenizerBase) -> None:
    examples, stats = cv.build_examples(ROWS, tok, cv.Options(), 256)
    assert stats == {"truncated_rows": 0, "dropped_rows": 0}
    for (system, user, assistant), ex in zip(ROWS, examples, strict=True):
        messages = cv.messages_of(system, user, assistant)
        rendered = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ex["input_ids"] == list(rendered)
        prompt = tok.apply_chat_template(messages[:-1], tokenize=True, return_dict=True, add_generation_prompt=True)
        n_prompt = len(prompt["input_ids"])
        # everything the template renders up to the generation prompt is masked, then the answer and its </s>
        assert ex["labels"][:n_prompt] == [cv.IGNORE] * n_prompt
        answer = tok(assistant + tok.eos_token, add_special_tokens=False)["input_ids"]
        assert ex["labels"][n_prompt : n_prompt + len(answer)] == answer
        assert ex["labels"][n_prompt + len(answer) :] == [cv.IGNORE] * (len(ex["labels"]) - n_prompt - len(answer))
        assert learned(tok, ex) == assistant + "</s>"


def test_templates_without_generation_markers_use_the_prompt_prefix(tok: PreTrainedTokenizerBase) -> None:
    tok.chat_template = testing.LLAMA_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert not cv_data._GENERATION_MARKER.search(tok.chat_template)
    examples, _ = cv.build_examples(ROWS, tok, cv.Options(), 256)
    for (system, user, assistant), ex in zip(ROWS, examples, strict=True):
        prompt = tok.apply_chat_template(cv.messages_of(system, user), tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(cv.messages_of(system, user, assistant), tokenize=False)
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert tok.decode(ex["input_ids"]) == full
        assert tok.decode(ex["input_ids"][:n_prompt]) == prompt
        assert ex["labels"][:n_prompt] == [cv.IGNORE] * n_prompt
        # everything after the prompt is learned: the answer, </s> and the template's closing newline
        assert learned(tok, ex) == full[len(prompt) :] == assistant + "</s>\n"


def test_a_template_that_breaks_the_prefix_property_fails_clearly(tok: PreTrainedTokenizerBase) -> None:
    # the generation prompt differs from what precedes a rendered answer
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    with pytest.raises(JobError, match="prompt_template"):
        cv.build_examples(ROWS, tok, cv.Options(), 256)
    # with the loss on everything, no prefix is needed
    examples, _ = cv.build_examples(ROWS, tok, cv.Options(train_on="all"), 256)
    assert all(ex["labels"] == ex["input_ids"] for ex in examples)


def test_train_on_all_masks_only_padding(tok: PreTrainedTokenizerBase) -> None:
    examples, _ = cv.build_examples(ROWS, tok, cv.Options(train_on="all"), 256)
    assert all(ex["labels"] == ex["input_ids"] for ex in examples)
    batch = cv.Collator(tok.pad_token_id)(examples)
    lengths = [len(ex["input_ids"]) for ex in examples]
    assert batch["input_ids"].shape == (3, max(lengths))
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        masked = (batch["labels"][row] == cv.IGNORE).nonzero().flatten().tolist()
        assert masked == list(range(n, max(lengths)))  # exactly the padding
    assert "position_ids" not in batch


def test_prompt_template_text_and_mask(plain_tok: PreTrainedTokenizerBase) -> None:
    opts = cv.Options(prompt_template=TEMPLATE)
    examples, _ = cv.build_examples(ROWS, plain_tok, opts, 256)
    for (system, user, assistant), ex in zip(ROWS, examples, strict=True):
        text = f"### System: {system or ''}\n### User: {user}\n### Assistant: {assistant}</s>"
        assert plain_tok.decode(ex["input_ids"]) == "<s>" + text  # braces in the data are kept as they are
        prompt = "<s>" + text[: text.index(assistant)]
        n_prompt = len(plain_tok(prompt[3:])["input_ids"])
        assert plain_tok.decode(ex["input_ids"][:n_prompt]) == prompt
        assert ex["labels"][:n_prompt] == [cv.IGNORE] * n_prompt
        assert learned(plain_tok, ex) == assistant + "</s>"
    assert cv.render_prompt_template(TEMPLATE, None, "u", "a", "</s>") == (
        "### System: \n### User: u\n### Assistant: ",
        "a</s>",
    )


def test_no_chat_template_and_no_prompt_template_is_a_job_error(plain_tok: PreTrainedTokenizerBase) -> None:
    with pytest.raises(JobError, match=r"no chat template: set hyperparams\.prompt_template"):
        cv.build_examples(ROWS, plain_tok, cv.Options(), 256)


def test_truncation_is_counted_and_rows_without_answer_tokens_are_dropped(tok: PreTrainedTokenizerBase) -> None:
    full, _ = cv.build_examples(ROWS, tok, cv.Options(), 256)
    lengths = [len(ex["input_ids"]) for ex in full]
    first_label = [next(i for i, x in enumerate(ex["labels"]) if x != cv.IGNORE) for ex in full]
    # cut the first row inside its answer, leave the second whole, cut the third before its answer
    limit = first_label[0] + 1
    assert first_label[2] >= limit and lengths[1] <= limit
    rows = [ROWS[0], (None, "Hi", "ok"), ROWS[2]]
    examples, stats = cv.build_examples(rows, tok, cv.Options(), limit)
    assert stats == {"truncated_rows": 2, "dropped_rows": 1}
    assert len(examples) == 2
    assert all(len(ex["input_ids"]) <= limit for ex in examples)
    assert all(any(x != cv.IGNORE for x in ex["labels"][1:]) for ex in examples)
    assert examples[0]["input_ids"] == full[0]["input_ids"][:limit]
    # with train_on all, nothing is dropped: there is always something to learn
    _, stats = cv.build_examples(rows, tok, cv.Options(train_on="all"), limit)
    assert stats == {"truncated_rows": 2, "dropped_rows": 0}


def test_packing_keeps_masks_and_positions(tok: PreTrainedTokenizerBase) -> None:
    examples, _ = cv.build_examples(ROWS * 4, tok, cv.Options(), 256)
    size = max(len(ex["input_ids"]) for ex in examples) * 3
    blocks = cv.pack(examples, size)
    assert 1 < len(blocks) < len(examples)
    assert all(len(b["input_ids"]) <= size for b in blocks)
    flat_ids = [t for b in blocks for t in b["input_ids"]]
    assert flat_ids == [t for ex in examples for t in ex["input_ids"]]  # nothing lost, nothing split
    flat_labels = [t for b in blocks for t in b["labels"]]
    assert flat_labels == [t for ex in examples for t in [cv.IGNORE, *ex["labels"][1:]]]
    positions = [p for b in blocks for p in b["position_ids"]]
    assert positions == [p for ex in examples for p in range(len(ex["input_ids"]))]
    batch = cv.Collator(tok.pad_token_id)(blocks[-2:])
    assert "attention_mask" not in batch
    longest, short = batch["input_ids"].shape[1], len(blocks[-1]["input_ids"])
    assert batch["position_ids"][1, short:].tolist() == list(range(longest - short))  # padding: its own sequence
    assert (batch["labels"][1, short:] == cv.IGNORE).all()


def test_a_packed_block_computes_what_its_examples_compute_alone(llama_dir: Path, tok: PreTrainedTokenizerBase) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    model.config.use_cache = False
    examples, _ = cv.build_examples(ROWS, tok, cv.Options(), 256)
    [block] = cv.pack(examples, 256)
    batch = cv.Collator(tok.pad_token_id)([block])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([ex["input_ids"]])).logits[0] for ex in examples])
        naive = model(input_ids=batch["input_ids"]).logits[0]  # what packing without positions would compute
    assert torch.allclose(packed, alone, atol=1e-4)
    assert not torch.allclose(naive, alone, atol=1e-2)
    # and the loss over a packed block is the loss over the examples
    with torch.no_grad():
        packed_loss = model(**batch).loss
        sums = [
            model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])) for ex in examples
        ]
    n = [sum(1 for x in ex["labels"][1:] if x != cv.IGNORE) for ex in examples]
    expected = sum(o.loss * k for o, k in zip(sums, n, strict=True)) / sum(n)
    assert packed_loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_options_are_checked() -> None:
    assert cv.options_from({}) == cv.Options()
    for hp, message in [
        ({"train_on": "user"}, "train_on must be 'assistant'"),
        ({"max_seq_length": "long"}, "max_seq_length must be a whole number"),
        ({"packing": "yes"}, "packing must be true or false"),
        ({"prompt_template": "{user} says"}, "{user} and {assistant} placeholders"),
        ({"torch_dtype": "float8"}, "torch_dtype 'float8'"),
        ({"lora_config": [1]}, "lora_config must be a JSON object"),
    ]:
        with pytest.raises(JobError, match=message.replace("{", r"\{").replace("}", r"\}")):
            cv.options_from(hp)


def test_lora_config_keys_and_default_targets(llama_dir: Path) -> None:
    with pytest.raises(JobError, match=r"unknown lora_config keys 'alpha' \(did you mean 'lora_alpha'\?\), 'rank'"):
        cv.lora_config({"rank": 4, "alpha": 8}, "llama")
    with pytest.raises(JobError, match="lora_config rejected by peft"):
        cv.lora_config({"r": 4, "task_type": "CHAT"}, "llama")
    assert sorted(cv.lora_config({"r": 2}, "llama").target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert sorted(cv.lora_config({"r": 2}, "gpt2").target_modules) == ["c_attn"]
    assert cv.lora_config({"r": 2}, "some_new_arch").target_modules == "all-linear"
    assert cv.lora_config({"r": 2, "target_modules": ["q_proj"]}, "llama").target_modules == {"q_proj"}
    assert cv.lora_config({}, "llama").task_type == "CAUSAL_LM"
    with pytest.raises(JobError, match="lora_config does not fit llama model"):
        cv.load_model(str(llama_dir), cv.Options(lora_config={"r": 2, "target_modules": ["c_attn"]}))
    with pytest.raises(JobError, match="lora_config does not fit llama model"):
        cv.load_model(str(llama_dir), cv.Options(lora_config={"r": 0}))
    model = cv.load_model(str(llama_dir), cv.Options(lora_config={"r": 2, "lora_alpha": 4}))
    trainable, total = cv.count_parameters(model)
    assert 0 < trainable < total / 10 and is_peft(model)
    assert not model.get_base_model().config.use_cache


def test_check_machine_fails_at_once_saying_what_to_change() -> None:
    def broken(device: str, feature: str) -> str:
        return "no kernels for this device"

    def fine(device: str, feature: str) -> None:
        return None

    seed_args = {"optim": "adamw_bnb_8bit", "gradient_checkpointing": True}
    with pytest.raises(JobError) as e:
        cv.check_machine(cv.Options(lora_config={"r": 2}), seed_args, device="cpu", probe=broken)
    assert 'training_args.optim "adamw_bnb_8bit"' in str(e.value) and '"optim": "adamw_torch"' in str(e.value)
    assert cv.check_machine(cv.Options(), seed_args, device="cuda", probe=fine) == []
    [note] = cv.check_machine(cv.Options(), seed_args, device="cpu", probe=fine)
    assert "runs on bitsandbytes' CPU kernels" in note
    assert "runs unpaged" in cv.check_machine(cv.Options(), {"optim": "paged_adamw_8bit"}, device="cpu", probe=fine)[0]
    assert cv.check_machine(cv.Options(lora_config={}), {"optim": "adamw_torch"}, device="cpu", probe=broken) == []
    with pytest.raises(JobError, match="load_in_8bit and load_in_4bit are both true"):
        cv.check_machine(cv.Options(load_in_8bit=True, load_in_4bit=True, lora_config={}), {}, probe=fine)
    with pytest.raises(JobError, match=r'load_in_4bit needs bitsandbytes 4-bit kernels.*"load_in_4bit": false'):
        cv.check_machine(cv.Options(load_in_4bit=True, lora_config={}), {}, device="cuda", probe=broken)
    with pytest.raises(JobError, match='"torch_dtype": "float16"'):
        cv.check_machine(cv.Options(load_in_4bit=True), {}, device="cuda", probe=fine, bf16_ok=lambda d: False)
    if not torch.cuda.is_available():
        with pytest.raises(JobError, match=r'training_args.bf16 is true but this worker has no CUDA GPU.*"use_cpu"'):
            cv.check_machine(cv.Options(), {"bf16": True}, probe=fine)
    with pytest.raises(JobError, match="does not support bfloat16"):
        cv.check_machine(cv.Options(), {"bf16": True, "use_cpu": True}, device="cpu", bf16_ok=lambda d: False)
    with pytest.raises(JobError, match=r'needs a CUDA GPU and the flash-attn package.*use "sdpa"'):
        cv.check_machine(cv.Options(attn_implementation="flash_attention_2"), {}, device="cpu")


def test_bnb_optimizer_names_match_transformers() -> None:
    trainer_optimizer = pytest.importorskip("transformers.trainer_optimizer")
    names = getattr(trainer_optimizer, "_BITSANDBYTES_OPTIMIZERS", None)
    if names is None:
        pytest.skip("this transformers has no _BITSANDBYTES_OPTIMIZERS list")
    assert {str(getattr(n, "value", n)) for n in names} == cv.BNB_OPTIMIZERS


def test_bitsandbytes_probe_on_this_machine() -> None:
    """What bitsandbytes can do here is measured, not assumed; on CPU (0.45+) it has working kernels for the
    8-bit optimizers and 8/4-bit layers, so those jobs run (slowly) instead of failing."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {f: cv.probe_bitsandbytes(device, f) for f in ("optimizer", "8bit", "4bit")}
    assert all(r is None or isinstance(r, str) for r in results.values())
    if device == "cpu":
        import bitsandbytes

        if tuple(int(x) for x in bitsandbytes.__version__.split(".")[:2]) >= (0, 49):
            assert results == {"optimizer": None, "8bit": None, "4bit": None}


def test_qlora_with_checkpointing_and_a_paged_8bit_optimizer_trains(
    llama_dir: Path, tok: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """The QLoRA path without a database: 4-bit base, LoRA, gradient checkpointing, bitsandbytes optimizer."""
    from transformers import TrainingArguments

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cv.probe_bitsandbytes(device, "4bit") or cv.probe_bitsandbytes(device, "optimizer"):
        pytest.skip(f"bitsandbytes 4-bit or 8-bit optimizers do not run on {device} here")
    opts = cv.options_from({"load_in_4bit": True, "lora_config": {"r": 4, "lora_alpha": 8}, "packing": True})
    args = {
        "optim": "paged_adamw_8bit",
        "gradient_checkpointing": True,
        "max_steps": 3,
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "disable_tqdm": True,
    }
    cv.check_machine(opts, args)
    examples, _ = cv.build_examples(ROWS * 4, tok, opts, 128)
    model = cv.load_model(str(llama_dir), opts, device=device, gradient_checkpointing=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before and all("lora_" in n for n in before)
    trainer = cv.make_trainer(
        model, tok, TrainingArguments(output_dir=str(tmp_path), **args), cv.pack(examples, 128), examples[:2]
    )
    out = trainer.train()
    assert math.isfinite(out.metrics["train_loss"]) and math.isfinite(trainer.evaluate()["eval_loss"])
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert type(optimizer).__module__.startswith("bitsandbytes.")
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before if "lora_B" in n)
    cv.save(trainer, tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert not (tmp_path / "saved" / "training_args.bin").exists() and not (tmp_path / "saved" / "README.md").exists()


def test_without_cuda_8bit_loading_and_an_8bit_optimizer_train_on_cpu_with_a_warning_each(
    llama_dir: Path, tok: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """What README, guide.md and sql-api.md say: on a worker without CUDA, load_in_8bit and the bitsandbytes
    optimizers (the guide's "adamw_bnb_8bit") run on bitsandbytes' CPU kernels, each with a warning line in the job's
    log, instead of failing (they fail at once only where bitsandbytes cannot run them: test_check_machine_...).
    Measured here (1 thread, a 4-layer 1024-wide Llama, 6 steps): adamw_bnb_8bit 1.9x adamw_torch's time on a full
    fine-tune, 1.05x with LoRA; load_in_8bit + LoRA 1.16x LoRA alone."""
    from transformers import TrainingArguments

    pytest.importorskip("bitsandbytes")
    if torch.cuda.is_available():
        pytest.skip("this worker has CUDA: the CPU path is not the one it takes")
    opts = cv.options_from({"load_in_8bit": True, "lora_config": {"r": 4, "lora_alpha": 8}})
    args = {
        "optim": "adamw_bnb_8bit",
        "max_steps": 3,
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 2,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    notes = cv.check_machine(opts, args)  # the real probe, on this machine
    assert notes == [
        "load_in_8bit runs on bitsandbytes' CPU kernels here: it works, slowly; a CUDA worker is much faster",
        'training_args.optim "adamw_bnb_8bit" runs on bitsandbytes\' CPU kernels here: it works, more slowly than '
        "adamw_torch on a CPU",
    ]
    import bitsandbytes as bnb

    model = cv.load_model(str(llama_dir), opts, device="cpu")
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    examples, _ = cv.build_examples(ROWS * 4, tok, opts, 128)
    trainer = cv.make_trainer(model, tok, TrainingArguments(output_dir=str(tmp_path), **args), examples, examples[:2])
    assert math.isfinite(trainer.train().metrics["train_loss"])
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert type(optimizer).__module__.startswith("bitsandbytes.")
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before if "lora_B" in n)


def test_perplexity() -> None:
    assert cv.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert cv.perplexity(None) is None and cv.perplexity(float("nan")) is None
    assert math.isfinite(cv.perplexity(10_000.0))
