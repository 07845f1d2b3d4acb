"""The local SLURM cluster (tests/slurm/cluster.py), started once per session and stopped at its end."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.slurm.cluster import ClusterUnavailable, LocalCluster

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running cluster; SLURM_CONF (and a shared TORCH_EXTENSIONS_DIR) exported to this process, so
    sbatch, sacct and submitit here, and the jobs (sbatch exports the environment), all see it."""
    # A short path: munge's socket lives under it (unix socket paths are limited to 108 bytes).
    state = tempfile.mkdtemp(prefix="dime_slurm_")
    cluster = LocalCluster(state)
    try:
        cluster.start()
    except ClusterUnavailable as err:
        shutil.rmtree(state, ignore_errors=True)
        pytest.skip(f"no local SLURM cluster: {err}")
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "TORCH_EXTENSIONS_DIR", "PYTHONUNBUFFERED")}
    os.environ.update(cluster.env)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    os.environ["PYTHONUNBUFFERED"] = "1"
    try:
        yield cluster
    finally:
        cluster.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(state, ignore_errors=True)
