"""dime_ds installs like a package: a wheel built from the checkout carries every subpackage, the
Hydra configs and the DeepSpeed JSONs, and, installed non-editable away from the checkout, composes
configs, finds DeepSpeed configs and runs its entry points from any directory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
# What a build reads: the package, its two data folders, and the packaging files.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "dime_ds", "configs", "ds_configs")

PROBE = """
import json, sys
import dime_ds
from dime_ds.config import config_dir, load_config
from dime_ds.engine.ds_config import ds_config_path
cfg = load_config(["experiment=demo"])
print(json.dumps({"package": dime_ds.__file__, "configs": str(config_dir()), "zero1": str(ds_config_path("zero1")),
                  "run_name": cfg.name, "suite": cfg.eval.suite}))
"""


def _pip(*args: str, cwd: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                         cwd=cwd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, target dir): built from a copy of the checkout (a build writes build/ and *.egg-info
    beside its sources), installed with `pip install --target`, nothing editable."""
    import setuptools  # noqa: F401 - the dev extra installs it: --no-build-isolation builds with it
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src), cwd=tmp)
    (wheel,) = (tmp / "dist").glob("dime_ds-*.whl")
    _pip("install", "--no-deps", "--target", str(tmp / "site"), str(wheel), cwd=tmp)
    return wheel, tmp / "site"


def _run(cmd: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DIME_DS_CONFIG_DIR")}
    env["PYTHONPATH"] = str(site)  # the installed copy only: the checkout is not on the path
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_holds_every_subpackage_and_the_data_folders(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for init in (REPO / "dime_ds").rglob("__init__.py"):
        assert init.relative_to(REPO).as_posix() in names
    for folder, pattern in (("configs", "**/*.yaml"), ("ds_configs", "*.json")):
        shipped = {p.relative_to(REPO / folder).as_posix() for p in (REPO / folder).glob(pattern)}
        assert shipped and {f"dime_ds/{folder}/{s}" for s in shipped} <= names
    (entry_points_file,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    entry_points = zipfile.ZipFile(wheel).read(entry_points_file)
    assert b"dime-ds = dime_ds.cli:console" in entry_points


def test_installed_wheel_composes_configs_and_runs_from_anywhere(installed, tmp_path):
    _, site = installed
    probe = _run([sys.executable, "-c", PROBE], site, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(site), found
    assert Path(found["configs"]) == site / "dime_ds" / "configs"
    assert Path(found["zero1"]) == site / "dime_ds" / "ds_configs" / "zero1.json"
    assert found["run_name"] == "demo" and found["suite"] == "synthetic"  # experiment=demo composed

    help_ = _run([sys.executable, "-m", "dime_ds.distill", "--help"], site, cwd=tmp_path)
    assert help_.returncode == 0 and "python -m dime_ds.distill" in help_.stdout, help_.stderr[-3000:]
    script = _run([str(site / "bin" / "dime-ds"), "eval", "--help"], site, cwd=tmp_path)
    assert script.returncode == 0 and "python -m dime_ds.eval" in script.stdout, script.stderr[-3000:]
    listing = _run([str(site / "bin" / "dime-ds")], site, cwd=tmp_path)
    assert listing.returncode == 0 and all(c in listing.stdout for c in ("distill", "match", "eval", "export")), \
        listing.stderr[-3000:]
