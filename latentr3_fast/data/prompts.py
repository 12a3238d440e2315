"""Prompt and target construction: the (x, y) prompt format of paper Sec. 3.1, with the
reference (BIGRec/D³) prompt text.

The prompt is two separately tokenized segments, concatenated (each encoded WITHOUT special
tokens), exactly as the reference builds it, so the token boundaries match the reference:

* A (instruction, fixed per category) and
* B (the user's history).

Then the model inserts ``num_latent`` thought slots, and the target is the tokens of the ONE string
``'"' + title + '"\\n'`` followed by EOS (the quote merges with the title's first characters in
Qwen's BPE, so it must not be tokenized apart).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError
from .collate import EncodedSample
from .records import Sample, category_word

__all__ = ["THOUGHT_TOKEN", "TEMPLATES", "PromptBuilder", "IGNORE_INDEX"]

THOUGHT_TOKEN = "<|Thought|>"
IGNORE_INDEX = -100

# The reference template: typos ("recetenly", "palyed", "may bought", "{C}s") and the spaces
# before "\n" are deliberate — they reproduce the reference tokens.
_REFERENCE_A = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request. \n\n### Instruction:\n"
    "Given a list of {C} the user recetenly enjoy, please write a new {C} that the user may "
    "bought\n"
)
_REFERENCE_B = (
    "### User Input: \nThe user has palyed the following {C}s before: {H}\n\n### Response: \n"
)

# The same structure in plain English (an option; not what the paper's numbers used).
_CLEAN_A = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "Given a list of {C} the user recently enjoyed, recommend a new item from the {C} catalogue "
    "that the user may buy next.\n"
)
_CLEAN_B = "### User Input:\nThe user has enjoyed the following {C} before: {H}\n\n### Response:\n"

TEMPLATES: dict[str, tuple[str, str]] = {
    "reference": (_REFERENCE_A, _REFERENCE_B),
    "clean": (_CLEAN_A, _CLEAN_B),
}


def format_history(titles: Sequence[str]) -> str:
    """The history segment: each title wrapped in ``"``, joined by ``", "`` (the reference's)."""
    return ", ".join(f'"{title}"' for title in titles)


class PromptBuilder:
    """Builds token ids for prompts, latent slots and targets.

    Args:
        tokenizer: a Hugging Face tokenizer with ``eos_token_id``.
        category: category name (``CDs_and_Vinyl``) or word (``musics``); see ``category_word``.
        template: ``"reference"`` (default, byte-exact with the reference) or ``"clean"``.
        num_latent: N, the number of latent thought slots r_1..r_N between prompt x and target
            y (paper Sec. 3.1; 0 = w/o reasoning).
        max_length: maximum of ``len(prompt) + N + len(target)``; the prompt is cut on the left.
    """

    def __init__(
        self,
        tokenizer: Any,
        category: str,
        template: str = "reference",
        num_latent: int = 1,
        max_length: int = 512,
    ) -> None:
        if template not in TEMPLATES:
            raise ConfigError(f"template={template!r}: expected one of {sorted(TEMPLATES)}")
        if num_latent < 0:
            raise ConfigError(f"num_latent={num_latent}: must be >= 0")
        if max_length < 2:
            raise ConfigError(f"max_length={max_length}: must be >= 2")
        if tokenizer.eos_token_id is None:
            raise ConfigError("tokenizer has no eos_token_id; the target needs EOS")
        self.tokenizer = tokenizer
        self.category = category
        self.word = category_word(category)
        self.template = template
        self.num_latent = int(num_latent)
        self.max_length = int(max_length)
        instruction, history = TEMPLATES[template]
        self._segment_a = instruction.replace("{C}", self.word)
        # B keeps {H}; "{C}" is substituted now so only the history varies per sample.
        self._segment_b = history.replace("{C}", self.word)
        self._segment_a_ids: list[int] = self._encode(self._segment_a)
        self._target_cache: dict[str, list[int]] = {}

    # ---- text -----------------------------------------------------------------------------
    def segment_a(self) -> str:
        """Segment A (instruction) as text."""
        return self._segment_a

    def segment_b(self, history_titles: Sequence[str]) -> str:
        """Segment B (history and response header) as text."""
        return self._segment_b.replace("{H}", format_history(history_titles))

    def prompt_text(self, history_titles: Sequence[str]) -> str:
        """A + B as one string (for display; ids come from the separately encoded segments)."""
        return self._segment_a + self.segment_b(history_titles)

    @staticmethod
    def target_text(title: str) -> str:
        """The target string ``'"' + title + '"\\n'`` (EOS is added as an id, not as text)."""
        return f'"{title}"\n'

    # ---- ids ------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``[_encode(text) for text in texts]`` in one tokenizer call."""
        # The Rust backend directly (no offsets, no Python wrapping) is ~2x faster than
        # tokenizer(texts); the ids are the same (checked in tests/data).
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        fast = getattr(backend, "encode_batch_fast", None)
        if fast is not None:
            return [encoding.ids for encoding in fast(texts, add_special_tokens=False)]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [list(ids) for ids in encoded]

    @property
    def eos_id(self) -> int:
        """The tokenizer's EOS id (ends every target)."""
        return int(self.tokenizer.eos_token_id)

    def prompt_ids(self, history_titles: Sequence[str]) -> list[int]:
        """Ids of segment A + segment B (not truncated, no thought tokens)."""
        return self._segment_a_ids + self._encode(self.segment_b(history_titles))

    def target_ids(self, title: str) -> list[int]:
        """Ids of ``'"' + title + '"\\n'`` encoded as one string, then EOS."""
        ids = self._target_cache.get(title)
        if ids is None:
            ids = self._encode(self.target_text(title)) + [self.eos_id]
            self._target_cache[title] = ids
        return list(ids)

    def _fit(self, prompt: list[int], target: list[int]) -> EncodedSample:
        """Left-truncates the prompt to fit ``max_length`` with the thought slots and target."""
        budget = self.max_length - self.num_latent - len(target)
        if budget < 1:
            raise ConfigError(
                f"max_length={self.max_length} leaves no room for the prompt: target has "
                f"{len(target)} tokens and num_latent={self.num_latent}"
            )
        if len(prompt) > budget:
            prompt = prompt[len(prompt) - budget :]  # keep the most recent history (left cut)
        return EncodedSample(prompt_ids=prompt, target_ids=target)

    def encode(self, sample: Sample) -> EncodedSample:
        """Prompt and target ids; the prompt is left-truncated so that
        ``len(prompt) + num_latent + len(target) <= max_length``."""
        return self._fit(
            self.prompt_ids(sample.history_titles), self.target_ids(sample.target_title)
        )

    def target_ids_many(self, titles: Sequence[str]) -> list[list[int]]:
        """``[target_ids(t) for t in titles]`` with one batched tokenizer call for new titles."""
        missing = sorted(set(titles) - self._target_cache.keys())
        if missing:
            encoded = self._encode_batch([self.target_text(title) for title in missing])
            for title, ids in zip(missing, encoded):
                self._target_cache[title] = list(ids) + [self.eos_id]
        return [list(self._target_cache[title]) for title in titles]

    def encode_many(self, samples: Sequence[Sample]) -> list[EncodedSample]:
        """``[encode(s) for s in samples]``, with batched tokenizer calls (much faster)."""
        if not samples:
            return []
        texts = [self.segment_b(s.history_titles) for s in samples]
        segment_b_ids = self._encode_batch(texts)
        self.target_ids_many([s.target_title for s in samples])
        return [
            self._fit(
                self._segment_a_ids + list(history_ids), list(self._target_cache[s.target_title])
            )
            for s, history_ids in zip(samples, segment_b_ids)
        ]

    def thought_token_id(self) -> int:
        """Id of THOUGHT_TOKEN, adding it to the tokenizer as a special token if missing."""
        token_id = self.tokenizer.convert_tokens_to_ids(THOUGHT_TOKEN)
        if token_id is None or token_id == self.tokenizer.unk_token_id or token_id < 0:
            self.tokenizer.add_tokens([THOUGHT_TOKEN], special_tokens=True)
            token_id = self.tokenizer.convert_tokens_to_ids(THOUGHT_TOKEN)
        return int(token_id)

    def full_ids(self, sample: Sample) -> tuple[list[int], list[int]]:
        """(input_ids, labels): ``prompt + [thought] * N + target``; labels are -100 except on
        the target tokens (EOS included)."""
        encoded = self.encode(sample)
        thought = [self.thought_token_id()] * self.num_latent if self.num_latent else []
        input_ids = encoded.prompt_ids + thought + encoded.target_ids
        labels = [IGNORE_INDEX] * (len(encoded.prompt_ids) + len(thought)) + encoded.target_ids
        return input_ids, labels
