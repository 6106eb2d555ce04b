"""Kubernetes manifests and BentoCloud configs derived from catalog specs, checked by real validators."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kubernetes_validate import SchemaNotFoundError, ValidationError

from shardbento.catalog import list_names, load_spec
from shardbento.deploy import bentocloud, k8s
from shardbento.deploy.bento import bento_labels, hub_weights, is_hub_source
from shardbento.deploy.keda import KedaOptions

MODELS = list_names()


def _kind(objects: list[dict], kind: str) -> dict:
    return next(o for o in objects if o["kind"] == kind)


CRDS = sorted((Path(__file__).resolve().parents[1] / "data" / "crds").glob("*.yaml"))
KEDA = KedaOptions(prometheus_url="http://prometheus-operated.monitoring.svc:9090")


@pytest.mark.parametrize("name", MODELS)
def test_k8s_manifests_pass_the_kubernetes_schema(name: str) -> None:
    options = k8s.K8sOptions(max_replicas=3, cache_size_gib=200, keda=KEDA, namespace="llm")
    objects = k8s.manifests(load_spec(name), options)
    k8s.validate(objects, crd_files=CRDS)
    assert {o["kind"] for o in objects} == {"Deployment", "Service", "ScaledObject", "PersistentVolumeClaim"}
    assert {o["metadata"]["namespace"] for o in objects} == {"llm"}
    cpu = k8s.K8sOptions(max_replicas=3, autoscaler="cpu", scrape="service-monitor")
    objects = k8s.manifests(load_spec(name), cpu)
    k8s.validate(objects, crd_files=CRDS)
    assert {o["kind"] for o in objects} == {
        "Deployment",
        "Service",
        "ServiceMonitor",
        "HorizontalPodAutoscaler",
    }


@pytest.mark.parametrize("name", MODELS)
def test_k8s_deployment_follows_the_spec(name: str) -> None:
    spec = load_spec(name)
    pod = _kind(k8s.manifests(spec), "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    limits = container["resources"].get("limits", {})
    assert limits.get("nvidia.com/gpu") == (str(spec.gpus) if spec.gpus else None)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # weight loading takes minutes
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["dshm"] == "/dev/shm"
    assert "cache" in mounts


def test_k8s_validator_rejects_a_misspelled_field() -> None:
    objects = k8s.manifests(load_spec("tiny-llama"))
    broken = copy.deepcopy(_kind(objects, "Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(ValidationError):
        k8s.validate([broken])


def test_k8s_autoscaler_only_when_max_replicas_exceeds_replicas() -> None:
    spec = load_spec("tiny-llama")
    kinds = {o["kind"] for o in k8s.manifests(spec, k8s.K8sOptions(max_replicas=1, keda=KEDA))}
    assert kinds == {"Deployment", "Service"}
    with pytest.raises(ValueError, match="below replicas"):
        k8s.manifests(spec, k8s.K8sOptions(replicas=3, max_replicas=2))


def test_k8s_validate_refuses_a_kind_without_a_schema() -> None:
    objects = k8s.manifests(load_spec("tiny-llama"), k8s.K8sOptions(max_replicas=2, keda=KEDA))
    with pytest.raises(SchemaNotFoundError):
        k8s.validate(objects)  # no CRD given for the ScaledObject: an error, not a skipped object


@pytest.mark.parametrize("name", MODELS)
def test_bentocloud_config_passes_bentoml_schema(name: str) -> None:
    spec = load_spec(name)
    config = bentocloud.deployment_config(spec)
    struct = bentocloud.validate(config)
    assert struct.bento == f"shardbento-{name}:latest"
    labels = {item.key: item.value for item in struct.labels}
    assert labels == bento_labels(spec)


def test_bentocloud_validate_rejects_unknown_and_mistyped_keys() -> None:
    config = bentocloud.deployment_config(load_spec("tiny-llama"))
    misspelled = copy.deepcopy(config)
    misspelled["services"]["shardbento"]["scalling"] = misspelled["services"]["shardbento"].pop("scaling")
    with pytest.raises(bentocloud.DeploymentConfigError, match="services.shardbento.scalling"):
        bentocloud.validate(misspelled)
    mistyped = copy.deepcopy(config)
    mistyped["services"]["shardbento"]["scaling"]["min_replicas"] = "many"
    with pytest.raises(bentocloud.DeploymentConfigError):
        bentocloud.validate(mistyped)


@pytest.mark.parametrize("name", MODELS)
def test_hub_weights_declared_for_hub_sources_only(name: str) -> None:
    spec = load_spec(name)
    weights = hub_weights(spec)  # a declaration: nothing is downloaded
    if spec.is_generated:
        assert weights is None and not is_hub_source(spec)
    else:
        assert weights is not None
        assert (weights.model_id, weights.revision) == (spec.source, spec.revision)


def test_bento_labels_carry_the_spec() -> None:
    spec = load_spec("llama-3.1-70b-instruct")
    labels = bento_labels(spec)
    assert labels["gpus"] == str(spec.gpus) and labels["gpu_type"] == spec.gpu_type
    assert (labels["source"], labels["revision"], labels["engine"]) == (
        spec.source,
        spec.revision,
        spec.engine,
    )
    assert all(isinstance(v, str) for v in labels.values())


def _service_declaration(model: str) -> dict:
    """What service.py declares to BentoML for a catalog model, imported with the hub switched off."""
    code = (
        "import json, bentoml\n"
        "from bentoml._internal.utils.args import set_arguments\n"
        f"set_arguments({{'model': {model!r}}})\n"
        "import service\n"
        "config = service.ShardBento.config\n"
        "models = [[m.model_id, m.revision] for m in service.ShardBento.models]\n"
        "envs = [{'name': e.name} for e in service.ShardBento.envs]\n"
        "print(json.dumps({'models': models, 'traffic': config['traffic'], 'envs': envs}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true"}
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a subprocess
def test_service_declares_hub_weights_without_downloading() -> None:
    """service.py, imported for a hub model with the hub switched off, lists its HuggingFaceModel."""
    spec = load_spec("qwen2.5-7b-instruct")
    assert _service_declaration(spec.name)["models"] == [[spec.source, spec.revision]]


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize("model", ["llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "tiny-llama"])
def test_service_declares_concurrency_and_hf_token_from_the_spec(model: str) -> None:
    spec = load_spec(model)
    declared = _service_declaration(model)
    assert declared["traffic"]["concurrency"] == spec.limits.max_num_seqs
    assert "max_concurrency" not in declared["traffic"]
    assert declared["envs"] == ([{"name": "HF_TOKEN"}] if spec.gated else [])
    assert spec.gated == (model == "llama-3.1-8b-instruct")
