"""Evaluation data of the user's own, from the command line, where Hydra's grammar alone falls short:

- `+eval.datasets.NAME.KEY=VALUE` adds a dataset the suite does not have (Hydra would first create
  NAME as a plain dict, which the typed `Dict[str, EvalDatasetConfig]` refuses); its fields are
  merged into one typed entry after composition (task zeroshot unless `.task=` says otherwise).
- `suite=FILE` / `eval=FILE` / `eval.suite=FILE` (a path: it holds a `/` or ends in .yaml) takes the
  suite from a YAML file outside the package (a config group only takes the names it ships); the
  file is checked against the schema, then composed exactly like a shipped suite, so later
  `eval.*` overrides still apply to it."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException, ValidationError

from dime_ds.config.schema import EvalConfig, EvalDatasetConfig
from dime_ds.config.validate import ConfigError

ADDED_DATASET = re.compile(r"^\+{1,2}eval\.datasets\.([^.=]+)\.([^=]+)=")
SUITE_KEYS = ("suite=", "eval=", "eval.suite=")
FILE_SUITE = "_suite_file"  # the name a suite file is stored under in Hydra's `eval` group
DATASET_KEYS = tuple(f.name for f in dataclasses.fields(EvalDatasetConfig))


def _is_file(value: str) -> bool:
    return "/" in value or value.endswith((".yaml", ".yml"))


def split_user_eval(overrides: Sequence[str], shipped_suites: Sequence[str]) -> tuple[list[str], dict]:
    """(overrides for Hydra, {dataset name: {key: value}} to add after composition). A suite file is
    registered with Hydra here and selected by name in the returned overrides."""
    hydra_overrides, added = [], {}
    parser = OverridesParser.create()
    for override in overrides:
        match = ADDED_DATASET.match(override)
        suite = next((k for k in SUITE_KEYS if override.startswith(k)), None)
        if match:
            name, key = match.groups()
            if key not in DATASET_KEYS:
                raise ConfigError(f"invalid configuration: {override.split('=')[0]}: {key!r} is not a key of an "
                                  f"evaluation dataset (known: {', '.join(DATASET_KEYS)})")
            added.setdefault(name, {})[key] = _value(parser, override)
        elif suite and _is_file(value := str(_value(parser, override))):
            _register_suite_file(Path(value).expanduser().resolve(), suite, shipped_suites)
            hydra_overrides.append(f"eval={FILE_SUITE}")
        elif suite == "suite=":  # `suite=NAME` is short for the `eval=` config group
            hydra_overrides.append("eval=" + override[len(suite):])
        else:
            hydra_overrides.append(override)
    return hydra_overrides, added


def _value(parser: OverridesParser, override: str) -> Any:
    try:
        return parser.parse_override(override).value()
    except HydraException as err:
        raise ConfigError(f"invalid configuration: {override}: {err}") from None


def _register_suite_file(path: Path, option: str, shipped_suites: Sequence[str]) -> None:
    if not path.is_file():
        raise ConfigError(f"invalid configuration: {option}{path}: no such suite file "
                          f"(shipped suites, by name: {', '.join(shipped_suites)})")
    try:
        node = OmegaConf.load(path)
        if not isinstance(node, DictConfig):
            raise ConfigError(f"invalid configuration: suite file {path} is not a mapping of eval keys")
        # Checked against the schema here, so an error names the file (and the key, e.g.
        # `datasets.foo.pth`) rather than an anonymous config.
        typed = OmegaConf.merge(OmegaConf.structured(EvalConfig), node)
    except (OmegaConfBaseException, OSError, ValueError) as err:
        key = getattr(err, "full_key", None)
        where = f", key {key}" if key else ""
        raise ConfigError(f"invalid configuration: suite file {path}{where}: {str(err).splitlines()[0]}") from None
    for name in typed.datasets:
        if OmegaConf.is_missing(typed.datasets[name], "path"):
            raise ConfigError(f"invalid configuration: suite file {path}: dataset {name} has no path")
    if "suite" not in node:  # reports are named after the suite: the file's name, not the default's
        node.suite = path.stem
    ConfigStore.instance().store(group="eval", name=FILE_SUITE, node=node)


def forget_suite_file() -> None:
    """Drop the registered suite file once composed: the store is process-wide, and the next
    composition (or Hydra's list of suites in an error) must not see it."""
    ConfigStore.instance().repo.get("eval", {}).pop(f"{FILE_SUITE}.yaml", None)


def add_user_datasets(cfg: DictConfig, added: dict) -> None:
    """Merge `+eval.datasets.NAME.*` fields into cfg.eval.datasets (before interpolations resolve)."""
    for name, fields in added.items():
        datasets = cfg.eval.datasets
        if name not in datasets and "path" not in fields:
            raise ConfigError(f"invalid configuration: evaluation dataset {name} is not in suite "
                              f"{cfg.eval.suite}: add its data with +eval.datasets.{name}.path=DIR")
        base = datasets[name] if name in datasets else OmegaConf.structured(EvalDatasetConfig)
        try:
            merged = OmegaConf.merge(base, fields)
        except ValidationError as err:  # its key is relative to the dataset: name the whole path
            key, value = err.key, fields.get(err.key) if err.key else None
            raise ConfigError(f"invalid configuration: eval.datasets.{name}.{key}={value!r}: {err.msg}") from None
        with open_dict(datasets):
            datasets[name] = merged


def check_user_datasets(cfg: DictConfig, added: dict) -> None:
    """A dataset given on the command line must be there (a suite's may be missing, and is reported)."""
    for name, fields in added.items():
        if "path" in fields and not Path(cfg.eval.datasets[name].path).expanduser().exists():
            raise ConfigError(f"invalid configuration: eval.datasets.{name}.path={cfg.eval.datasets[name].path}: "
                              "no such file or directory")
