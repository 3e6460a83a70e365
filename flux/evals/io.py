"""Reading local benchmark files with errors that point at `file:line` and say how to fix it.

The harness never downloads anything: every benchmark is read from a path the user gives. Most failures a user
meets are therefore a wrong path or a record in the wrong format, and the message has to make that obvious.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from flux.errors import UserFileNotFoundError
from flux.evals.base import EvalDataError
from flux.jsonl import iter_json_objects


def existing_file(path: str | Path, what: str) -> Path:
    """Resolve a user-given file path; `what` names the config key so the message says what to change."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserFileNotFoundError(f"{what}: file not found: {p}; give the path of a local file (nothing is "
                                    "downloaded)")
    if not p.is_file():
        raise EvalDataError(f"{what}: {p} is not a regular file (give the path of a .jsonl/.txt file)")
    return p


def read_text(path: Path, what: str) -> str:
    """Read a whole UTF-8 text file, turning OS and encoding errors into one message naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise EvalDataError(f"{what}: {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise EvalDataError(f"{what}: cannot read {path}: {err.strerror}") from err


def read_jsonl(path: str | Path, what: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield `("file:line", record)` for each non-blank line; every record must be a JSON object."""
    p = existing_file(path, what)
    n_records = 0
    # Split on "\n" only: str.splitlines() would also break inside JSON strings holding a raw U+2028 or U+0085.
    for loc, record in iter_json_objects(read_text(p, what).split("\n"), str(p), EvalDataError):
        n_records += 1
        yield loc, record
    if n_records == 0:
        raise EvalDataError(f"{what}: {p} holds no records (expected one JSON object a line)")


def field_str(record: Mapping[str, Any], key: str, loc: str, *, allow_empty: bool = True) -> str:
    """A required string field."""
    if key not in record:
        raise EvalDataError(f"{loc}: record has no {key!r} field (fields present: {sorted(record)})")
    value = record[key]
    if not isinstance(value, str):
        raise EvalDataError(f"{loc}: field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise EvalDataError(f"{loc}: field {key!r} is empty")
    return value


def field_str_list(record: Mapping[str, Any], key: str, loc: str) -> tuple[str, ...]:
    """A required non-empty list of strings (reference answers); an empty list could never score."""
    if key not in record:
        raise EvalDataError(f"{loc}: record has no {key!r} field (fields present: {sorted(record)})")
    value = record[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise EvalDataError(f"{loc}: field {key!r} must be a non-empty list of strings, got {value!r:.80}")
    return tuple(value)


def optional_id(record: Mapping[str, Any], key: str, loc: str, default: str) -> str:
    """An optional id (string or integer in the wild); falls back to a position-derived default."""
    value = record.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise EvalDataError(f"{loc}: field {key!r} must be a string or integer, got {type(value).__name__}")
    return str(value)
