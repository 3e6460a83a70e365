"""Supervised fine-tuning records from JSONL / Parquet files (e.g. the paper's 64K-token SFT mixes).

Each record (a JSON object per line, or a Parquet row with the same columns) has one of three shapes:

1. ``messages``: a list of ``{"role": "system"|"user"|"assistant", "content": str}`` with an optional leading system
   message, exactly one user message and a final assistant message, which is the answer. Multi-turn chats are
   rejected rather than flattened in some arbitrary way.
2. ``prompt`` + ``answer``: the prompt is the user message.
3. ``context`` + ``question`` + ``answer``: the user message is ``context + "\\n\\n" + question``.

Instead of ``answer`` a record may give ``answers`` (a non-empty list of strings; the first is the training target,
all are kept for scoring). Optional fields: ``task`` (default ``"sft"``), ``task_type`` (``"retrieval"`` or
``"holistic"``, default given by the caller), ``id`` (default ``file:line``), ``system`` (shapes 2 and 3).

The router needs the user message split into a context and a question span. Shape 3 gives the split. Shape 1 may
give it too, with ``context`` and ``question`` fields next to ``messages`` (the user message must start with the
context and end with the question). Otherwise the split is automatic: the question is the last paragraph (text
after the last blank line) when it is at most ``QUESTION_MAX_CHARS`` long, as in prompts that end with
"...\\n\\nQuestion: ..."; else it is the last ``QUESTION_TAIL_CHARS`` characters (about 64 tokens), cut at a space.
Either way the text between the two is kept verbatim as the separator, so the rendered user message is unchanged.

Examples longer than ``max_tokens`` lose tokens from the middle of their context. Several examples are never packed
into one sequence: routing decisions are made per input, so a packed row would force one decision on unrelated
examples and mix their attention.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flux.data.prompting import Prompt, PromptInput, build_prompts
from flux.data.synthetic import TASK_TYPES
from flux.errors import ConfigError, FluxUserError, UserFileNotFoundError
from flux.jsonl import iter_json_objects

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

QUESTION_MAX_CHARS = 2000
QUESTION_TAIL_CHARS = 256
SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


class DataFormatError(FluxUserError):
    """A record or file that does not follow the documented SFT format; the message names file and line."""


@dataclass(frozen=True)
class SFTRecord:
    """One validated record, with its user message split into context / separator / question."""

    id: str
    task: str
    task_type: str
    context: str
    separator: str
    question: str
    answer: str
    answers: tuple[str, ...]
    system: str | None
    where: str


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise DataFormatError(f"{path}: unsupported file type; SFT files must end with one of {list(SUFFIXES)}")


def iter_raw_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(location, record)`` pairs; location is ``file:line`` (JSONL) or ``file:row N`` (Parquet), 1-based."""
    path = Path(path)
    if not path.is_file():
        raise UserFileNotFoundError(f"SFT data file {str(path)!r} does not exist; check the data path in the config")
    suffix = _suffix(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}:row {row}", record
        return
    opener = gzip.open if suffix == ".jsonl.gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        yield from iter_json_objects(handle, str(path), DataFormatError)


def _text(record: dict[str, Any], key: str, where: str, required: bool = True) -> str | None:
    value = record.get(key)
    if value is None:
        if required:
            raise DataFormatError(f"{where}: missing field {key!r}")
        return None
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _split_user(user: str) -> tuple[str, str, str]:
    """(context, separator, question) with ``context + separator + question == user``; see the module docstring."""
    head, blank, tail = user.rpartition("\n\n")
    if blank and tail.strip() and len(tail) <= QUESTION_MAX_CHARS:
        stripped = head.rstrip("\n")
        return stripped, user[len(stripped) : len(user) - len(tail)], tail
    if len(user) <= QUESTION_TAIL_CHARS:
        return "", "", user
    cut = len(user) - QUESTION_TAIL_CHARS
    space = user.rfind(" ", 0, cut + 1)
    if space > 0:
        return user[:space], " ", user[space + 1 :]
    return user[:cut], "", user[cut:]


def _from_messages(record: dict[str, Any], where: str) -> tuple[str | None, str, str]:
    """(system, user message, answer) from a ``messages`` list."""
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    roles = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise DataFormatError(f"{where}: messages[{i}] must be an object with role 'system', 'user' or 'assistant'")
        if not isinstance(message.get("content"), str):
            raise DataFormatError(f"{where}: messages[{i}] has no string 'content'")
        roles.append(message["role"])
    system = messages[0]["content"] if roles[0] == "system" else None
    body = roles[1:] if system is not None else roles
    if body != ["user", "assistant"]:
        raise DataFormatError(
            f"{where}: messages must be [system,] user, assistant (single turn, answer last); got roles {roles}"
        )
    return system, messages[-2]["content"], messages[-1]["content"]


def parse_record(record: dict[str, Any], where: str, default_task_type: str = "holistic") -> SFTRecord:
    """Validate one raw record and split its user message; raise :class:`DataFormatError` naming ``where``."""
    record = {key: value for key, value in record.items() if value is not None}  # Parquet has every column per row
    answers: tuple[str, ...]
    if "messages" in record:
        system, user, answer = _from_messages(record, where)
        answers = (answer,)
    else:
        system = _text(record, "system", where, required=False)
        if "prompt" in record:
            user = _text(record, "prompt", where)
        elif "context" in record or "question" in record:
            user = _text(record, "context", where) + "\n\n" + _text(record, "question", where)
        else:
            raise DataFormatError(f"{where}: record needs 'messages', 'prompt' or 'context' + 'question'")
        if "answers" in record:
            raw = record["answers"]
            if not isinstance(raw, list) or not raw or not all(isinstance(a, str) for a in raw):
                raise DataFormatError(f"{where}: 'answers' must be a non-empty list of strings")
            answers = tuple(raw)
        else:
            answers = (_text(record, "answer", where),)
    if not answers[0].strip():
        raise DataFormatError(f"{where}: the answer is empty; every SFT record needs a non-empty answer")
    if not user.strip():
        raise DataFormatError(f"{where}: the user message is empty")

    context, question = _text(record, "context", where, required=False), _text(record, "question", where, False)
    if (context is None) != (question is None):
        raise DataFormatError(f"{where}: give both 'context' and 'question' to mark the split, or neither")
    if context is not None and question is not None:
        if not (user.startswith(context) and user.endswith(question) and len(context) + len(question) <= len(user)):
            raise DataFormatError(f"{where}: the user message does not start with 'context' and end with 'question'")
        separator = user[len(context) : len(user) - len(question)]
    else:
        context, separator, question = _split_user(user)

    task = _text(record, "task", where, required=False) or "sft"
    task_type = _text(record, "task_type", where, required=False) or default_task_type
    if task_type not in TASK_TYPES:
        raise DataFormatError(f"{where}: task_type {task_type!r} is not one of {list(TASK_TYPES)}")
    record_id = record.get("id")
    return SFTRecord(
        id=str(record_id) if record_id is not None else where,
        task=task,
        task_type=task_type,
        context=context,
        separator=separator,
        question=question,
        answer=answers[0],
        answers=answers,
        system=system,
        where=where,
    )


def read_sft_records(paths: str | Path | Sequence[str | Path], default_task_type: str = "holistic") -> list[SFTRecord]:
    """All records of the given files, validated; a task's ``task_type`` must agree across records."""
    if default_task_type not in TASK_TYPES:
        raise ConfigError(f"default_task_type {default_task_type!r} is not one of {list(TASK_TYPES)}")
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    if not paths:
        raise ConfigError("no SFT data files given; set the data file paths in the config")
    records: list[SFTRecord] = []
    types: dict[str, tuple[str, str]] = {}
    for path in paths:
        before = len(records)
        for where, raw in iter_raw_records(path):
            record = parse_record(raw, where, default_task_type)
            first = types.setdefault(record.task, (record.task_type, where))
            if first[0] != record.task_type:
                raise DataFormatError(
                    f"{where}: task {record.task!r} has task_type {record.task_type!r} but {first[0]!r} at {first[1]}"
                )
            records.append(record)
        if len(records) == before:
            raise DataFormatError(f"{path}: the file holds no records")
    return records


def record_input(record: SFTRecord, with_answer: bool = True) -> PromptInput:
    """The prompt texts of one record (``with_answer=False`` for a generation prompt)."""
    return PromptInput(
        context=record.context,
        question=record.question,
        answer=record.answer if with_answer else None,
        system=record.system,
        separator=record.separator,
        task=record.task,
        id=record.id,
        answers=record.answers,
        meta={"where": record.where},
    )


def load_sft(
    paths: str | Path | Sequence[str | Path],
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int | None = None,
    default_task_type: str = "holistic",
) -> tuple[list[Prompt], dict[str, str]]:
    """Tokenised training prompts of the given files (contexts cut in the middle to ``max_tokens``) and the
    task -> task_type map they define. A record that cannot fit raises :class:`PromptTooLongError` naming it."""
    records = read_sft_records(paths, default_task_type)
    prompts = build_prompts(tokenizer, [record_input(r) for r in records], max_tokens)
    return prompts, {r.task: r.task_type for r in records}
