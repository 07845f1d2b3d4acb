"""Config schema (dataclasses registered with Hydra), composition and validation."""
from dime_ds.config.load import config_dir, load_config, save_config, shipped_dir
from dime_ds.config.validate import ConfigError, require

__all__ = ["ConfigError", "config_dir", "load_config", "require", "save_config", "shipped_dir"]
