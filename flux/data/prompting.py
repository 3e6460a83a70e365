"""Prompts with marked token spans, and the left-padded batch layout every flux model consumes.

A prompt is the backbone's chat template around one user message, ``context + separator + question``, optionally
followed by the assistant's ``answer`` (training). The router pools query states over the context and question
spans and the loss reads the answer span, so spans must be exact token indices. The template is rendered once with
private-use marker strings in place of the three texts and cut at the markers, so the character range of every part
is known by construction (for any template that copies message contents verbatim, whatever it adds around them).

Characters are mapped to tokens in one of two ways:

* fast tokenizers (every current HF backbone) tokenise the whole string once, exactly as generation-time code that
  tokenises the rendered prompt would, and map the part ranges through the offset mapping;
* other tokenizers (no offsets) tokenise the pieces one by one; the spans are then exact by construction, and the ids
  may differ from whole-string tokenisation only at piece borders (e.g. ``"\n\n"`` before a word is one token as a
  piece, two in running text for GPT-2-style BPE).

Tokenizers without a chat template (or ``chat=False``, for benchmarks whose protocol feeds raw prompts) use a plain
``{context}{separator}{question}{answer_cue} {answer}`` layout after the tokenizer's own leading special tokens (e.g.
BOS), with ``answer_cue="\nAnswer:"`` by default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from flux.data.tokens import encode_batch
from flux.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Span = tuple[int, int]
IGNORE_INDEX = -100  # label value ignored by the loss, as in HF / torch cross-entropy
# Private-use code points: no real text contains them, and no template trims or escapes them.
_MARKERS = {name: f"\ue000flux-{name}\ue001" for name in ("context", "question", "answer")}


class PromptTooLongError(ConfigError):
    """Even with the whole context removed the prompt exceeds ``max_tokens``."""


@dataclass(frozen=True)
class Prompt:
    """A tokenised prompt. Spans are half-open ``[start, end)`` token indices into ``input_ids``; None if absent.

    ``input_ids`` is a list from :func:`build_prompt`; dataset caches may hold it as an int32 array instead.
    ``truncated`` counts context tokens removed from the middle to meet ``max_tokens``.
    """

    input_ids: Sequence[int]
    context_span: Span | None
    question_span: Span | None
    answer_span: Span | None
    task: str = "default"
    id: str = ""
    answers: tuple[str, ...] = ()
    truncated: int = 0
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)


def _leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Special tokens the tokenizer itself puts before a text (BOS for Llama-style, nothing for GPT-2)."""
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start]
    return []


Layout = list[tuple[str | None, str]]  # (part name, or None for template text; text), in prompt order


def _group_by_offsets(ids: list[int], offsets: list[tuple[int, int]], layout: Layout) -> list[list[int]]:
    """Split one whole-string tokenisation into per-piece id lists through its offset mapping.

    A token belongs to the piece holding its last character, so a word token that carries the separator's leading
    space (tokenizers that do not trim offsets report it) lands in the word's piece; tokens without characters (an
    added BOS) stay with the piece of the token before them.
    """
    ids_array = np.asarray(ids, dtype=np.int64)
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts = np.cumsum([0] + [len(piece) for _, piece in layout])[:-1]
    # side="right" skips empty pieces that share a start with the piece holding the token's last character
    owner = np.searchsorted(starts, spans[:, 1] - 1, side="right") - 1
    has_chars = spans[:, 1] > spans[:, 0]
    last_with_chars = np.maximum.accumulate(np.where(has_chars, np.arange(len(ids_array)), -1))
    owner = np.where(last_with_chars >= 0, owner[np.maximum(last_with_chars, 0)], 0)
    bounds = np.cumsum(np.bincount(owner, minlength=len(layout)))[:-1]
    return [chunk.tolist() for chunk in np.split(ids_array, bounds)]


def _encode_with_offsets(
    tokenizer: PreTrainedTokenizerBase, layouts: list[Layout], plain: bool
) -> list[list[list[int]]]:
    """Whole-string tokenisation of every prompt in one batched call (parallel in a fast tokenizer)."""
    texts = ["".join(piece for _, piece in layout) for layout in layouts]
    encoded = tokenizer(texts, add_special_tokens=plain, return_offsets_mapping=True)
    return [
        _group_by_offsets(ids, offsets, layout)
        for ids, offsets, layout in zip(encoded["input_ids"], encoded["offset_mapping"], layouts, strict=True)
    ]


def _encode_pieces(tokenizer: PreTrainedTokenizerBase, layouts: list[Layout], plain: bool) -> list[list[list[int]]]:
    """Piece-by-piece tokenisation for tokenizers without offsets (empty pieces stay empty)."""
    leading = _leading_special_ids(tokenizer) if plain else []
    grouped_all = []
    for layout in layouts:
        pieces = [piece for _, piece in layout]
        encoded = iter(encode_batch(tokenizer, [p for p in pieces if p]))
        grouped = [next(encoded) if p else [] for p in pieces]
        grouped[0] = leading + grouped[0]
        grouped_all.append(grouped)
    return grouped_all


def _template_pieces(
    tokenizer: PreTrainedTokenizerBase,
    parts: dict[str, str],
    separator: str,
    system: str | None,
    answer_cue: str | None,
) -> Layout:
    """The prompt as (part name or None for template text, text) in order: the chat template's rendering, or the
    plain layout when ``answer_cue`` is not None."""
    has_answer = "answer" in parts
    if answer_cue is not None:
        layout: Layout = [(None, f"{system}\n\n" if system else "")]
        layout += _user_pieces(parts, separator)
        layout.append((None, answer_cue))
        if has_answer:
            layout.append(("answer", " " + parts["answer"]))
        return layout
    user = "".join(_MARKERS[name] if name else text for name, text in _user_pieces(parts, separator))
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": user})
    if has_answer:
        messages.append({"role": "assistant", "content": _MARKERS["answer"]})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not has_answer)
    layout = []
    rest = rendered
    for name in ("context", "question", "answer"):
        if name not in parts:
            continue
        if rendered.count(_MARKERS[name]) != 1:
            owner = getattr(tokenizer, "name_or_path", "this tokenizer")
            raise ConfigError(
                f"the chat template of {owner!r} does not copy the {name} text verbatim, so its tokens cannot be "
                "located; use a tokenizer whose template renders message contents unchanged, or pass chat=False"
            )
        before, rest = rest.split(_MARKERS[name])
        layout += [(None, before), (name, parts[name])]
    layout.append((None, rest))
    return layout


def _user_pieces(parts: dict[str, str], separator: str) -> Layout:
    pieces: Layout = []
    if "context" in parts:
        pieces.append(("context", parts["context"]))
    if "context" in parts and "question" in parts:
        pieces.append((None, separator))
    if "question" in parts:
        pieces.append(("question", parts["question"]))
    return pieces


@dataclass(frozen=True)
class PromptInput:
    """The texts of one prompt and the metadata its :class:`Prompt` carries; see :func:`build_prompt`."""

    context: str
    question: str
    answer: str | None = None
    system: str | None = None
    separator: str = "\n\n"
    task: str = "default"
    id: str = ""
    answers: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    def parts(self) -> dict[str, str]:
        if self.answer is not None and not self.answer:
            raise ConfigError(
                f"{self._where()}answer is an empty string; pass None for a generation prompt or a non-empty answer"
            )
        parts = {name: text for name, text in (("context", self.context), ("question", self.question)) if text}
        if not parts:
            raise ConfigError(f"{self._where()}context and question are both empty; a prompt needs one of them")
        if self.answer is not None:
            parts["answer"] = self.answer
        return parts

    def _where(self) -> str:
        where = self.meta.get("where") or self.id
        return f"{where}: " if where else ""


def _fit(pieces: list[list[int]], layout: Layout, max_tokens: int, item: PromptInput) -> int:
    """Cut the middle of the context piece in place so the prompt has ``max_tokens``; return the tokens removed."""
    total = sum(map(len, pieces))
    over = total - max_tokens
    if over <= 0:
        return 0
    context_at = next((i for i, (name, _) in enumerate(layout) if name == "context"), None)
    context_len = len(pieces[context_at]) if context_at is not None else 0
    if over > context_len:
        raise PromptTooLongError(
            f"{item._where()}the prompt needs {total - context_len} tokens besides the context (template, question, "
            f"answer) but max_tokens={max_tokens}; raise max_tokens or shorten the question/answer"
        )
    context = pieces[context_at]
    keep = context_len - over
    head = (keep + 1) // 2
    pieces[context_at] = context[:head] + context[context_len - (keep - head) :]
    return over


def build_prompts(
    tokenizer: PreTrainedTokenizerBase,
    inputs: Sequence[PromptInput],
    max_tokens: int | None = None,
    *,
    chat: bool = True,
    answer_cue: str = "\nAnswer:",
    batch_size: int = 64,
) -> list[Prompt]:
    """:func:`build_prompt` for many inputs, tokenised in batches (a fast tokenizer spreads a batch over cores)."""
    if max_tokens is not None and max_tokens <= 0:
        raise ConfigError(f"max_tokens must be positive or None, got {max_tokens}")
    plain = not chat or getattr(tokenizer, "chat_template", None) is None
    encode = _encode_with_offsets if getattr(tokenizer, "is_fast", False) else _encode_pieces
    prompts: list[Prompt] = []
    quiet = True if len(inputs) <= batch_size else None  # None: a bar on terminals only
    for first in tqdm(range(0, len(inputs), batch_size), desc="tokenising prompts", disable=quiet):
        chunk = inputs[first : first + batch_size]
        layouts = [
            _template_pieces(tokenizer, item.parts(), item.separator, item.system, answer_cue if plain else None)
            for item in chunk
        ]
        # a chat template writes its own BOS into the text; the plain layout relies on the tokenizer adding it
        for item, layout, pieces in zip(chunk, layouts, encode(tokenizer, layouts, plain), strict=True):
            truncated = _fit(pieces, layout, max_tokens, item) if max_tokens is not None else 0
            input_ids: list[int] = []
            spans: dict[str, Span] = {}
            for (name, _), ids in zip(layout, pieces, strict=True):
                if name is not None:
                    spans[name] = (len(input_ids), len(input_ids) + len(ids))
                input_ids.extend(ids)
            prompts.append(
                Prompt(
                    input_ids=input_ids,
                    context_span=spans.get("context"),
                    question_span=spans.get("question"),
                    answer_span=spans.get("answer"),
                    task=item.task,
                    id=item.id,
                    answers=tuple(item.answers),
                    truncated=truncated,
                    meta=dict(item.meta),
                )
            )
    return prompts


def build_prompt(
    tokenizer: PreTrainedTokenizerBase,
    context: str,
    question: str,
    answer: str | None = None,
    max_tokens: int | None = None,
    system: str | None = None,
    *,
    separator: str = "\n\n",
    chat: bool = True,
    answer_cue: str = "\nAnswer:",
    task: str = "default",
    example_id: str = "",
    answers: Sequence[str] = (),
    meta: Mapping[str, Any] | None = None,
) -> Prompt:
    """Tokenise one prompt through the chat template and mark its context, question and answer spans.

    The user message is ``context + separator + question`` (empty parts are left out, with their span None); the
    assistant message is ``answer`` when given (training) or the generation cue when not (inference). ``system``
    replaces the template's default system message, if any. With ``chat=False`` or a tokenizer without a chat
    template, the plain layout is used (``answer_cue`` then precedes the answer; "" for prompts that end with their
    own cue). Over ``max_tokens``, tokens are cut from the middle of the context (its head and tail are what
    long-context prompts rely on); if the rest alone does not fit, raises :class:`PromptTooLongError`.
    """
    item = PromptInput(
        context=context,
        question=question,
        answer=answer,
        system=system,
        separator=separator,
        task=task,
        id=example_id,
        answers=tuple(answers),
        meta=dict(meta or {}),
    )
    return build_prompts(tokenizer, [item], max_tokens, chat=chat, answer_cue=answer_cue)[0]


def collate_left_padded(
    prompts: Sequence[Prompt],
    pad_id: int,
    task_index: Mapping[str, int] | None = None,
    drop_answer: bool = False,
) -> dict[str, Any]:
    """Left-pad prompts into a batch (real tokens flush right, so generation appends at the same column).

    Returns ``input_ids`` / ``attention_mask`` / ``labels`` ``[B, T]`` (labels are the input ids on answer tokens and
    -100 elsewhere, unshifted: the model shifts, as HF causal LMs do), ``segments`` ``{"context", "question": [B, 2]}``
    in padded coordinates (an absent span is the empty span ``[p, p)`` at the prompt's first real token ``p``, so
    consumers can detect it by ``start == end``), ``task_ids`` (via ``task_index``; by default the sorted task names
    of this batch) and the per-sample ``tasks``, ``ids`` and ``answers``. ``drop_answer=True`` cuts each prompt
    before its answer, giving the generation prompts for the same examples.
    """
    if not prompts:
        raise ValueError("cannot collate an empty list of prompts")
    tasks = [p.task for p in prompts]
    if task_index is None:
        task_index = {name: i for i, name in enumerate(sorted(set(tasks)))}
    missing = sorted(set(tasks) - set(task_index))
    if missing:
        raise KeyError(f"task(s) {missing} are not in task_index {dict(task_index)}")

    rows = []
    for p in prompts:
        ids = np.asarray(p.input_ids, dtype=np.int64)
        if drop_answer and p.answer_span is not None:
            ids = ids[: p.answer_span[0]]
        rows.append(ids)
    width = max(len(r) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    segments = {name: torch.empty((batch, 2), dtype=torch.long) for name in ("context", "question")}
    for b, (p, ids) in enumerate(zip(prompts, rows, strict=True)):
        offset = width - len(ids)
        input_ids[b, offset:] = torch.from_numpy(ids)
        attention_mask[b, offset:] = 1
        if p.answer_span is not None and not drop_answer:
            start, end = p.answer_span
            labels[b, offset + start : offset + end] = input_ids[b, offset + start : offset + end]
        for name, span in (("context", p.context_span), ("question", p.question_span)):
            segments[name][b] = torch.tensor(span if span is not None else (0, 0)) + offset
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "segments": segments,
        "task_ids": torch.tensor([task_index[t] for t in tasks], dtype=torch.long),
        "tasks": tasks,
        "ids": [p.id for p in prompts],
        "answers": [list(p.answers) for p in prompts],
    }
