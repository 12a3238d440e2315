"""A tiny byte-level BPE tokenizer for tests and the CPU demo (trained in well under a second).

Byte-level like Qwen's, so every string encodes and the quote of a target merges with the
title exactly as a real BPE may do; EOS is ``<|endoftext|>`` and pad = EOS (as for Qwen).

Its normalizer and pre-tokenizer are exactly Qwen2's (NFC, Qwen2's split regex, byte level
without its own regex). The tiny backbone is a Qwen2 model, and for ``model_type == "qwen2"``
``AutoTokenizer`` always rebuilds a ``Qwen2Tokenizer`` from the saved vocabulary and merges
with those components, whatever ``tokenizer_config.json`` says. With the same components, a
saved model directory loads with ``AutoTokenizer.from_pretrained`` into a tokenizer that gives
the ids the model was trained with.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..errors import ConfigError
from .prompts import TEMPLATES, PromptBuilder
from .records import RecDataset, category_word

__all__ = ["EOS_TOKEN", "train_tokenizer", "dataset_corpus"]

EOS_TOKEN = "<|endoftext|>"

# transformers' Qwen2Tokenizer split regex (Qwen2.5's tokenizer.json has the same pattern).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as a Hugging Face fast tokenizer.

    The 256 byte symbols are always in the vocabulary, so ``vocab_size`` must be > 257.
    ``encode`` adds no BOS/EOS; ``eos_token == pad_token == "<|endoftext|>"``.
    """
    if vocab_size < 258:
        raise ConfigError(f"vocab_size={vocab_size}: must be >= 258 (256 bytes + EOS + merges)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, unk_token=None
    )


def dataset_corpus(dataset: RecDataset, template: str = "reference") -> list[str]:
    """Texts to train a tiny tokenizer on: the prompt segments and every item's target string."""
    word = category_word(dataset.category)
    instruction, history = TEMPLATES[template]
    # The template occurs in every prompt: weight it so its words get merges (shorter prompts).
    instruction = instruction.replace("{C}", word)
    texts = [instruction, history.replace("{C}", word).replace("{H}", "")] * 20
    texts += [PromptBuilder.target_text(t) for t in dataset.items.titles]
    return texts
