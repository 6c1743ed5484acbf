"""Shared fixtures: one real local Ray cluster per test run (starting one costs ~9 s here)."""

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every test that asks for it; shut down at the end of the run."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def pytest_configure(config):
    """WebRTC media in tests stays on loopback: aioice would otherwise offer the machine's interfaces."""
    from actors.ingress import use_ice_addresses

    use_ice_addresses(["127.0.0.1"])


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is present."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
