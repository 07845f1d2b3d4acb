"""Package layout only (metadata, dependencies and scripts: pyproject.toml). The repository keeps the
Hydra configs and DeepSpeed JSONs at its top (configs/, ds_configs/); a wheel carries them inside the
package as dime_ds/configs and dime_ds/ds_configs (found by dime_ds.config.load.shipped_dir).
pyproject's package discovery cannot add a folder from outside dime_ds/, hence this file."""
from setuptools import find_packages, setup

DATA_DIRS = {"dime_ds.configs": "configs", "dime_ds.ds_configs": "ds_configs"}

setup(
    packages=find_packages(include=["dime_ds", "dime_ds.*"]) + list(DATA_DIRS),
    package_dir=DATA_DIRS,
    package_data={"dime_ds.configs": ["**/*.yaml"], "dime_ds.ds_configs": ["*.json"]},
)
