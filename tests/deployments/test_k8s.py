"""The Kubernetes files: the RayService manifest against the RayService CRD's schema (an excerpt of
KubeRay's `ray.io_rayservices.yaml`, v1 openAPIV3Schema, cut down to the fields the manifest uses
with their types and required lists, every object closed to other keys), its serveConfigV2 equal to
deployments/serve_config.yaml, and its groups offering what the actors and the pool ask for."""

import importlib
import json
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deployments" / "k8s" / "rayservice.yaml"
SERVE_CONFIG = ROOT / "deployments" / "serve_config.yaml"
SCHEMA = Path(__file__).with_name("rayservice_schema.json")


def manifest():
    return yaml.safe_load(MANIFEST.read_text())


def test_manifest_fits_the_rayservice_crd_schema():
    m = manifest()
    assert (m["apiVersion"], m["kind"]) == ("ray.io/v1", "RayService")
    jsonschema.validate(m, json.loads(SCHEMA.read_text()))
    # A field the CRD lacks is refused by the same check.
    bad = manifest()
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    try:
        jsonschema.validate(bad, json.loads(SCHEMA.read_text()))
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("an unknown field passed")


def test_serve_config_is_the_manifests_and_its_builders_import():
    m = manifest()
    serve_config = yaml.safe_load(SERVE_CONFIG.read_text())
    assert yaml.safe_load(m["spec"]["serveConfigV2"]) == serve_config
    apps = {a["name"]: a for a in serve_config["applications"]}
    assert set(apps) == {"interplay", "interplay-background", "interplay-speech"}
    for app in apps.values():
        module, _, attr = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
    from deployments.config import AppConfig, BackgroundSection

    config = AppConfig.model_validate(apps["interplay"]["args"]["config"])
    pool = BackgroundSection.model_validate(apps["interplay-background"]["args"])
    assert config.background.model == pool.model and pool.device == "cuda"
    speech = BackgroundSection.model_validate(apps["interplay-speech"]["args"]).speech
    assert speech == config.background.speech and speech.mode == "transcript"


def _offers(group) -> dict:
    params = group["rayStartParams"]
    offered = json.loads(json.loads(params["resources"])) if "resources" in params else {}
    gpus = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    if gpus:
        offered["GPU"] = int(gpus)
    return offered


def test_groups_offer_what_the_actors_and_the_pool_ask_for():
    from deployments.plan import actor_options
    from deployments.config import AppConfig, BackgroundSection
    from deployments.pool import deployment_options

    cluster = manifest()["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    interaction, background = groups["interaction-gpu"], groups["background-gpu"]
    assert interaction["minReplicas"] == interaction["maxReplicas"] == interaction["replicas"]  # always on
    assert background["minReplicas"] < background["maxReplicas"]  # scales with the pool
    offers = {"head": _offers(cluster["headGroupSpec"]), "interaction-gpu": _offers(interaction), "background-gpu": _offers(background)}
    totals: dict = {}
    for res in offers.values():
        for k, n in res.items():
            totals[k] = totals.get(k, 0) + n
    options = actor_options(AppConfig(), totals)
    replica = deployment_options(BackgroundSection(), totals)["ray_actor_options"]
    asks = {role: dict(o.get("resources", {}), **({"GPU": o["num_gpus"]} if o.get("num_gpus") else {})) for role, o in options.items() if o}
    asks["pool_replica"] = {**replica["resources"], "GPU": 1}
    hosts = {role: [g for g, res in offers.items() if all(res.get(k, 0) >= n for k, n in want.items())] for role, want in asks.items()}
    assert hosts == {
        "session_log": ["head"], "ingress": ["head"], "interaction": ["interaction-gpu"], "router": ["head"], "background": list(offers),
        "pool_replica": ["background-gpu"],
    }
