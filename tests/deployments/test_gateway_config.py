"""The edge's configuration: new sections and their bounds, and the refusal to serve open to the network."""

import pytest
from pydantic import ValidationError

from deployments.cli import main
from deployments.config import AppConfig


def test_defaults_of_the_new_fields():
    config = AppConfig()
    i = config.interaction
    assert (i.idle_timeout_s, i.max_session_s, i.snapshot_s, i.actors) == (600.0, 3600.0, 5.0, None)
    assert config.ingress.actors == 1
    assert config.gateway.autoscaling_config() == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64.0}
    limits = config.limits
    assert (limits.max_body_bytes, limits.max_secret_body_bytes, limits.body_timeout_s) == (64 * 1024, 16 * 1024, 10.0)
    assert config.auth.client_secret_ttl_s <= limits.max_secret_ttl_s and config.auth.allow_open is False


def test_timeouts_may_be_switched_off_and_bad_values_are_refused():
    off = AppConfig.model_validate({"interaction": {"idle_timeout_s": None, "max_session_s": None, "actors": 3}})
    assert off.interaction.idle_timeout_s is None and off.interaction.max_session_s is None and off.interaction.actors == 3
    for bad in (
        {"interaction": {"snapshot_s": 0}},
        {"interaction": {"snapshot_s": None}},
        {"interaction": {"actors": 0}},
        {"interaction": {"idle_timeout_s": -1}},
        {"gateway": {"min_replicas": 5, "max_replicas": 2}},
        {"gateway": {"target_ongoing_requests": 0}},
        {"limits": {"body_timeout_s": 0}},
        {"limits": {"max_body_bytes": 10}},
        {"limits": {"bogus": 1}},
        {"auth": {"client_secret_ttl_s": 600}, "limits": {"max_secret_ttl_s": 300}},
    ):
        with pytest.raises(ValidationError):
            AppConfig.model_validate(bad)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2", "[::1]"])
def test_open_on_loopback_is_fine(host, monkeypatch):
    monkeypatch.delenv("INTERPLAY_API_KEYS", raising=False)
    assert AppConfig.model_validate({"http": {"host": host}}).exposure_error() is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "example.com"])
def test_open_beyond_loopback_is_refused_unless_meant(host, monkeypatch):
    monkeypatch.delenv("INTERPLAY_API_KEYS", raising=False)
    error = AppConfig.model_validate({"http": {"host": host}}).exposure_error()
    assert error and "\n" not in error and "auth.allow_open" in error and host in error
    assert AppConfig.model_validate({"http": {"host": host}, "auth": {"allow_open": True}}).exposure_error() is None
    assert AppConfig.model_validate({"http": {"host": host}, "auth": {"api_keys": ["sk-1"]}}).exposure_error() is None
    monkeypatch.setenv("INTERPLAY_API_KEYS", "sk-env")
    assert AppConfig.model_validate({"http": {"host": host}}).exposure_error() is None


def test_interplay_serve_refuses_to_serve_open_to_the_network(monkeypatch, capsys):
    """Refused in one line, before Ray is started."""
    import deployments.cli as cli

    monkeypatch.delenv("INTERPLAY_API_KEYS", raising=False)
    monkeypatch.setattr(cli, "_init_ray", lambda address: pytest.fail("Ray was started"))
    assert main(["serve", "--host", "0.0.0.0", "--once"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("interplay: refusing to serve without API keys on 0.0.0.0")
