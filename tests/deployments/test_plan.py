"""The deployment plan: one list of actor specs that `build` and `serve_app` both carry out."""

import pytest

from deployments.config import AppConfig
from deployments.plan import HOW, RESTART, T0, plan
from deployments.spec import ActorSpec, Ref, StartupError, resolve


def test_the_plan_lists_the_live_path_in_bring_up_order():
    config = AppConfig.model_validate({"background": {"enabled": False}, "ingress": {"actors": 2}})
    specs = plan(config, {"CPU": 2})
    assert [s.name for s in specs] == ["session_log", "interaction-0", "interaction-1", "router", "ingress-0", "ingress-1"]
    assert all(s.options["max_restarts"] == RESTART["max_restarts"] for s in specs)
    router = next(s for s in specs if s.role == "router")
    assert set(router.args[0]) == {"interaction-0", "interaction-1"}  # the router knows every planned actor
    assert router.kwargs["grow"].template.kwargs["t0"] is T0 and router.kwargs["grow"].how is HOW


def test_every_ingress_gets_the_same_arguments_as_the_gateways_own():
    config = AppConfig()  # bound to loopback: its WebRTC media stays there too
    ingress = next(s for s in plan(config, {"CPU": 2}) if s.role == "ingress")
    assert ingress.kwargs == {**config.ingress_kwargs(), "ice_addresses": ["127.0.0.1"]}
    public = AppConfig.model_validate({"http": {"host": "0.0.0.0"}, "auth": {"api_keys": ["sk-x"]}})
    assert next(s for s in plan(public, {"CPU": 2}) if s.role == "ingress").kwargs["ice_addresses"] is None
    assert public.ingress_kwargs()["jitter_ms"] == 40.0


def test_a_config_that_cannot_be_served_is_refused_before_anything_is_planned():
    with pytest.raises(StartupError):
        plan(AppConfig.model_validate({"http": {"host": "0.0.0.0"}}), {"CPU": 2})  # open to the network without keys


def test_refs_are_filled_in_from_what_is_made_and_a_missing_one_is_named():
    spec = ActorSpec("router", "router", object, ({"a": (Ref("a", str), 2, Ref("a"))},), {"clock": Ref("clock")})
    made = spec.resolve({"a": 7, "clock": {"t0": 1.0}})
    assert made.args == ({"a": ("7", 2, 7)},) and made.kwargs == {"clock": {"t0": 1.0}}
    with pytest.raises(KeyError, match="'clock'"):
        resolve(Ref("clock"), {})


def test_the_routers_fleet_is_resolved_with_the_spec_that_holds_it():
    config = AppConfig.model_validate({"background": {"enabled": False}})
    router = next(s for s in plan(config, {"CPU": 2}) if s.role == "router")
    made = router.resolve({"session_log": "log", "interaction-0": "a0", "interaction-1": "a1", "clock": {"t0": 5.0}, "t0": 5.0, "how": {"lifetime": "detached"}})
    fleet = made.kwargs["grow"]  # an InteractionFleet inside the router's arguments, with Refs of its own
    assert fleet.template.kwargs["t0"] == 5.0 and fleet.how == {"lifetime": "detached"}


def test_the_default_pool_driver_hears_speech_through_pocketsphinx():
    """What production runs by default (`background.speech.engine: pocketsphinx`), as the plan
    hands it to the driver: tests/actors/background/test_transcribe.py tests that transcriber."""
    from actors.background.context import Transcripts
    from actors.background.transcribe import PocketSphinxTranscriber
    from deployments.plan import speech_option

    heard = speech_option(AppConfig())
    assert isinstance(heard, Transcripts) and isinstance(heard.transcriber, PocketSphinxTranscriber)
