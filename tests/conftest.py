"""Shared fixtures: one real local Ray cluster per test run (starting one costs ~9 s here)."""

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every test that asks for it; shut down at the end of the run."""
    import ray

    from deployments.proxy import use_in_cluster

    use_in_cluster()  # the Serve proxy's WebSocket frame cap, as `interplay serve` sets it
    if not ray.is_initialized():
        # 5 logical CPUs: the background pool's replica and engine hold 2, the speech deployment's 1,
        # and 2 stay free for the actors tests create (an actor needs 1 free to be placed).
        ray.init(num_cpus=5, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()
    # A Serve handle's router thread may still push metrics after this; with Ray down, that call
    # would start a new local Ray instance while the interpreter exits.
    from ray._private import auto_init_hook

    auto_init_hook.enable_auto_connect = False


def pytest_configure(config):
    """WebRTC media in tests stays on loopback: aioice would otherwise offer the machine's interfaces."""
    from actors.ingress.ice import use_ice_addresses

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


APP_PORT = 8123
API_KEY = "sk-test-interplay"


@pytest.fixture(scope="session")
def app(ray_cluster, tmp_path_factory):
    """The whole application on the local cluster (log, interaction, ingress, Serve), with a key:
    the builder's `App`, whose handles tests use directly."""
    from deployments.app import build, stop
    from deployments.config import AppConfig

    config = AppConfig.model_validate({
        "log": {"root": str(tmp_path_factory.mktemp("log"))},
        "http": {"port": APP_PORT},
        "auth": {"api_keys": [API_KEY]},
        "interaction": {"max_sessions": 8, "grace_ms": 60},
        # The transport tests need speech on request: untrained weights never yield, so a
        # response.create holds them at "speak" for its whole length. The shipped model's own
        # turn-taking is tested in tests/training.
        "model": {"preset": "tiny", "checkpoint": None},
    })
    built = build(config)
    yield built
    stop(built)


@pytest.fixture(scope="session")
def app_url(app):
    return app.url


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory):
    """About 3 s of real speech (espeak-ng) as a 16-bit WAV, or a tone where espeak-ng is missing."""
    import shutil
    import subprocess

    import numpy as np

    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-w", str(path), "Hello, can you hear me? What is the weather like tomorrow?"], check=True)
    else:
        from examples.call import write_wav

        t = np.arange(3 * 16000) / 16000
        write_wav(str(path), (8000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16), 16000)
    return str(path)
