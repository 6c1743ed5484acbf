import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.cli import main
from deployments.config import AppConfig

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_run_tiny_on_loopback():
    config = AppConfig()
    assert config.model.preset == "tiny" and config.http.host == "127.0.0.1"


def test_yaml_overrides_and_typos_are_refused(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("interaction: {max_sessions: 4}\nlog: {root: s3://bucket/log}\n")
    config = AppConfig.load(good)
    assert config.interaction.max_sessions == 4 and config.log.root == "s3://bucket/log"
    assert config.model.preset == "tiny"
    bad = tmp_path / "bad.yaml"
    bad.write_text("interaction: {max_sesions: 4}\n")
    with pytest.raises(ValidationError, match="max_sesions"):
        AppConfig.load(bad)


def test_cli_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "serve" in out and "status" in out


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "interplay"
    if not exe.exists():
        pytest.skip("package not installed in this environment")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "serve" in result.stdout


def test_cluster_launcher_file_is_valid_for_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(config)
    types = config["available_node_types"]
    assert types["interaction_gpu"]["resources"] == {"interaction": 1}
    assert types["background_gpu"]["resources"] == {"background": 1}


def test_margins_suit_where_the_server_listens():
    assert AppConfig().margins_ms() == (10.0, 20.0)  # loopback: no network jitter to absorb
    public = AppConfig.model_validate({"http": {"host": "0.0.0.0"}})
    assert public.margins_ms() == (40.0, 60.0)
    explicit = AppConfig.model_validate({"http": {"host": "0.0.0.0"}, "ingress": {"jitter_ms": 25, "prebuffer_ms": 30}})
    assert explicit.margins_ms() == (25.0, 30.0)
