"""Shared fixtures: the digits splits, a quickly trained natural model, one Ray instance."""

from __future__ import annotations

import pytest
import torch

from raydefense.config import TrainConfig
from raydefense.data import load_splits


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run on 2 cores beside Ray workers: one torch thread keeps timings predictable."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    return load_splits("digits")


@pytest.fixture(scope="session")
def natural_ckpt(tmp_path_factory, digits):
    """A natural model trained for a few epochs (about 97 % clean accuracy, no robustness)."""
    from raydefense.train import fit

    out = tmp_path_factory.mktemp("natural")
    fit(TrainConfig(method="natural", epochs=6, val_attack_steps=2), out, splits=digits)
    return out


@pytest.fixture(scope="session")
def natural_model(natural_ckpt):
    from raydefense import load_model

    return load_model(natural_ckpt)


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the whole session: 2 CPUs and 4 logical GPUs for scheduling tests."""
    ray = pytest.importorskip("ray")
    # address="local": always a fresh instance, never another process's cluster found on this machine
    ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()
