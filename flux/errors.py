"""User errors and the one-line CLI contract.

Every mistake a user can make (a bad setting, a missing file, an impossible input) raises a subclass of
`FluxUserError` whose message names the bad value and, after "; ", the fix. The entry points (`flux.train`,
`flux.evaluate`, `flux.bench`, `flux.passkey`, `flux.demo`) run their main through `run_cli`, which prints such an
error, and Hydra's composition errors (unknown config option, missing key, bad override syntax), as ONE line

    error: <what> — <fix>

on stderr and exits with status 2. A traceback means a bug in flux, never a user mistake; the full traceback of a
user error is still there with `--debug` or `HYDRA_FULL_ERROR=1`.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

USER_ERROR_STATUS = 2
# Set by run_cli so processes started by the run (DDP ranks, multirun jobs) make the same debug choice as the parent,
# although run_cli itself sets HYDRA_FULL_ERROR=1 (so Hydra lets exceptions through to it instead of printing them).
DEBUG_ENV = "FLUX_DEBUG"


class FluxUserError(ValueError):
    """Base of every error a user can cause and fix; its message is `<what>; <fix>` on one line."""


class ConfigError(FluxUserError):
    """A setting of an entry point's config is invalid or does not fit the others."""


class UserFileNotFoundError(FluxUserError, FileNotFoundError):
    """A file the user pointed at does not exist (still a FileNotFoundError for callers that catch that)."""


class FluxWarning(UserWarning):
    """Something legal but probably not what the user meant (printed by the CLI as one `warning:` line)."""


def warn(message: str) -> None:
    """Issue a FluxWarning attributed to the caller's caller (the code that made the questionable choice)."""
    warnings.warn(message, FluxWarning, stacklevel=3)


# -- rendering ------------------------------------------------------------------------------------------------------

# Lines of Hydra/OmegaConf messages that only repeat where an error happened, not what it is.
_NOISE = re.compile(r"^\s*(full_key|object_type|reference_type|value_type|Set the environment variable HYDRA_FULL)")


def one_line(text: str) -> str:
    """Collapse a (possibly multi-line) message into one line: noise lines dropped, whitespace runs joined."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip() and not _NOISE.match(ln)]
    return " ".join(" ".join(lines).split())


def _message(err: BaseException) -> str:
    # KeyError subclasses would quote their message in str(); the first argument is the text itself
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]
    return str(err)


def render(err: BaseException) -> str:
    """`error: <what> — <fix>`: flux messages separate the fix with the first "; "."""
    text = one_line(_message(err))
    if isinstance(err, FluxUserError) and " — " not in text:
        text = text.replace("; ", " — ", 1)
    return f"error: {text}"


def _hydra_message(err: BaseException) -> str:
    """One line for Hydra's composition errors, which spread the cause and the choices over several lines."""
    from hydra.errors import MissingConfigException, OverrideParseException

    raw = str(err)
    if isinstance(err, OverrideParseException):
        url = re.search(r"https?://\S+", raw)
        reason = one_line(re.sub(r"See https?://\S+ for details\.?", "", raw))
        where = f" ({url.group(0)})" if url else ""
        return f"error: cannot parse the override {err.override!r}: {reason} — fix its syntax{where}"
    if isinstance(err, MissingConfigException):
        # "In 'train': Could not find 'backbone/nope'\n\nAvailable options in 'backbone':\n\ta\n\tb\nConfig search..."
        head = one_line(raw.split("Available options", 1)[0])
        options = re.search(r"Available options in '([^']+)':\n((?:[ \t]+\S.*\n?)+)", raw)
        if options:
            names = ", ".join(line.strip() for line in options.group(2).splitlines())
            return f"error: {head} — choose one of: {names} (e.g. {options.group(1)}={names.split(', ')[0]})"
        return f"error: {head}"
    text = one_line(raw)
    cause = err.__cause__
    if cause is not None:
        detail = one_line(str(cause))
        if detail and detail not in text:
            text = f"{text} ({detail})"
    return f"error: {text}"


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the user asked for something impossible", beyond FluxUserError: Hydra's composition
    and override errors, a mandatory config value left at ???, and Lightning's Trainer misconfiguration (its
    settings come straight from the user's trainer config)."""
    from hydra.errors import ConfigCompositionException, OverrideParseException
    from omegaconf.errors import MissingMandatoryValue

    types: list[type[BaseException]] = [FluxUserError, ConfigCompositionException, OverrideParseException,
                                        MissingMandatoryValue]
    lightning_errors = sys.modules.get("lightning.fabric.utilities.exceptions")
    if lightning_errors is not None:  # only loaded when a run used Lightning; never imported here for inference
        types.append(lightning_errors.MisconfigurationException)
    return tuple(types)


def describe_user_error(err: BaseException) -> str | None:
    """The one line for a user error, or None when `err` is not one (then it is a bug and keeps its traceback)."""
    from hydra.errors import ConfigCompositionException, OverrideParseException
    from omegaconf.errors import MissingMandatoryValue

    if not isinstance(err, user_error_types()):
        return None
    if isinstance(err, (ConfigCompositionException, OverrideParseException)):
        return _hydra_message(err)
    if isinstance(err, MissingMandatoryValue):
        key = getattr(err, "full_key", None) or "a config value"
        return f"error: {key} has no value (it is ??? in the config) — set it on the command line, e.g. {key}=..."
    return render(err)


# -- the entry-point wrapper ----------------------------------------------------------------------------------------

def _debug_requested(argv: list[str]) -> bool:
    if DEBUG_ENV in os.environ:  # a process started by a run_cli process: same choice as its parent
        return os.environ[DEBUG_ENV] == "1"
    return "--debug" in argv or os.environ.get("HYDRA_FULL_ERROR") == "1"


_default_format_warning = warnings.formatwarning


def _format_warning(message: Any, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
    if issubclass(category, FluxWarning):
        return f"warning: {one_line(str(message))}\n"
    return _default_format_warning(message, category, filename, lineno, line)


def _debug_now() -> bool:
    """The choice run_cli made for this process (or inherited from the process that started it)."""
    return os.environ.get(DEBUG_ENV) == "1"


def report_user_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """For a Hydra task function (put it under @hydra.main): a user error raised inside the job becomes the one
    line and exit status 2 right there, before Hydra adds its own "Error executing job" line."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except Exception as err:
            line = None if _debug_now() else describe_user_error(err)
            if line is None:
                raise
            exit_with(line)

    return wrapper


def run_cli(main: Callable[..., Any], argv: list[str] | None = None) -> None:
    """Run an entry point's main under the CLI contract (see the module docstring).

    `main` reads sys.argv (argv None) or is called with `argv`; either way `--debug` is taken out first. Hydra's own
    error report (a filtered traceback, exit status 1) is switched off with HYDRA_FULL_ERROR=1 for the duration, so
    every exception reaches this function; processes the run starts inherit that and the debug choice.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    debug = _debug_requested(args)
    args = [a for a in args if a != "--debug"]
    saved_env = {k: os.environ.get(k) for k in (DEBUG_ENV, "HYDRA_FULL_ERROR")}
    saved_format = warnings.formatwarning
    os.environ[DEBUG_ENV] = "1" if debug else "0"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    warnings.formatwarning = _format_warning
    try:
        if argv is None:
            sys.argv = [sys.argv[0], *args]
            report_user_errors(main)()
        else:
            report_user_errors(main)(args)
    finally:
        warnings.formatwarning = saved_format
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def exit_with(line: str) -> NoReturn:
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(USER_ERROR_STATUS)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the flux entry points: a bad argument is one ConfigError (one line under run_cli) instead of
    argparse's usage text plus message."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message}; see {self.prog} --help")
