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


def test_cluster_launcher_file_is_valid_for_ray_and_offers_what_the_actors_ask_for():
    from ray.autoscaler._private.util import prepare_config, validate_config

    from deployments.plan import actor_options

    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(config)
    offered = {name: dict(t["resources"]) for name, t in config["available_node_types"].items()}
    totals: dict[str, float] = {}
    for resources in offered.values():
        for key, n in resources.items():
            totals[key] = totals.get(key, 0) + n
    options = actor_options(AppConfig(), totals)

    def asks(role):
        wanted = dict(options[role].get("resources", {}))
        if options[role].get("num_gpus"):
            wanted["GPU"] = options[role]["num_gpus"]
        return wanted

    # Each actor fits exactly the node type meant for it, and nothing else; the pool's driver
    # asks for no node type (it is light), its vLLM replicas ask for `background`.
    from deployments.config import BackgroundSection
    from deployments.pool import deployment_options

    replica = deployment_options(BackgroundSection(), totals)["ray_actor_options"]
    options["pool_replica"] = {"resources": replica.get("resources", {}), "num_gpus": 1}
    hosts = {role: [name for name, res in offered.items() if all(res.get(k, 0) >= n for k, n in asks(role).items())] for role in options}
    assert hosts == {
        "session_log": ["head"], "interaction": ["interaction_gpu"], "ingress": ["head"],
        "background": list(offered), "router": ["head"], "pool_replica": ["background_gpu"],
    }
    # Every custom resource the file offers is one something asks for.
    custom = {k for res in offered.values() for k in res if k not in ("CPU", "GPU", "memory")}
    assert custom == {k for role in options for k in options[role].get("resources", {})}


def test_actors_ask_for_nothing_a_plain_cluster_lacks():
    from deployments.plan import actor_options

    assert actor_options(AppConfig(), {"CPU": 8}) == {
        "session_log": {"num_cpus": 0.1}, "background": {"num_cpus": 0.1}, "interaction": {"num_gpus": 0, "num_cpus": 0},
        "router": {"num_cpus": 0}, "ingress": {"num_cpus": 0.25},
    }
    assert actor_options(AppConfig(), {"CPU": 8, "GPU": 1})["interaction"] == {"num_gpus": 1}
    cpu_only = AppConfig.model_validate({"model": {"device": "cpu"}})
    assert actor_options(cpu_only, {"GPU": 1, "interaction": 2})["interaction"] == {"num_gpus": 0, "num_cpus": 0, "resources": {"interaction": 1}}


def test_the_tick_length_is_the_models_and_a_yaml_that_disagrees_is_refused_in_one_line(tmp_path):
    from deployments.plan import StartupError, model_tick_ms

    assert model_tick_ms(AppConfig()) == 200  # the tiny preset's
    assert model_tick_ms(AppConfig.model_validate({"interaction": {"tick_ms": 200}})) == 200
    with pytest.raises(StartupError) as info:
        model_tick_ms(AppConfig.model_validate({"interaction": {"tick_ms": 100}}))
    message = str(info.value)
    assert "\n" not in message and "100" in message and "trained at 200 ms" in message
    with pytest.raises(StartupError, match="cannot read the model's config"):
        model_tick_ms(AppConfig.model_validate({"model": {"checkpoint": str(tmp_path / "nothing-here")}}))


def test_a_checkpoint_brings_its_own_tick_length(tmp_path):
    import json

    from deployments.plan import model_tick_ms
    from models.checkpoint import CONFIG_FILE, FORMAT
    from models.config import InteractionConfig

    cfg = InteractionConfig.preset("tiny").replace(tick_ms=400)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, **cfg.to_dict()}))
    assert model_tick_ms(AppConfig.model_validate({"model": {"checkpoint": str(tmp_path)}})) == 400


def test_a_moshi_family_checkpoint_brings_its_tick_and_a_broken_one_is_refused_at_start(tmp_path):
    """`model: {family: moshi, path: DIR}`: the tick is whole 80 ms Mimi frames; a directory with a
    file missing is refused before anything starts, naming the file and how to make a servable one."""
    pytest.importorskip("moshi")
    from pydantic import ValidationError

    from deployments.plan import StartupError, engine_spec, model_tick_ms
    from models.moshi.random_checkpoint import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "small", "small", seed=0)
    moshi = {"model": {"family": "moshi", "path": str(ckpt)}}
    assert model_tick_ms(AppConfig.model_validate(moshi)) == 80
    assert model_tick_ms(AppConfig.model_validate({"model": {**moshi["model"], "frames_per_tick": 2}})) == 160
    spec = engine_spec(AppConfig.model_validate(moshi))
    assert (spec.family, spec.path) == ("moshi", str(ckpt)) and spec.describe() == f"Moshi-family {ckpt}"
    with pytest.raises(ValidationError, match="needs model.path"):
        AppConfig.model_validate({"model": {"family": "moshi"}})
    greedy = engine_spec(AppConfig.model_validate({"model": {**moshi["model"], "sampling": {"temperature": 0, "temperature_text": 0}}}))
    assert greedy.sampling == {"temperature": 0, "top_k": 250, "temperature_text": 0, "top_k_text": 25}
    assert "temperature 0" in greedy.describe() and spec.sampling is None
    with pytest.raises(ValidationError, match="family moshi only"):
        AppConfig.model_validate({"model": {"sampling": {"temperature": 0}}})
    (ckpt / "mimi.safetensors").unlink()
    with pytest.raises(StartupError) as info:
        model_tick_ms(AppConfig.model_validate(moshi))
    assert "mimi.safetensors" in str(info.value) and "random_checkpoint" in str(info.value)


def test_margins_suit_where_the_server_listens():
    assert AppConfig().margins_ms() == (10.0, 20.0)  # loopback: no network jitter to absorb
    public = AppConfig.model_validate({"http": {"host": "0.0.0.0"}})
    assert public.margins_ms() == (40.0, 60.0)
    explicit = AppConfig.model_validate({"http": {"host": "0.0.0.0"}, "ingress": {"jitter_ms": 25, "prebuffer_ms": 30}})
    assert explicit.margins_ms() == (25.0, 30.0)


def test_onset_margin_comes_from_the_checkpoint_unless_set(tmp_path):
    import json
    import shutil

    from actors.interaction.interaction import EngineSpec
    from deployments.plan import engine_spec
    from deployments.config import AppConfig
    from models.checkpoint import load_decision

    shipped = AppConfig().model.checkpoint
    assert "onset_margin" in load_decision(shipped)  # the shipped model's calibration is on record
    assert engine_spec(AppConfig()).onset_margin is None  # so serving uses it
    calibrated = tmp_path / "calibrated"
    shutil.copytree(shipped, calibrated)
    (calibrated / "decision.json").write_text(json.dumps({"onset_margin": 1.5}))
    assert EngineSpec(checkpoint=str(calibrated), device="cpu", max_sessions=1).build().onset_margin == 1.5
    assert EngineSpec(checkpoint=str(calibrated), device="cpu", max_sessions=1, onset_margin=0.5).build().onset_margin == 0.5
    assert engine_spec(AppConfig.model_validate({"model": {"onset_margin": 0.5}})).onset_margin == 0.5
    with pytest.raises(ValueError):
        AppConfig.model_validate({"model": {"onset_margin": -1}})
    (calibrated / "decision.json").write_text(json.dumps({"onset_margin": "high"}))
    with pytest.raises(ValueError, match="onset_margin"):
        load_decision(calibrated)
    assert EngineSpec(checkpoint=None, device="cpu", max_sessions=1).build().onset_margin == 0.0


def test_the_defaults_fit_a_two_cpu_machine_with_the_live_path_first():
    """What every part of the default deployment asks of a plain 2-CPU cluster fits in it: the
    live path (actors, one gateway replica) and the pool's first replica (its server and its vLLM
    engine's placement group). Without a named CPU share an actor needs a whole free CPU to be
    placed (and restarted), so every actor names one."""
    from deployments.plan import actor_options, interaction_units
    from deployments.gateway import Gateway
    from deployments.pool import POOL_APP, asks

    config, cluster = AppConfig(), {"CPU": 2.0}
    options = actor_options(config, cluster)
    assert all("num_cpus" in o for o in options.values()), options
    interactions = interaction_units(config, cluster)
    live = (options["session_log"]["num_cpus"] + options["background"]["num_cpus"] + options["router"]["num_cpus"]
            + interactions * options["interaction"]["num_cpus"] + config.ingress.actors * options["ingress"]["num_cpus"]
            + config.gateway.min_replicas * Gateway.ray_actor_options["num_cpus"])
    pool = asks(config.background, cluster)
    assert set(pool) == {POOL_APP}  # the default speech engine deploys nothing
    assert live + pool[POOL_APP]["CPU"] <= cluster["CPU"], (live, pool)
    assert pool[POOL_APP] == {"CPU": 1.25}
    # A Whisper deployment beside it asks its own share; on GPU a replica's engine takes a GPU.
    whisper = asks(AppConfig.model_validate({"background": {"speech": {"engine": "whisper"}}}).background, cluster)
    assert whisper["interplay-speech"] == {"CPU": 1.0}
    assert asks(config.background, {"CPU": 8, "GPU": 1})[POOL_APP] == {"CPU": 0.25, "GPU": 1}


def test_speech_engine_defaults_to_pocketsphinx_and_refuses_what_it_cannot_do():
    speech = AppConfig().background.speech
    assert (speech.mode, speech.engine, speech.model) == ("transcript", "pocketsphinx", None)
    whisper = AppConfig.model_validate({"background": {"speech": {"engine": "whisper", "model": "/models/whisper", "language": "de"}}})
    assert whisper.background.speech.model == "/models/whisper"
    with pytest.raises(ValidationError, match="set background.speech.engine: whisper"):
        AppConfig.model_validate({"background": {"speech": {"model": "/models/whisper"}}})
    with pytest.raises(ValidationError, match="English model only"):
        AppConfig.model_validate({"background": {"speech": {"language": "de"}}})
    with pytest.raises(ValidationError, match="engine"):
        AppConfig.model_validate({"background": {"speech": {"engine": "vosk"}}})
    assert AppConfig.model_validate({"background": {"speech": {"mode": "none", "language": "de"}}}).background.speech.language == "de"
