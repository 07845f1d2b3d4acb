"""The package layering (pyproject.toml, [tool.importlinter]): every package of dime_ds sits in one
layer, and no import, lazy ones inside functions included, goes up a layer or across siblings."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import dime_ds

REPO = Path(__file__).resolve().parents[2]
PACKAGE = Path(dime_ds.__file__).parent


def _layers() -> list[set[str]]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return [{name.strip() for name in layer.split("|")} for layer in contract["layers"]]


def test_every_package_and_module_of_dime_ds_has_a_layer():
    named = set().union(*_layers())
    found = {f"dime_ds.{p.stem if p.suffix == '.py' else p.name}" for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert found - named == set(), "add these to the layers in pyproject.toml"
    assert named - found == set(), "the layers name what dime_ds no longer has"


def test_imports_follow_the_layers():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "import-linter is a dev dependency: pip install -e '.[dev]'"
    run = subprocess.run([lint, "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "BROKEN" not in run.stdout and "KEPT" in run.stdout


def test_only_distributed_touches_torch_distributed():
    """The one package that reads rank variables and talks to the process group. import-linter sees
    torch as one package, and a lookup in sys.modules imports nothing: read the source itself."""
    pattern = re.compile(r"torch\.distributed|from torch import distributed|sys\.modules")
    found = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                   if "distributed" not in p.relative_to(PACKAGE).parts[:1] and pattern.search(p.read_text()))
    assert found == [], "use dime_ds.distributed instead"
