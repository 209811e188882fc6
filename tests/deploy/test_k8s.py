"""deploy/k8s: kustomize manifests for a KubeRay RayService, its Service, Secret and ConfigMap.

Validated offline, nothing applied:

* ``kubectl kustomize deploy/k8s`` renders them (skipped, saying so, without kubectl);
* the built-in kinds pass ``kubernetes-validate --strict`` (its schemas ship with the package: no
  network), and so do the RayService's pod templates, wrapped as ``PodTemplate`` objects;
* the RayService itself (a CRD, for which kubernetes-validate has no schema) is checked against
  ``RAYSERVICE_SCHEMA``, written from the KubeRay ``ray.io/v1`` fields these manifests use, with
  no unknown field allowed;
* the cross-references hold: Secret keys, ConfigMap settings, the Service's port and selector,
  and the Serve config's import path builds the application.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from server.cluster.config import ClusterSettings
from server.settings import Settings

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip: kubernetes-validate (dev extras)"
)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBECTL = shutil.which("kubectl") or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").is_file() else None)
BUILT_IN = {"ConfigMap", "Secret", "Service"}

_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {"type": "object", "required": ["spec"]}  # checked by kubernetes-validate itself
RAYSERVICE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["serveConfigV2", "rayClusterConfig"],
            "additionalProperties": False,
            "properties": {
                "serveConfigV2": {"type": "string"},
                "rayClusterConfig": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "additionalProperties": False,
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["rayStartParams", "template"],
                            "additionalProperties": False,
                            "properties": {"rayStartParams": _STRINGS, "template": _POD_TEMPLATE},
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["groupName", "rayStartParams", "template"],
                                "additionalProperties": False,
                                "properties": {
                                    "groupName": {"type": "string"},
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 0},
                                    "rayStartParams": _STRINGS,
                                    "template": _POD_TEMPLATE,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict]:
    """``kubectl kustomize deploy/k8s``: kind -> the one object of that kind."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed (kustomize is built in: `kubectl kustomize`)")
    result = subprocess.run([KUBECTL, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    kinds = [d["kind"] for d in docs]
    assert sorted(kinds) == sorted(BUILT_IN | {"RayService"}), kinds
    return {d["kind"]: d for d in docs}


def _validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, kubernetes_validate.utils.latest_version(), strict=True)


def _pod_templates(rayservice: dict) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def test_strict_validation_works_offline_and_rejects_unknown_fields():
    """The schemas ship with the package; a misspelt field is an error, not a warning."""
    good = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}}
    _validate(good)
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate({**good, "datta": {"a": "b"}})


def test_built_in_kinds_pass_strict_validation(rendered):
    for kind in BUILT_IN:
        _validate(rendered[kind])


def test_rayservice_matches_kuberay_fields_and_its_pods_validate(rendered):
    rayservice = rendered["RayService"]
    jsonschema.validate(rayservice, RAYSERVICE_SCHEMA)
    for template in _pod_templates(rayservice):
        _validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        )
    broken = yaml.safe_load(yaml.safe_dump(rayservice))
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 2  # the schema is strict
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, RAYSERVICE_SCHEMA)


def test_cross_references(rendered):
    rayservice, secret, config, service = (
        rendered[k] for k in ("RayService", "Secret", "ConfigMap", "Service")
    )
    secret_keys = set(secret["stringData"])
    settings = config["data"]
    for key in settings:  # every entry is a real server or cluster setting
        if key.startswith("FACET_CLUSTER_"):
            assert key.removeprefix("FACET_CLUSTER_").lower() in ClusterSettings.model_fields, key
        else:
            assert key.removeprefix("FACET_").lower() in Settings.model_fields, key
    Settings(**{k.removeprefix("FACET_").lower(): v for k, v in settings.items() if "CLUSTER_" not in k})
    cluster = rayservice["spec"]["rayClusterConfig"]
    workers = cluster["workerGroupSpecs"][0]
    assert int(settings["FACET_CLUSTER_REPLICAS"]) <= workers["replicas"]  # one engine per worker
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no engine on the head
    for template in _pod_templates(rayservice):
        spec = template["spec"]
        (container,) = spec["containers"]
        assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
        for env in container["env"]:
            ref = env["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret_keys
        volumes = {v["name"]: v for v in spec["volumes"]}
        keys_file = Path(settings["FACET_API_KEYS_FILE"])
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(keys_file.parent)]
        items = volumes[mount["name"]]["secret"]["items"]
        assert {"key": "api_keys", "path": keys_file.name} in items and "api_keys" in secret_keys
        assert any(m["mountPath"] == settings["FACET_DATA_DIR"] for m in container["volumeMounts"])
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        # The Service reaches every serving pod's proxy through the named port.
        assert "serve" in {p["name"] for p in container["ports"]}
        labels = template["metadata"]["labels"]
        own = {k: v for k, v in service["spec"]["selector"].items() if not k.startswith("ray.io/")}
        assert own.items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "serve"


def test_serve_config_builds_the_facet_application(rendered):
    pytest.importorskip("ray.serve", reason="the cluster extra (ray[serve]) is not installed")
    import importlib

    from ray.serve.deployment import Application

    serve_config = yaml.safe_load(rendered["RayService"]["spec"]["serveConfigV2"])
    assert serve_config["http_options"]["port"] == 8000
    (app,) = serve_config["applications"]
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert isinstance(builder(app["args"]), Application)
    with pytest.raises(ValueError, match="args.engine_gpu"):
        builder({"engine_gpu": 1})  # a misspelt argument is refused, not ignored
