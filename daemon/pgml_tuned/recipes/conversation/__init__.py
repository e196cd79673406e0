"""Recipe `conversation` (recipe.py, top to bottom) and its building blocks:

options.py  the recipe's hyperparams, and what this worker can do (fail at once when it cannot)
data.py     rows → chat messages → token ids with labels; packing; the collator
model.py    the model ready to train (quantized, LoRA new or continued, or full); the Trainer; saving
"""

from .data import IGNORE, Collator, build_examples, messages_of, pack, render_prompt_template
from .model import LORA_TARGETS, count_parameters, load_model, lora_config, make_trainer, perplexity, save
from .options import (
    BNB_OPTIMIZERS,
    Options,
    bf16_supported,
    check_machine,
    options_from,
    probe_bitsandbytes,
    training_device,
)

__all__ = [
    "BNB_OPTIMIZERS",
    "IGNORE",
    "LORA_TARGETS",
    "Collator",
    "Options",
    "bf16_supported",
    "build_examples",
    "check_machine",
    "count_parameters",
    "load_model",
    "lora_config",
    "make_trainer",
    "messages_of",
    "options_from",
    "pack",
    "perplexity",
    "probe_bitsandbytes",
    "render_prompt_template",
    "save",
    "training_device",
]
