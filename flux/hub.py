"""Hugging Face Hub ids for flux artifacts: `org/name` (optionally `org/name@revision`) wherever a local folder is taken.

A path that exists locally always wins, so local folders keep working with no network. A Hub id is fetched through
huggingface_hub's cache, which also serves it offline once it has been fetched; a Hub id that is neither cached nor
reachable (HF_HUB_OFFLINE=1, no network, no such repo or revision) fails at once with one message that says what to
do on a machine without the Hub.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

# org/name, as the Hub spells repository ids, with an optional @revision (branch, tag or commit)
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def split_hub_id(source: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when `source` is written like a Hub id, else None (then it can only be a local path)."""
    match = HUB_ID.match(source)
    if match is None or source.startswith((".", "~")):
        return None
    return match["repo"], match["revision"]


def fetch_folder(source: str, what: str, files: Sequence[str], error: type[Exception],
                 revision: str | None = None, **download: object) -> Path:
    """The local folder holding `files` of Hub repo `source` (`org/name` or `org/name@revision`), fetched into (or
    read from) the Hub cache. `download` goes to `snapshot_download` (cache_dir, token, force_download,
    local_files_only); `what` names the artifact in messages, which raise `error`."""
    parsed = split_hub_id(source)
    if parsed is None:
        raise error(f"{what} {source!r} does not exist locally and is not a Hub id of the form org/name[@revision]")
    repo_id, inline_revision = parsed
    if inline_revision and revision and inline_revision != revision:
        raise error(f"{what} {source!r} names revision {inline_revision!r} but revision={revision!r} was also given; "
                    "give one of them")
    revision = inline_revision or revision
    where = f"{repo_id}" + (f" at revision {revision!r}" if revision else "")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(files), **download))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        reason = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise error(f"{what} {source!r} is not a local folder, and Hub repo {where} is not in the local Hub cache "
                    f"while {reason} ({type(err).__name__}); on a machine without the Hub, download it elsewhere "
                    f"(`hf download {repo_id}`) and pass the local folder instead") from None
    except (HfHubHTTPError, HFValidationError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise error(f"{what} {source!r} is not a local folder and could not be fetched from Hub repo {where} "
                    f"({type(err).__name__}: {first_line}); check the repo id, revision and access token") from None
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise error(f"Hub repo {where} has no {', '.join(missing)}; it does not hold a flux {what}")
    return folder
