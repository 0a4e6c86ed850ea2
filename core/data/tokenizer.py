"""Tokenizers for tasks: a byte-level BPE tokenizer trained on a task's own texts (for models
trained from scratch), or a pretrained one loaded by name or path."""

from __future__ import annotations

from collections.abc import Iterable

from rlhfzoo.pretrained import LoadError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"
# ChatML, as Qwen2 writes it: each turn `<|im_start|>role\ncontent<|im_end|>\n`.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2, chat: bool = False):
    """Train a byte-level BPE tokenizer on `texts`; returns a `transformers.PreTrainedTokenizerFast`.

    Byte-level, so any text round-trips (no unknown token). `<|endoftext|>` is both bos and eos
    (as in GPT-2) and `<|pad|>` is the padding token; no special tokens are added automatically
    when encoding. The vocabulary holds the 256 byte symbols, the two special tokens and up to
    `vocab_size - 258` merges. Training is deterministic given the texts.

    `chat=True` (for conversational data and a model trained from scratch): two more special
    tokens, `<|im_start|>` and `<|im_end|>`, the ChatML chat template (`CHATML_TEMPLATE`), and
    `<|im_end|>` as eos, so that generation stops where an assistant turn ends.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = [EOS_TOKEN, PAD_TOKEN] + ([TURN_START, TURN_END] if chat else [])
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size must be at least {len(alphabet) + len(specials)} for byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if not chat:
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=TURN_END, pad_token=PAD_TOKEN)
    out.chat_template = CHATML_TEMPLATE
    return out


def check_tokenizer_option(value: str | None) -> str | None:
    """A task's `tokenizer` option: a saved tokenizer's directory or a hub id (else a config error
    naming the fix), or None (train a BPE on the data)."""
    from rlhfzoo.pretrained import TOKENIZER_FILES, check_source

    fix = "Give a saved tokenizer's directory, a hub id, or leave `tokenizer` unset to train a BPE tokenizer on the data."
    return None if value is None else check_source(value, "tokenizer", TOKENIZER_FILES, fix)


def load_pretrained_tokenizer(name_or_path: str):
    """`AutoTokenizer.from_pretrained` (a local directory or a hub id), with pad set to eos if missing.

    Raises `LoadError` (a `ValueError`) with advice when it cannot be loaded or has neither pad nor
    eos token.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # noqa: BLE001 - missing dir, offline, unknown id
        raise LoadError(
            f"could not load the tokenizer {name_or_path!r}: {type(e).__name__}: {e}. Pass a local "
            "directory holding a saved tokenizer (without network access a hub id only works if it is "
            "already cached), or leave `tokenizer` unset to train a BPE tokenizer on the data."
        ) from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise LoadError(
                f"tokenizer {name_or_path!r} has neither a pad nor an eos token; pick another tokenizer "
                "or leave `tokenizer` unset to train one on the data."
            )
        tok.pad_token = tok.eos_token
    return tok
