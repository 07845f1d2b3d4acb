"""Compose, validate and save the run config: defaults <- configs/*.yaml <- command-line overrides,
merged into the typed schema (Hydra compose API, so every entry point stays a plain function)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dime_ds import atomic
from hydra.core.config_store import ConfigStore

from dime_ds.config.demo_schema import DemoRootConfig
from dime_ds.config.schema import SCHEMA_GROUP, RootConfig
from dime_ds.config.user_eval import add_user_datasets, check_user_datasets, forget_suite_file, split_user_eval
from dime_ds.config.validate import ConfigError, validate


PACKAGE = Path(__file__).resolve().parents[1]


def register() -> None:
    """The typed schemas, as options of the `schema` group that every config's defaults list starts with."""
    store = ConfigStore.instance()
    store.store(group=SCHEMA_GROUP, name="library", node=RootConfig, package="_global_")
    store.store(group=SCHEMA_GROUP, name="demo", node=DemoRootConfig, package="_global_")


def shipped_dir(name: str) -> Path:
    """A data folder that ships with dime_ds (`configs`, `ds_configs`): inside the package in an
    installed wheel (setup.py maps them there), else at the top of the checkout this package was
    imported from (a source tree or an editable install). Never another copy elsewhere."""
    for path in (PACKAGE / name, PACKAGE.parent / name):
        if path.is_dir():
            return path
    raise ConfigError(f"dime_ds ships no {name}/ beside {PACKAGE}: a broken install? Reinstall dime_ds")


def config_dir() -> Path:
    """The Hydra configs (see shipped_dir); DIME_DS_CONFIG_DIR points at another copy."""
    env = os.environ.get("DIME_DS_CONFIG_DIR")
    path = Path(env) if env else shipped_dir("configs")
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in {path}" + (" (DIME_DS_CONFIG_DIR)" if env else ""))
    return path


def load_config(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The resolved, validated config. Errors name the offending key and never start heavy work.
    Besides Hydra's grammar: `suite=` for the `eval=` group, a suite file as `suite=/path.yaml`, and
    datasets of the user's own as `+eval.datasets.NAME.path=DIR` (config/user_eval.py)."""
    register()
    GlobalHydra.instance().clear()
    configs = config_dir()
    try:
        overrides, added_datasets = split_user_eval(overrides,
                                                    sorted(p.stem for p in (configs / "eval").glob("*.yaml")))
        with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
        # Paths are made absolute before interpolations resolve, so ranks and jobs agree.
        cfg.work_dir = str(Path(cfg.work_dir).expanduser().resolve())
        add_user_datasets(cfg, added_datasets)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"invalid configuration: {_explain(err)}") from None
    finally:
        GlobalHydra.instance().clear()
        forget_suite_file()
    validate(cfg)
    check_user_datasets(cfg, added_datasets)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _explain(err: BaseException) -> str:
    """Hydra wraps the OmegaConf error that names the key; show the whole chain, once each."""
    parts = []
    while err is not None:
        text = str(err).strip()
        if text and text not in parts:
            parts.append(text)
        err = err.__cause__
    return "\n".join(parts)


def save_config(cfg: DictConfig, directory: str | os.PathLike) -> Path:
    """Write the resolved config as YAML; every run directory carries the config that made it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    atomic.write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path
