"""Offline haystack text for long-context tasks, sized in tokens of a given tokenizer.

Two sources, both available on any machine without downloads:

* ``noise``: short, bland, digit-free sentences in random order. Retrieval is easy to judge on them because nothing
  in the filler resembles a needle.
* ``text``: natural English prose from the documentation topics that ship with CPython (``pydoc_data.topics``),
  split into sentences and read as a contiguous run from a seeded starting point, so the filler has real discourse
  structure (closer to the essays RULER uses than noise is).

Token budgets are met exactly enough for a ±10% length target without tokenising every candidate haystack: each
sentence is tokenised once (with the leading space it gets when sentences are joined), and a haystack is assembled by
summing those cached counts. For byte-level BPE tokenizers (GPT-2 / Llama-3 / Qwen style) the sum equals the token
count of the joined text up to one token at the very start.
"""

from __future__ import annotations

import functools
import random
import re
from typing import TYPE_CHECKING, Literal

from flux.data.tokens import encode_batch
from flux.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HaystackKind = Literal["noise", "text"]
HAYSTACK_KINDS: tuple[str, ...] = ("noise", "text")

NOISE_SENTENCES: tuple[str, ...] = (
    "The river runs past the old mill.",
    "A gray cat sleeps on the warm porch.",
    "The morning bus is always on time.",
    "Leaves fall slowly in the autumn wind.",
    "Steam rises from a pot in the kitchen.",
    "Children play football in the park.",
    "The baker opens his shop at dawn.",
    "A small boat drifts across the lake.",
    "The clock on the wall ticks softly.",
    "Rain taps gently against the window.",
    "The library is quiet in the afternoon.",
    "A farmer walks along the muddy road.",
    "The mountains look blue from far away.",
    "Fresh bread smells good in the morning.",
    "The train crosses the long iron bridge.",
    "Birds sing in the tall oak tree.",
    "The market is busy on weekends.",
    "A candle burns on the wooden table.",
    "Snow covers the roofs of the village.",
    "An old man feeds the ducks by the fountain.",
    "Waves roll onto the sandy beach.",
    "The wooden gate creaks when it opens.",
    "A dog barks somewhere down the street.",
    "The stars shine brightly over the hills.",
)

# Paragraphs of the pydoc topics that are not prose: indented code/grammar blocks, reST heading underlines, doctests.
_HEADING_UNDERLINE = re.compile(r"[*=\-~^]+")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")
_WORD = re.compile(r"\b[a-z]{4,10}\b")
_MAX_SKIPS = 16  # consecutive overshooting sentences skipped before a haystack is declared full


@functools.lru_cache(maxsize=1)
def text_sentences() -> tuple[str, ...]:
    """Prose sentences from CPython's bundled documentation topics, in document order, without duplicates."""
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            lines = paragraph.split("\n")
            if not lines[0] or lines[0][0].isspace() or ">>>" in paragraph:
                continue
            if len(lines) >= 2 and _HEADING_UNDERLINE.fullmatch(lines[-1].strip()):
                continue
            flat = " ".join(line.strip() for line in lines)
            for sentence in _SENTENCE_BREAK.split(flat):
                if sentence[-1] in ".!?" and len(sentence.split()) >= 4 and len(sentence) <= 600:
                    seen.setdefault(sentence, None)
    return tuple(seen)


@functools.lru_cache(maxsize=1)
def english_words() -> tuple[str, ...]:
    """Distinct lowercase words (4-10 letters) of the bundled documentation prose, sorted: English vocabulary with
    some Python jargon mixed in.

    Used where a task needs many distinct real words (common-word extraction) without a word-list download.
    """
    words = {w for sentence in text_sentences() for w in _WORD.findall(sentence)}
    return tuple(sorted(words))


class Haystack:
    """Filler sentences of one kind, with per-sentence token counts cached for one tokenizer.

    Build one per tokenizer and reuse it across examples; construction tokenises the whole source once
    (~1.7k sentences for ``text``, milliseconds for a fast tokenizer).
    """

    def __init__(self, kind: str, tokenizer: PreTrainedTokenizerBase) -> None:
        if kind not in HAYSTACK_KINDS:
            raise ConfigError(f"unknown haystack {kind!r}; choose one of {list(HAYSTACK_KINDS)}")
        self.kind = kind
        self.tokenizer = tokenizer
        self.sentences: tuple[str, ...] = NOISE_SENTENCES if kind == "noise" else text_sentences()
        # Counted with the leading space each sentence has once joined, which is how BPE sees it in the haystack.
        self.sentence_tokens: list[int] = [
            len(ids) for ids in encode_batch(tokenizer, [" " + s for s in self.sentences])
        ]
        self._shortest = min(self.sentence_tokens)

    def fill(self, budget_tokens: int, rng: random.Random) -> list[str]:
        """Sentences whose joined text has at most ``budget_tokens`` tokens, close to it.

        ``noise`` draws sentences independently at random; ``text`` reads consecutive sentences from a random start,
        wrapping around the corpus when the budget exceeds it. A sentence that would overshoot is skipped (a few
        times in a row at most), so the shortfall is usually a handful of tokens rather than one long sentence.
        """
        if budget_tokens < 0:
            raise ConfigError(f"haystack budget must be >= 0 tokens, got {budget_tokens}")
        n = len(self.sentences)
        chosen: list[str] = []
        remaining = budget_tokens
        misses = 0
        index = rng.randrange(n)
        while remaining >= self._shortest and misses < _MAX_SKIPS:
            if self.kind == "noise":
                index = rng.randrange(n)
            cost = self.sentence_tokens[index]
            if cost <= remaining:
                chosen.append(self.sentences[index])
                remaining -= cost
                misses = 0
            else:
                misses += 1
            if self.kind == "text":
                index = (index + 1) % n
        return chosen
