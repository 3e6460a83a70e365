"""Seeded, offline generators of long-context tasks (RULER-style), sized in tokens of a given tokenizer.

Two families, because the router is trained to tell them apart:

* **retrieval** tasks hide a few facts at arbitrary depths of a long filler; answering needs attention to reach any
  position, so they tolerate little sparse attention (``niah_*``, ``kv_lookup``, ``variable_tracking``);
* **holistic** tasks are answerable from statistics spread over the whole input or from its local end
  (``fwe``, ``cwe``, ``continuation``, ``summary_like``); a sink + local window sees enough of them.

``length`` is the target token count of the user message, i.e. ``context + "\\n\\n" + question``; a chat template
adds its own few dozen tokens on top. Every example is drawn from its own RNG seeded by
``(seed, task, length, index)``, so a split is reproducible, the first k examples do not depend on ``n``, and
train / validation splits made with different seeds differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import string
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from tqdm.auto import tqdm

from flux.data.haystack import Haystack, english_words
from flux.data.tokens import count_tokens
from flux.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TaskType = Literal["retrieval", "holistic"]
TASK_TYPES: tuple[str, ...] = ("retrieval", "holistic")
SEPARATOR = "\n\n"  # between context and question, as in the prompt builder
MIN_LENGTH_TOKENS = 64

ADJECTIVES: tuple[str, ...] = (
    "amber", "ancient", "bitter", "brave", "bright", "calm", "clever", "crimson", "curious", "damp", "eager",
    "fierce", "gentle", "golden", "grumpy", "hidden", "hollow", "humble", "icy", "jolly", "lazy", "lonely", "lucky",
    "misty", "modest", "noble", "pale", "polite", "proud", "quick", "quiet", "rapid", "rusty", "sharp", "shiny",
    "silent", "silver", "sleepy", "smooth", "snowy", "spicy", "steady", "sunny", "tidy", "velvet", "wild", "windy",
)  # fmt: skip
NOUNS: tuple[str, ...] = (
    "anchor", "badger", "barrel", "beacon", "blossom", "canyon", "castle", "cedar", "comet", "compass", "cottage",
    "crystal", "falcon", "feather", "garden", "glacier", "harbor", "helmet", "island", "jacket", "kettle", "lantern",
    "meadow", "mirror", "monsoon", "orchard", "otter", "palace", "pebble", "pepper", "pigeon", "planet", "puzzle",
    "quarry", "rabbit", "ribbon", "saddle", "spider", "summit", "teapot", "thunder", "tiger", "tulip", "valley",
    "violin", "walnut", "willow",
)  # fmt: skip
TOPIC_SENTENCES: tuple[str, ...] = (
    "This document is mainly about the {}.",
    "Once more, the {} is the subject at hand.",
    "Everything here comes back to the {}.",
    "The {} is mentioned yet again.",
    "Keep thinking about the {} while reading.",
    "Our main topic is still the {}.",
)


@dataclass(frozen=True)
class Example:
    """One generated task instance. ``answers`` lists every reference string (all are expected for multi-answer
    tasks); ``meta`` records how it was drawn (haystack kind, needle depths, ...) for depth/position analyses."""

    id: str
    task: str
    task_type: str
    context: str
    question: str
    answers: list[str]
    length: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Draft:
    context: str
    question: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


class _Builder:
    """What a task generator needs for one example: token counting, the haystack and the budget."""

    def __init__(self, haystack: Haystack, length: int, depth: float | None) -> None:
        self.haystack = haystack
        self.tokenizer = haystack.tokenizer
        self.length = length
        self.fixed_depth = depth
        self.separator_tokens = self.count(SEPARATOR)

    def count(self, text: str) -> int:
        return count_tokens(self.tokenizer, text)

    def depth(self, rng: random.Random) -> float:
        return self.fixed_depth if self.fixed_depth is not None else rng.random()

    def context_budget(self, question: str) -> int:
        budget = self.length - self.count(question) - self.separator_tokens
        if budget <= 0:
            raise ConfigError(
                f"length_tokens={self.length} leaves no room for a context next to the question; raise length_tokens"
            )
        return budget

    def with_inserts(
        self, rng: random.Random, inserts: list[tuple[float, str]], question: str, avoid: Sequence[str] = ()
    ) -> str:
        """Haystack filled to the remaining budget with ``inserts`` (depth in [0, 1], sentence) placed in it.

        Inserts with equal slots keep their list order, so chained statements stay in order. The filler is redrawn
        if it happens to contain one of ``avoid`` (an answer string), keeping answers unambiguous.
        """
        budget = self.context_budget(question) - sum(self.count(" " + text) for _, text in inserts)
        if budget < 0:
            raise ConfigError(
                f"length_tokens={self.length} is too short for this task's {len(inserts)} inserted sentences; "
                "raise length_tokens"
            )
        for _ in range(20):
            filler = self.haystack.fill(budget, rng)
            joined = " ".join(filler)
            if not any(a in joined for a in avoid):
                return _place(filler, inserts)
        raise RuntimeError(f"could not draw a {self.haystack.kind} haystack free of the answers {list(avoid)}")

    def fit_items(self, build: Callable[[int], str], budget: int, minimum: int = 1) -> tuple[int, str]:
        """An item count n, and ``build(n)``, such that the text has ``budget`` tokens within 2%.

        Tokens grow about linearly in n, so a proportional update converges in two or three tokenisations.
        """
        n = max(minimum, 8)
        text = build(n)
        tokens = self.count(text)
        for _ in range(8):
            target = max(minimum, round(n * budget / max(tokens, 1)))
            if abs(tokens - budget) <= budget // 50 or target == n:
                break
            n = target
            text = build(n)
            tokens = self.count(text)
        if tokens > budget * 1.1:
            raise ConfigError(f"length_tokens={self.length} is too short for this task; raise length_tokens")
        return n, text


def _place(filler: list[str], inserts: list[tuple[float, str]]) -> str:
    slots = sorted((round(depth * len(filler)), k, text) for k, (depth, text) in enumerate(inserts))
    parts: list[str] = []
    previous = 0
    for slot, _, text in slots:
        parts.extend(filler[previous:slot])
        parts.append(text)
        previous = slot
    parts.extend(filler[previous:])
    return " ".join(parts)


def _keys(rng: random.Random, k: int) -> list[str]:
    pairs = rng.sample([(a, n) for a in ADJECTIVES for n in NOUNS], k)
    return [f"{a}-{n}" for a, n in pairs]


def _numbers(rng: random.Random, k: int, digits: int) -> list[str]:
    return [str(v) for v in rng.sample(range(10 ** (digits - 1), 10**digits), k)]


def _names(rng: random.Random, k: int) -> list[str]:
    names: dict[str, None] = {}  # insertion-ordered: a set's order would change with PYTHONHASHSEED
    while len(names) < k:
        names.setdefault("".join(rng.choices(string.ascii_uppercase, k=5)), None)
    return list(names)


def _needle(key: str, value: str) -> str:
    return f"The special magic number for {key} is {value}."


def _niah_single(b: _Builder, rng: random.Random, digits: int) -> _Draft:
    (key,) = _keys(rng, 1)
    (value,) = _numbers(rng, 1, digits)
    question = f"In the text above, what is the special magic number for {key}?"
    depth = b.depth(rng)
    context = b.with_inserts(rng, [(depth, _needle(key, value))], question, avoid=[value])
    return _Draft(context, question, [value], {"depths": [depth]})


def _niah_multikey(b: _Builder, rng: random.Random, num_keys: int, digits: int) -> _Draft:
    keys = _keys(rng, num_keys)
    values = _numbers(rng, num_keys, digits)
    depths = [b.depth(rng)] + [rng.random() for _ in range(num_keys - 1)]
    question = f"In the text above, what is the special magic number for {keys[0]}?"
    inserts = [(d, _needle(k, v)) for d, k, v in zip(depths, keys, values, strict=True)]
    context = b.with_inserts(rng, inserts, question, avoid=values)
    return _Draft(context, question, [values[0]], {"depths": depths, "distractor_keys": keys[1:]})


def _niah_multivalue(b: _Builder, rng: random.Random, num_values: int, digits: int) -> _Draft:
    (key,) = _keys(rng, 1)
    values = _numbers(rng, num_values, digits)
    depths = [b.depth(rng)] + [rng.random() for _ in range(num_values - 1)]
    question = f"In the text above, what are all the special magic numbers for {key}? List every one of them."
    inserts = [(d, _needle(key, v)) for d, v in zip(depths, values, strict=True)]
    context = b.with_inserts(rng, inserts, question, avoid=values)
    return _Draft(context, question, values, {"depths": depths})


def _niah_multiquery(b: _Builder, rng: random.Random, num_queries: int, digits: int) -> _Draft:
    keys = _keys(rng, num_queries)
    values = _numbers(rng, num_queries, digits)
    depths = [b.depth(rng)] + [rng.random() for _ in range(num_queries - 1)]
    listed = ", ".join(keys[:-1]) + f" and {keys[-1]}"
    question = f"In the text above, what are the special magic numbers for {listed}? Give one number per key."
    inserts = [(d, _needle(k, v)) for d, k, v in zip(depths, keys, values, strict=True)]
    context = b.with_inserts(rng, inserts, question, avoid=values)
    return _Draft(context, question, values, {"depths": depths})


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _kv_lookup(b: _Builder, rng: random.Random) -> _Draft:
    """A JSON object of random UUID pairs; the pairs themselves are the haystack."""
    key, value = _uuid(rng), _uuid(rng)
    depth = b.depth(rng)
    question = f'In the JSON object above, what is the value stored under the key "{key}"?'
    pair_seed = rng.getrandbits(64)

    def build(n: int) -> str:
        pair_rng = random.Random(pair_seed)
        pairs = [(_uuid(pair_rng), _uuid(pair_rng)) for _ in range(n - 1)]
        pairs.insert(round(depth * (n - 1)), (key, value))
        return "JSON data:\n{\n" + ",\n".join(f'  "{k}": "{v}"' for k, v in pairs) + "\n}"

    n, context = b.fit_items(build, b.context_budget(question), minimum=2)
    return _Draft(context, question, [value], {"depths": [depth], "num_pairs": n})


def _variable_tracking(b: _Builder, rng: random.Random, num_chains: int, num_hops: int, digits: int) -> _Draft:
    """Chains ``VAR A = v. ... VAR B = VAR A. ...``; the answer is every variable of the first chain."""
    values = _numbers(rng, num_chains, digits)
    names = _names(rng, num_chains * (num_hops + 1))
    chains = [names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)] for c in range(num_chains)]
    inserts: list[tuple[float, str]] = []
    for chain, value in zip(chains, values, strict=True):
        depths = sorted(rng.random() for _ in chain)
        statements = [f"VAR {chain[0]} = {value}."] + [
            f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, len(chain))
        ]
        inserts.extend(zip(depths, statements, strict=True))
    question = (
        f"In the text above, which variables are assigned the value {values[0]}, directly or through other "
        "variables? List all of them."
    )
    context = b.with_inserts(rng, inserts, question, avoid=values + names)
    return _Draft(context, question, chains[0], {"chains": chains})


def _coded_words(rng: random.Random, k: int) -> list[str]:
    words: set[str] = set()
    while len(words) < k:
        words.add("".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 7))))
    return sorted(words)


def _fwe(b: _Builder, rng: random.Random, vocab_size: int, alpha: float, top_k: int) -> _Draft:
    """Coded words drawn from a Zipf law; the answer is the ``top_k`` most frequent (strictly ahead of the rest)."""
    question = (
        f"Above is a text of coded words. Which {top_k} coded words occur most often in it? Answer with the words."
    )
    budget = b.context_budget(question)
    for _ in range(20):
        vocab = _coded_words(rng, vocab_size)
        rng.shuffle(vocab)
        cumulative: list[float] = []
        total = 0.0
        for rank in range(1, vocab_size + 1):
            total += rank**-alpha
            cumulative.append(total)
        stream_seed = rng.getrandbits(64)

        def build(n: int, _vocab: list[str] = vocab, _cum: list[float] = cumulative, _seed: int = stream_seed) -> str:
            return " ".join(random.Random(_seed).choices(_vocab, cum_weights=_cum, k=n))

        n, context = b.fit_items(build, budget, minimum=top_k + 1)
        ranked = Counter(context.split()).most_common(top_k + 1)
        if len(ranked) > top_k and ranked[top_k - 1][1] > ranked[top_k][1]:
            answers = [w for w, _ in ranked[:top_k]]
            return _Draft(context, question, answers, {"counts": dict(ranked[:top_k]), "num_words": n})
    raise ConfigError(f"length_tokens={b.length} is too short to separate the top {top_k} words; raise length_tokens")


def _cwe(b: _Builder, rng: random.Random, num_common: int, uncommon_freq: int, common_share: float) -> _Draft:
    """A numbered word list where ``num_common`` words recur often and the others ``uncommon_freq`` times."""
    question = (
        f"Which {num_common} words appear most often in the numbered list above? Answer with those {num_common} words."
    )
    vocabulary = english_words()
    list_seed = rng.getrandbits(64)
    minimum = num_common * (uncommon_freq + 2)

    def layout(n: int) -> tuple[int, int]:
        common_freq = max(uncommon_freq + 2, round(common_share * n / num_common))
        return common_freq, max(0, (n - num_common * common_freq) // uncommon_freq)

    def build(n: int) -> str:
        common_freq, num_uncommon = layout(n)
        list_rng = random.Random(list_seed)
        words = list_rng.sample(vocabulary, num_common + num_uncommon)
        items = words[:num_common] * common_freq + words[num_common:] * uncommon_freq
        list_rng.shuffle(items)
        return "\n".join(f"{i}. {w}" for i, w in enumerate(items, 1))

    n, context = b.fit_items(build, b.context_budget(question), minimum=minimum)
    common_freq, num_uncommon = layout(n)
    common = random.Random(list_seed).sample(vocabulary, num_common + num_uncommon)[:num_common]
    return _Draft(context, question, common, {"common_freq": common_freq, "num_uncommon": num_uncommon})


def _continuation(b: _Builder, rng: random.Random, terms: int) -> _Draft:
    """The answer sits in the last sentence: continue a number sequence, or repeat the closing password."""
    if rng.random() < 0.5:
        start, step = rng.randint(1, 99), rng.randint(2, 12)
        shown = ", ".join(str(start + i * step) for i in range(terms))
        tail = f"Finally, here is a number sequence to continue: {shown},"
        question = "What number comes next in the sequence at the very end of the text?"
        answer, variant = str(start + terms * step), "sequence"
    else:
        (key,) = _keys(rng, 1)
        tail = f"The closing password of this text is {key}."
        question = "What is the closing password given in the last sentence of the text?"
        answer, variant = key, "password"
    context = b.with_inserts(rng, [(1.0, tail)], question, avoid=[answer])
    return _Draft(context, question, [answer], {"variant": variant})


def _summary_like(b: _Builder, rng: random.Random, period: int, num_distractors: int) -> _Draft:
    """A topic noun recurs every ``period`` filler sentences; a few other nouns are mentioned once."""
    topic, *distractors = rng.sample(NOUNS, 1 + num_distractors)
    question = (
        "Which single word names the main topic that keeps recurring throughout the text above? Answer with that word."
    )
    budget = b.context_budget(question)
    tokens = b.haystack.sentence_tokens
    mean_filler = sum(tokens) / len(tokens)
    mean_topic = sum(b.count(" " + t.format(topic)) for t in TOPIC_SENTENCES) / len(TOPIC_SENTENCES)
    num_topic = max(2, round(budget / (period * mean_filler + mean_topic)))
    inserts = [((i + 0.5) / num_topic, rng.choice(TOPIC_SENTENCES).format(topic)) for i in range(num_topic)]
    inserts += [(rng.random(), f"There is also a brief note about the {d}.") for d in distractors]
    context = b.with_inserts(rng, inserts, question, avoid=[topic])
    return _Draft(context, question, [topic], {"topic_mentions": num_topic, "distractors": distractors})


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its family, generator, tunable options (with defaults) and whether filler is used."""

    name: str
    task_type: TaskType
    build: Callable[..., _Draft]
    defaults: Mapping[str, Any]
    uses_haystack: bool
    description: str


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("niah_single", "retrieval", _niah_single, {"digits": 7}, True, "one needle, one key"),
        TaskSpec(
            "niah_multikey", "retrieval", _niah_multikey, {"num_keys": 4, "digits": 7}, True,
            "one queried needle among needles with other keys",
        ),
        TaskSpec(
            "niah_multivalue", "retrieval", _niah_multivalue, {"num_values": 4, "digits": 7}, True,
            "one key with several values; all are expected",
        ),
        TaskSpec(
            "niah_multiquery", "retrieval", _niah_multiquery, {"num_queries": 4, "digits": 7}, True,
            "several keys asked at once",
        ),
        TaskSpec("kv_lookup", "retrieval", _kv_lookup, {}, False, "value of one UUID key in a JSON object of UUIDs"),
        TaskSpec(
            "variable_tracking", "retrieval", _variable_tracking, {"num_chains": 2, "num_hops": 4, "digits": 5},
            True, "all variables bound to a value through assignment chains",
        ),
        TaskSpec(
            "fwe", "holistic", _fwe, {"vocab_size": 500, "alpha": 2.0, "top_k": 3}, False,
            "most frequent coded words of a Zipf-distributed text",
        ),
        TaskSpec(
            "cwe", "holistic", _cwe, {"num_common": 10, "uncommon_freq": 2, "common_share": 0.4}, False,
            "most common words of a numbered word list",
        ),
        TaskSpec("continuation", "holistic", _continuation, {"terms": 6}, True, "answer is in the final sentence"),
        TaskSpec(
            "summary_like", "holistic", _summary_like, {"period": 4, "num_distractors": 2}, True,
            "the topic word recurring throughout the text",
        ),
    )
}  # fmt: skip


class UnknownTaskError(ConfigError, KeyError):
    """A synthetic task name that is not registered (still a KeyError for callers that look names up)."""


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UnknownTaskError(f"unknown synthetic task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]


def _example_seed(seed: int, task: str, length: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{task}/{length}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _check_common(n: int, length_tokens: int, depth: float | None) -> None:
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    if length_tokens < MIN_LENGTH_TOKENS:
        raise ConfigError(f"length_tokens must be >= {MIN_LENGTH_TOKENS}, got {length_tokens}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ConfigError(f"depth must be in [0, 1] or None (random per example), got {depth}")


def _resolve_options(spec: TaskSpec, options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for task {spec.name!r}; its options are {dict(spec.defaults)}")
    resolved = {**spec.defaults, **options}
    for name, value in resolved.items():  # every option is a count, a digit count, an exponent or a share
        kind = type(spec.defaults[name])
        numeric = int if kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric) or value <= 0:
            raise ConfigError(f"option {name}={value!r} of task {spec.name!r} must be a positive {kind.__name__}")
    return resolved


def _generate(
    spec: TaskSpec, n: int, length: int, haystack: Haystack, seed: int, depth: float | None, options: dict[str, Any]
) -> list[Example]:
    builder = _Builder(haystack, length, depth)
    examples = []
    for i in range(n):
        rng = random.Random(_example_seed(seed, spec.name, length, i))
        draft = spec.build(builder, rng, **options)
        meta = {"seed": seed, "index": i, "haystack": haystack.kind if spec.uses_haystack else None, **draft.meta}
        examples.append(
            Example(
                id=f"{spec.name}-L{length}-s{seed}-{i:05d}",
                task=spec.name,
                task_type=spec.task_type,
                context=draft.context,
                question=draft.question,
                answers=draft.answers,
                length=length,
                meta=meta,
            )
        )
    return examples


def make_examples(
    task: str,
    n: int,
    length_tokens: int,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    haystack: str | Haystack = "noise",
    depth: float | None = None,
    **options: Any,
) -> list[Example]:
    """``n`` examples of ``task`` at about ``length_tokens`` tokens (context + blank line + question).

    ``haystack`` is ``"noise"`` or ``"text"`` (or a prebuilt :class:`Haystack` to reuse its token counts); tasks
    whose items are their own filler (``kv_lookup``, ``fwe``, ``cwe``) ignore it. ``depth`` in [0, 1] fixes where the
    queried needle sits (niah_*, kv_lookup); None draws it uniformly per example; other tasks ignore it.
    ``options`` override a task's defaults (``TASKS[task].defaults``).
    """
    spec = get_task(task)
    _check_common(n, length_tokens, depth)
    resolved = _resolve_options(spec, options)
    hay = haystack if isinstance(haystack, Haystack) else Haystack(haystack, tokenizer)
    return _generate(spec, n, length_tokens, hay, seed, depth, resolved)


def check_lengths(length_tokens: int | Sequence[int]) -> list[int]:
    """``length_tokens`` as a non-empty list of valid lengths."""
    lengths = [length_tokens] if isinstance(length_tokens, int) else list(length_tokens)
    if not lengths:
        raise ConfigError("length_tokens is empty; give one length or a list of lengths")
    for length in lengths:
        _check_common(0, length, None)
    return lengths


def resolve_task_options(
    tasks: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Every task's options (defaults overridden by ``options[task]``), validating names before any generation."""
    if not tasks:
        raise ConfigError(f"tasks is empty; name at least one of {sorted(TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"tasks lists a task more than once: {list(tasks)}")
    specs = [get_task(t) for t in tasks]
    options = dict(options or {})
    stray = sorted(set(options) - set(tasks))
    if stray:
        raise ConfigError(f"options given for task(s) {stray} that are not in tasks={list(tasks)}")
    return {spec.name: _resolve_options(spec, options.get(spec.name, {})) for spec in specs}


def make_mixture(
    tasks: Sequence[str],
    n_per_task: int,
    length_tokens: int | Sequence[int],
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    haystack: str = "noise",
    depth: float | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    shuffle: bool = True,
) -> list[Example]:
    """``n_per_task`` examples of every task at every length, shuffled together (seeded) unless ``shuffle=False``.

    ``options`` maps a task name to option overrides for that task.
    """
    resolved = resolve_task_options(tasks, options)
    specs = [TASKS[t] for t in tasks]
    lengths = check_lengths(length_tokens)
    _check_common(n_per_task, min(lengths), depth)
    hay = Haystack(haystack, tokenizer)
    examples: list[Example] = []
    with tqdm(total=len(specs) * len(lengths) * n_per_task, desc="synthetic examples", disable=None) as bar:
        for spec in specs:
            for length in lengths:
                examples.extend(_generate(spec, n_per_task, length, hay, seed, depth, resolved[spec.name]))
                bar.update(n_per_task)
    if shuffle:
        random.Random(seed).shuffle(examples)
    return examples
