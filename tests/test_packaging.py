"""An installed flux runs outside a checkout: the wheel carries the config tree (flux.conf) and the Triton kernels
(flux_kernels), and its console scripts compose their configs from any directory.

The wheel is built and installed the way a user's `pip install .` does it (non-editable), into a fresh virtual
environment, with no downloads: the build uses this environment's setuptools (--no-build-isolation), and the new
environment sees this one's dependencies through a .pth file. (`venv --system-site-packages` would not do: created
from a virtual environment it exposes the base interpreter's packages, not this environment's.) Only the dependencies'
directory is shared; flux itself comes from the wheel, which the test checks.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
HYDRA_ENTRY_POINTS = {"flux-train": ("backbone", "source", "smollm2_135m"),
                      "flux-evaluate": ("routing", "mode", "dense"),
                      "flux-bench": ("backbone", "model_type", "qwen2")}


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of the checkout's files (tracked, and untracked but not ignored): setuptools builds in the
    source tree, and a build/ folder left in the repository could carry stale modules into later wheels."""
    source, dist = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    files = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO).stdout
    for name in filter(None, files.split("\0")):
        if (REPO / name).is_file():  # a file deleted in the working tree is still listed as tracked
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(dist), str(source)], cwd=dist)
    (path,) = dist.glob("flux_attention-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed (non-editable); returns its bin folder."""
    venv = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv)
    python = venv / "bin" / "python"
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       cwd=venv).stdout.strip())
    deps = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (purelib / "_test_dependencies.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
         str(wheel)], cwd=venv)
    return venv / "bin"


def shipped(folder: str, suffix: str) -> set[str]:
    """The files of a repository folder that the wheel must carry, by their path inside it."""
    return {str(p.relative_to(REPO / folder)) for p in (REPO / folder).rglob(f"*{suffix}")
            if "__pycache__" not in p.parts}


@pytest.mark.slow
def test_wheel_ships_every_module_and_config_but_no_top_level_kernels(wheel):
    """pyproject lists packages explicitly (conf/ and kernels/ are mapped to other names), so a new package or
    config group that is not listed there would silently be missing from the wheel: compare with the checkout."""
    names = zipfile.ZipFile(wheel).namelist()
    for folder, package, suffix in (("conf", "flux/conf/", ".yaml"), ("conf", "flux/conf/", ".py"),
                                    ("flux", "flux/", ".py"), ("kernels", "flux_kernels/", ".py")):
        in_wheel = {n.removeprefix(package) for n in names if n.startswith(package) and n.endswith(suffix)}
        if folder == "flux":
            in_wheel = {n for n in in_wheel if not n.startswith("conf/")}
        assert in_wheel == shipped(folder, suffix), (folder, suffix)
    assert not any(n.startswith(("kernels/", "conf/", "tests/")) for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-Expression: Apache-2.0" in text
    entry_points = zipfile.ZipFile(wheel).read(metadata.replace("METADATA", "entry_points.txt")).decode()
    for script in ("flux-train", "flux-evaluate", "flux-bench", "flux-passkey", "flux-demo", "flux-lm-eval"):
        assert f"{script} = flux." in entry_points


@pytest.mark.slow
def test_installed_entry_points_compose_their_configs_outside_the_repo(installed, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    probe = "import flux, flux.conf, flux_kernels; print(flux.__file__, flux.conf.__file__, flux_kernels.__file__)"
    where = run([str(installed / "python"), "-c", probe], tmp_path, env)
    for line in where.stdout.split():
        assert Path(line).is_relative_to(installed.parent), f"{line} is not the installed copy"
    for script, (section, key, value) in HYDRA_ENTRY_POINTS.items():
        job = yaml.safe_load(run([str(installed / script), "--cfg", "job"], tmp_path, env).stdout)
        assert job[section][key] == value, script
    job = yaml.safe_load(run([str(installed / "python"), "-m", "flux.evaluate", "eval=longbench", "--cfg", "job"],
                             tmp_path, env).stdout)
    assert job["eval"]["task"]["_target_"].startswith("flux.evals")
    for script in ("flux-passkey", "flux-demo", "flux-lm-eval"):
        assert "usage:" in run([str(installed / script), "--help"], tmp_path, env).stdout.lower()
    assert not list(tmp_path.iterdir())  # --cfg job and --help write no outputs/ folder
