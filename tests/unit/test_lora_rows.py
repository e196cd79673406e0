"""Mixed-adapter batches on stacked LoRA weights (serving/lora_rows.py): every row's logits equal those of its own
adapter alone (and of peft's own mixed batches), for adapters of different ranks, scalings and target modules and
for rows of the base; the weights are held once; what is not plain LoRA is left to peft."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pgml_tuned.serving import lora_rows
from tests.support import models as testing


def llama(tmp_path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    path = testing.build_tiny_llama(tmp_path / "llama", verify=False)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def adapters(model: Any, specs: list[tuple[str, int, int, list[str], bool]]) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    peft_model: PeftModel | None = None
    for name, rank, alpha, targets, dora in specs:
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_dora=dora)
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        gen = torch.Generator().manual_seed(rank * 31 + alpha)
        for n, p in peft_model.named_parameters():
            if f".{name}." in n and "lora_B" in n:  # B starts at zero: make every adapter change the output
                p.data = torch.randn(p.shape, generator=gen) * 0.05
    assert peft_model is not None
    return peft_model.eval()


SPECS = [
    ("a", 8, 16, ["q_proj", "v_proj"], False),
    ("b", 4, 4, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
    ("c", 16, 8, ["o_proj", "down_proj"], False),
]


def logits_alone(peft_model: Any, ids: Any, name: str) -> Any:
    if name == lora_rows.BASE:
        with peft_model.disable_adapter():
            return peft_model(input_ids=ids).logits
    peft_model.set_adapter(name)
    return peft_model(input_ids=ids).logits


def test_each_row_through_its_own_adapter_as_alone(tmp_path: Path) -> None:
    peft_model = adapters(llama(tmp_path), SPECS)
    names = ["a", lora_rows.BASE, "c", "b", "a", "c"]
    ids = torch.randint(3, 100, (len(names), 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch.stack([logits_alone(peft_model, ids[i : i + 1], n)[0] for i, n in enumerate(names)])
        with peft_model.base_model._enable_peft_forward_hooks(adapter_names=names):
            peft_mixed = peft_model(input_ids=ids).logits
        params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
        with torch.inference_mode():  # as the serving process builds them: inside a generation
            stacks = lora_rows.Stacks.build(peft_model, {"a", "b", "c"})
        assert stacks is not None and stacks.names == ("a", "b", "c")
        with lora_rows.rows(stacks, names):
            got = peft_model(input_ids=ids).logits
        # the adapters changed the answers, and each row got its own
        assert not torch.allclose(want[0], want[1], atol=1e-3) and not torch.allclose(want[2], want[3], atol=1e-3)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got, peft_mixed, atol=1e-5, rtol=1e-4)
        # peft's parameters are views of the stacks: the weights are held once (plus the zero padding of ranks)
        stacked = {t.untyped_storage().data_ptr() for s in stacks.layers.values() for t in (s.a, s.b)}
        assert all(p.untyped_storage().data_ptr() in stacked for n, p in peft_model.named_parameters() if "lora_" in n)
        assert stacks.nbytes >= params * 4
        # outside the context, peft's layers are as they were: its own mixed batches still give the same
        with peft_model.base_model._enable_peft_forward_hooks(adapter_names=names):
            torch.testing.assert_close(peft_model(input_ids=ids).logits, peft_mixed)
        # beam search repeats each row: so do the rows' adapters
        with lora_rows.rows(stacks, names[:2]):
            torch.testing.assert_close(peft_model(input_ids=ids[[0, 0, 1, 1]]).logits, want[[0, 0, 1, 1]], atol=1e-5,
                                       rtol=1e-4)  # fmt: skip
        with lora_rows.rows(stacks, names[:4]), pytest.raises(ValueError, match="a batch of 6 rows for 4"):
            peft_model(input_ids=ids)
    # peft's parameters, views of the stacks, are still ordinary tensors: peft can load another adapter
    peft_model.add_adapter("d", __import__("peft").LoraConfig(r=2, target_modules=["q_proj"]))


def test_what_is_not_plain_lora_is_left_to_peft(tmp_path: Path) -> None:
    peft_model = adapters(llama(tmp_path), [SPECS[0], ("dora", 4, 8, ["q_proj"], True)])
    assert lora_rows.Stacks.build(peft_model, {"a", "dora"}) is None


def test_a_head_of_each_adapters_own_serves_its_rows(tmp_path: Path) -> None:
    """A classifier's adapters each train a head of their own (modules_to_save): each row gets its adapter's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    path = testing.build_tiny_llama(tmp_path / "llama", verify=False)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    base.config.pad_token_id = 0
    peft_model: Any = None
    for i, name in enumerate(("x", "y")):
        config = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["score"])
        if peft_model is None:
            peft_model = get_peft_model(base, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        torch.manual_seed(i)
        for n, p in peft_model.named_parameters():
            if f".{name}." in n and ("lora_B" in n or "modules_to_save" in n):
                p.data = torch.randn(p.shape) * 0.5
    peft_model.eval()
    names = ["y", lora_rows.BASE, "x", "y"]
    ids = torch.randint(3, 100, (len(names), 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = torch.stack([logits_alone(peft_model, ids[i : i + 1], n)[0] for i, n in enumerate(names)])
        stacks = lora_rows.Stacks.build(peft_model, {"x", "y"})
        assert stacks is not None and stacks.per_adapter
        with lora_rows.rows(stacks, names):
            got = peft_model(input_ids=ids).logits
    assert not torch.allclose(want[0], want[2], atol=1e-3)  # the two adapters' heads answer differently
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
