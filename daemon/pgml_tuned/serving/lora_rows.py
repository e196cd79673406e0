"""Each row of a batch through its own LoRA adapter, in a fixed number of operations whatever the adapters.

peft's mixed batches (`adapter_names=`) loop over the batch's adapters in every LoRA layer: for each adapter, pick
its rows, run its A and B, put them back. 32 requests over 16 adapters are 16 small passes per layer per decoding
step, and on a CPU with a small model that costs more than the model (0.39x the tokens/s of one adapter). The
systems built for many adapters (punica's BGMV kernels in vLLM and LoRAX, S-LoRA) instead keep every adapter's
weights of a layer in one stacked tensor and gather each row's: two batched matmuls per layer, one gather each.
That is what this module does with plain torch:

- `Stacks.build` stacks, for every LoRA layer of a PeftModel, the A and B weights of all adapters loaded on it into
  A[n + 1, r, in] and B[n + 1, out, r] (slot 0 is zeros: a row of the base itself; ranks under the largest are
  padded with zeros, exact), and their scalings into s[n + 1]. peft's own parameters are then pointed at their
  slices (views), so the weights are held once.
- `rows(stacks, names)` runs the forward passes inside it with peft's LoRA layers off (each returns its base
  layer's output) and a forward hook on each that adds, for row i with slot k(i):
  ((x_i @ A[k(i)]^T) @ B[k(i)]^T) * s[k(i)]: two torch.bmm over the batch, whatever the adapters in it.
  Beam search repeats each row num_beams times: so do the row slots.
- What peft trains beside LoRA layers, per adapter (a classifier's head of its own: modules_to_save) is not LoRA:
  those modules are told each row's adapter name as peft's mixed batches tell them (`adapter_names`).

Only plain LoRA on linear layers: an adapter with a variant (DoRA, ...), a bias of its own, or LoRA on an embedding
or convolution makes `Stacks.build` answer None, and the batch goes through peft's mixed path (cache.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

BASE = "__base__"  # the name of a row with no adapter (cache.BASE)


@dataclass
class Stack:
    """One LoRA layer's adapters, stacked: slot k + 1 is adapter names[k]."""

    a: Any  # [n + 1, r, in]
    b: Any  # [n + 1, out, r]
    scale: Any  # [n + 1]


@dataclass
class Stacks:
    names: tuple[str, ...]  # the adapters in slot order (slot 0: the base)
    layers: dict[Any, Stack]  # LoRA layer module → its stack
    per_adapter: list[Any]  # modules peft keeps a copy of per adapter (modules_to_save, ...): each row's by name

    def slots(self, names: list[str]) -> list[int]:
        where = {n: i + 1 for i, n in enumerate(self.names)}
        return [0 if n == BASE else where[n] for n in names]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.layers.values() for t in (s.a, s.b))

    @classmethod
    def build(cls, peft_model: Any, adapters: set[str]) -> Stacks | None:
        """The stacks of every LoRA layer of `peft_model` for `adapters` (peft's parameters then point into them),
        or None where a layer or an adapter is not plain LoRA on a linear layer."""
        import torch
        from peft.tuners.lora.layer import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        names = tuple(sorted(adapters))
        lora_layers: list[Any] = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        for m in lora_layers:
            if getattr(m, "lora_embedding_A", None) or any(
                not isinstance(m.lora_A[n], torch.nn.Linear) for n in m.lora_A
            ):
                return None
            if getattr(m, "lora_variant", None) or any(getattr(m, "lora_bias", {}).get(n) for n in m.lora_A):
                return None
        layers: dict[Any, Stack] = {}
        # normal tensors even when built inside a generation's inference mode: peft's parameters become views of them
        with torch.inference_mode(False), torch.no_grad():
            for m in lora_layers:
                present = [n for n in names if n in m.lora_A]
                if not present:
                    continue
                first = m.lora_A[present[0]].weight
                rank = max(m.lora_A[n].weight.shape[0] for n in present)
                fan_in = first.shape[1]
                fan_out = m.lora_B[present[0]].weight.shape[0]
                a = torch.zeros(len(names) + 1, rank, fan_in, dtype=first.dtype, device=first.device)
                b = torch.zeros(len(names) + 1, fan_out, rank, dtype=first.dtype, device=first.device)
                scale = torch.zeros(len(names) + 1, dtype=first.dtype, device=first.device)
                for slot, n in enumerate(names, start=1):
                    if n not in m.lora_A:
                        continue
                    wa, wb = m.lora_A[n].weight, m.lora_B[n].weight
                    r = wa.shape[0]
                    a[slot, :r].copy_(wa)
                    b[slot, :, :r].copy_(wb)
                    scale[slot] = float(m.scaling[n])
                    wa.data = a[slot, :r]  # held once: peft's parameter is a view of the stack
                    wb.data = b[slot, :, :r]
                layers[m] = Stack(a, b, scale)
        per_adapter = [m for m in peft_model.modules() if isinstance(m, AuxiliaryTrainingWrapper)]
        return cls(names, layers, per_adapter)


@contextlib.contextmanager
def rows(stacks: Stacks, names: list[str]) -> Iterator[None]:
    """Every forward pass in this context runs row i through adapter names[i] (BASE: none), on the stacks."""
    import torch

    slots = torch.tensor(stacks.slots(names), dtype=torch.long)
    on_device: dict[Any, Any] = {}
    hooks = []

    def repeat(batch: int) -> int:
        """How many times a batch repeats each row (beam search: num_beams times, in order; else once)."""
        if batch % len(names):
            raise ValueError(f"a batch of {batch} rows for {len(names)} adapter names")
        return batch // len(names)

    def row_slots(device: Any, batch: int) -> Any:
        idx = on_device.get(device)
        if idx is None:
            idx = on_device[device] = slots.to(device)
        n = repeat(batch)
        return idx if n == 1 else idx.repeat_interleave(n)

    def add_lora(module: Any, args: tuple[Any, ...], output: Any) -> Any:
        stack = stacks.layers[module]
        x = args[0]
        idx = row_slots(x.device, x.shape[0])
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(stack.a.dtype)  # [batch, tokens, in]
        h = torch.bmm(flat, stack.a.index_select(0, idx).transpose(1, 2))  # [batch, tokens, r]
        delta = torch.bmm(h, stack.b.index_select(0, idx).transpose(1, 2))  # [batch, tokens, out]
        delta = delta * stack.scale.index_select(0, idx)[:, None, None]
        return output + delta.reshape(*output.shape[:-1], delta.shape[-1]).to(output.dtype)

    def name_rows(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        n = repeat((args[0] if args else next(iter(kwargs.values()))).shape[0])
        return args, {**kwargs, "adapter_names": [name for name in names for _ in range(n)]}

    layers = list(stacks.layers)
    before = [m._disable_adapters for m in layers]
    try:
        for m in layers:
            m._disable_adapters = True  # peft's layer returns its base layer's output; the hook adds each row's LoRA
            hooks.append(m.register_forward_hook(add_lora))
        for m in stacks.per_adapter:
            hooks.append(m.register_forward_pre_hook(name_rows, with_kwargs=True))
        yield
    finally:
        for h in hooks:
            h.remove()
        for m, was in zip(layers, before, strict=True):
            m._disable_adapters = was
