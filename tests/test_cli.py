"""The CLI contract: a user error in any entry point is ONE line `error: <what> — <fix>` on stderr and exit status 2,
with no traceback; `--debug` or HYDRA_FULL_ERROR=1 shows the full traceback; bugs keep their traceback.

The wrapper and the Hydra composition errors are tested in-process; a few real subprocesses (one per entry point)
check the whole path, including Hydra's own reporting, which must not add lines.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flux.errors import (
    ArgumentParser,
    ConfigError,
    FluxUserError,
    FluxWarning,
    describe_user_error,
    render,
    run_cli,
    warn,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch):
    """The environment of a user's shell: no debug choice inherited."""
    for key in ("FLUX_DEBUG", "HYDRA_FULL_ERROR"):
        monkeypatch.delenv(key, raising=False)


def _exit_line(capsys, main, argv=None) -> str:
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return err.rstrip("\n")


def test_user_errors_print_one_line_and_exit_2(clean_env, capsys):
    def bad():
        raise ConfigError("checkpoint_every=0 must be a positive number of training steps; or null for none")

    assert _exit_line(capsys, bad) == ("error: checkpoint_every=0 must be a positive number of training steps — or "
                                       "null for none")
    assert "FLUX_DEBUG" not in os.environ and "HYDRA_FULL_ERROR" not in os.environ  # the wrapper cleans up


def test_bugs_keep_their_traceback_and_debug_shows_user_errors_in_full(clean_env, monkeypatch, capsys):
    def bug():
        raise RuntimeError("an index went wrong")

    with pytest.raises(RuntimeError, match="an index went wrong"):
        run_cli(bug)

    seen = []

    def bad(argv):
        seen.append(argv)
        raise ConfigError("x is bad; fix x")

    with pytest.raises(ConfigError):
        run_cli(bad, ["--debug", "a=1"])
    assert seen == [["a=1"]]  # --debug never reaches the entry point's own parser
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError):
        run_cli(bad, [])
    assert capsys.readouterr().err == ""


def test_argument_errors_and_warnings_are_one_line(clean_env, capsys):
    def parse(argv):
        parser = ArgumentParser(prog="python -m flux.passkey")
        parser.add_argument("--sink", type=int)
        parser.parse_args(argv)

    assert _exit_line(capsys, parse, ["--sink", "x"]) == (
        "error: python -m flux.passkey: argument --sink: invalid int value: 'x' — see python -m flux.passkey --help")

    shown = []

    def warns(argv):  # pytest records warnings itself, so ask the formatter run_cli installs what it would print
        with pytest.warns(FluxWarning) as caught:
            warn("trainer.max_steps=5 < objective.ramp_steps=10:\nthe target stops early; raise trainer.max_steps")
        w = caught[0]
        shown.append(warnings.formatwarning(w.message, w.category, w.filename, w.lineno))
        shown.append(warnings.formatwarning(UserWarning("other"), UserWarning, "x.py", 3))

    run_cli(warns, [])
    assert shown[0] == ("warning: trainer.max_steps=5 < objective.ramp_steps=10: the target stops early; raise "
                        "trainer.max_steps\n")
    assert shown[1].startswith("x.py:3: UserWarning: other")  # other libraries' warnings keep their form


def test_every_flux_error_class_is_a_user_error():
    """Every exception class flux defines (found by importing each module) derives from FluxUserError, so every
    entry point reports it in one line; warnings are the one kind of exception that is not an error."""
    import importlib
    import inspect
    import pkgutil

    import flux
    from flux.data.synthetic import UnknownTaskError

    found = []
    for info in pkgutil.walk_packages(flux.__path__, "flux."):
        if info.name.startswith("flux.conf") or info.name == "flux.lm_eval_backend":
            continue
        module = importlib.import_module(info.name)
        found += [obj for obj in vars(module).values() if inspect.isclass(obj) and issubclass(obj, BaseException)
                  and obj.__module__ == module.__name__ and not issubclass(obj, Warning)]
    assert len(found) >= 20  # the engine's, the patterns', the router's, the evaluations', ...
    assert [c.__qualname__ for c in found if not issubclass(c, FluxUserError)] == []
    # KeyError subclasses keep their message unquoted on the CLI
    assert render(UnknownTaskError("unknown synthetic task 'x'; known tasks: [a]")) == (
        "error: unknown synthetic task 'x' — known tasks: [a]")


def test_a_missing_mandatory_value_names_the_key():
    cfg = OmegaConf.create({"eval": {"task": {"path": "???"}}})
    with pytest.raises(Exception) as exc:
        OmegaConf.to_container(cfg, throw_on_missing=True)
    assert describe_user_error(exc.value) == ("error: eval.task.path has no value (it is ??? in the config) — set it "
                                              "on the command line, e.g. eval.task.path=...")


@pytest.mark.parametrize(("argv", "line"), [
    (["backbone=nope"], ("error: In 'evaluate': Could not find 'backbone/nope' — choose one of: llama3_1_8b, "
                        "llama3_1_8b_random, qwen2_5_7b, qwen2_5_7b_random, qwen3_4b, qwen3_8b, qwen3_8b_random, "
                        "smollm2_135m, tiny_random (e.g. backbone=llama3_1_8b)")),
    (["routing.mdoe=router"], ("error: Could not override 'routing.mdoe'. To append to your config use "
                              "+routing.mdoe=router (Key 'mdoe' is not in struct)")),
    (["eval.batch_size=[1"], "error: cannot parse the override 'eval.batch_size=[1': "),
])
def test_hydra_composition_errors_are_one_line(argv, line):
    """The exceptions Hydra raises while composing the entry points' configs, as the CLI prints them."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"), pytest.raises(Exception) as exc:
        compose("evaluate", argv)
    got = describe_user_error(exc.value)
    assert got is not None and got.startswith(line) and "\n" not in got, got


# -- real processes ------------------------------------------------------------------------------------------------

def _cli(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("FLUX_DEBUG", "HYDRA_FULL_ERROR")}
    environment.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.parametrize(("module", "args", "line"), [
    ("flux.train", ["trainer.max_steps=0"],
     ("error: trainer.max_steps=0 must be a positive number of training steps — a run of 0 steps trains nothing "
     "(use -1 to train for trainer.max_epochs)")),
    ("flux.evaluate", ["backbone.source=foo"],
     ("error: unknown backbone 'foo': not a preset (smollm2_135m, tiny_random), not an existing directory or .gguf "
     "file, and not a hub id of the form org/name — pass one of those as backbone.source")),
    ("flux.bench", ["--no-hydra", "lengths=[0]"], "error: lengths=[0] must be a non-empty list of positive integers"),
    ("flux.passkey", ["--filler-tokens", "-5"], ("error: --filler-tokens=-5 must be a positive number of tokens — e.g. "
                                                "3000")),
    ("flux.demo", ["--steps", "0"], "error: --steps=0 must be a positive integer — see --help"),
])
def test_each_entry_point_prints_one_line_and_exits_2(tmp_path, module, args, line):
    proc = _cli(module, *args, *(["hydra.run.dir=run"] if module == "flux.train" else []), cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (2, line + "\n"), proc.stderr[-3000:]


def test_hydra_full_error_shows_the_traceback(tmp_path):
    proc = _cli("flux.train", "backbone=nope", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "MissingConfigException" in proc.stderr
