"""The KEDA ScaledObject and ServiceMonitor: checked against the CRDs' own schemas (vendored in
tests/data/crds), their PromQL against the metric names and labels the engine exports."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shardbento.catalog import load_spec
from shardbento.cli import main
from shardbento.deploy import k8s
from shardbento.deploy.crd import load_crds, validate_custom
from shardbento.deploy.keda import KedaOptions, queries, thresholds
from shardbento.engine.vllm.args import engine_kwargs
from shardbento.metrics import RequestMetrics

CRD_DIR = Path(__file__).resolve().parents[1] / "data" / "crds"
KEDA_CRD = CRD_DIR / "keda.sh_scaledobjects.yaml"
MONITOR_CRD = CRD_DIR / "monitoring.coreos.com_servicemonitors.yaml"
PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"


def _objects(name: str = "llama-3.1-8b-instruct", **keda: object) -> dict[str, dict]:
    options = k8s.K8sOptions(
        replicas=2,
        max_replicas=6,
        keda=KedaOptions(prometheus_url=PROMETHEUS, **keda),
        scrape="service-monitor",
    )
    return {o["kind"]: o for o in k8s.manifests(load_spec(name), options)}


def test_keda_scaled_object_passes_the_crd_schema_and_a_broken_one_does_not() -> None:
    schemas = load_crds([KEDA_CRD, MONITOR_CRD])
    scaled = _objects()["ScaledObject"]
    validate_custom(scaled, schemas)
    validate_custom(_objects()["ServiceMonitor"], schemas)
    no_metadata = copy.deepcopy(scaled)
    del no_metadata["spec"]["triggers"][0]["metadata"]
    misspelled = copy.deepcopy(scaled)
    misspelled["spec"]["pollingIntervall"] = misspelled["spec"].pop("pollingInterval")
    no_triggers = copy.deepcopy(scaled)
    no_triggers["spec"]["triggers"] = []
    numeric_threshold = copy.deepcopy(scaled)
    numeric_threshold["spec"]["triggers"][0]["metadata"]["threshold"] = 5  # KEDA's metadata is strings
    for broken in (no_metadata, misspelled, no_triggers, numeric_threshold):
        with pytest.raises(jsonschema.ValidationError):
            validate_custom(broken, schemas)


def test_keda_scales_the_deployment_on_waiting_and_running_per_replica() -> None:
    objects = _objects(waiting_per_replica=3, running_fraction=0.5, namespace="llm")
    spec = objects["ScaledObject"]["spec"]
    assert spec["scaleTargetRef"]["name"] == objects["Deployment"]["metadata"]["name"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 6)
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"]  # the CRD's CEL rule, not run by jsonschema
    triggers = {t["name"]: t for t in spec["triggers"]}
    assert {t["type"] for t in triggers.values()} == {"prometheus"}
    assert {t["metricType"] for t in triggers.values()} == {"AverageValue"}
    max_num_seqs = load_spec("llama-3.1-8b-instruct").limits.max_num_seqs
    assert triggers["waiting"]["metadata"]["threshold"] == "3"
    assert float(triggers["running"]["metadata"]["threshold"]) == max_num_seqs * 0.5
    query = triggers["waiting"]["metadata"]["query"]
    assert (
        query
        == 'sum(shardbento:num_requests_waiting{model_name="llama-3.1-8b-instruct",namespace="llm"}) or vector(0)'
    )
    assert triggers["running"]["metadata"]["serverAddress"] == PROMETHEUS
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] == 300
    # the ServiceMonitor scrapes the Service's named port; no pod annotations then (no double scrape)
    monitor = objects["ServiceMonitor"]["spec"]
    assert monitor["endpoints"][0]["port"] == objects["Service"]["spec"]["ports"][0]["name"]
    assert monitor["selector"]["matchLabels"] == objects["Service"]["metadata"]["labels"]
    assert "annotations" not in objects["Deployment"]["spec"]["template"]["metadata"]


def test_keda_queries_select_series_the_engine_exports() -> None:
    """Each query's metric name and model_name label match what RequestMetrics writes on /metrics."""
    spec = load_spec("tiny-llama").model_copy(update={"name": "keda-probe"})  # gauges of its own
    metrics = RequestMetrics(spec.name)
    metrics.waiting.set(3)
    metrics.running.set(7)
    exported = {
        (sample.name, sample.labels.get("model_name")): sample.value
        for family in text_string_to_metric_families(generate_latest(REGISTRY).decode())
        for sample in family.samples
    }
    metrics.waiting.set(0)
    metrics.running.set(0)
    for name, query in queries(spec, KedaOptions(prometheus_url=PROMETHEUS)).items():
        metric, model = re.fullmatch(
            r'sum\(([\w:]+)\{model_name="([^"]+)"\}\) or vector\(0\)', query
        ).groups()
        assert exported[(metric, model)] == {"waiting": 3, "running": 7}[name]
    assert (
        thresholds(spec, KedaOptions(prometheus_url=PROMETHEUS))["running"]
        == f"{spec.limits.max_num_seqs * 0.8:g}"
    )


def test_keda_annotations_let_prometheus_scrape_the_pods() -> None:
    options = k8s.K8sOptions(max_replicas=3, keda=KedaOptions(prometheus_url=PROMETHEUS))
    deployment = k8s.manifests(load_spec("tiny-llama"), options)[0]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == str(container["ports"][0]["containerPort"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"keda": None}, "--prometheus-url"),
        ({"replicas": 0}, "at least 1"),
    ],
)
def test_keda_refuses_what_it_cannot_scale(change: dict, message: str) -> None:
    fields = {"max_replicas": 3, "keda": KedaOptions(prometheus_url=PROMETHEUS), **change}
    with pytest.raises(ValueError, match=message):
        k8s.manifests(load_spec("tiny-llama"), k8s.K8sOptions(**fields))


@pytest.mark.parametrize("engine", ["vllm", "auto"])
def test_keda_scales_an_entry_that_runs_vllm_on_the_max_num_seqs_vllm_is_given(engine: str) -> None:
    """The vLLM engine exports the same gauges (tests/vllm/test_vllm_service.py checks them on a real
    server) and runs at most limits.max_num_seqs, which the running target is a fraction of."""
    spec = load_spec("llama-3.1-8b-instruct")
    spec = spec.model_copy(
        update={"engine": engine, "limits": spec.limits.model_copy(update={"max_num_seqs": 40})}
    )
    options = k8s.K8sOptions(max_replicas=3, keda=KedaOptions(prometheus_url=PROMETHEUS))
    scaled = {o["kind"]: o for o in k8s.manifests(spec, options)}["ScaledObject"]
    triggers = {t["name"]: t["metadata"] for t in scaled["spec"]["triggers"]}
    query = 'sum(shardbento:num_requests_running{model_name="llama-3.1-8b-instruct"}) or vector(0)'
    assert triggers["running"]["query"] == query
    assert engine_kwargs(spec, "org/model")["max_num_seqs"] == 40
    assert triggers["running"]["threshold"] == "32"  # 0.8 x 40


@pytest.mark.parametrize(
    "fields",
    [
        {"prometheus_url": "prometheus:9090"},
        {"prometheus_url": PROMETHEUS, "waiting_per_replica": 0},
        {"prometheus_url": PROMETHEUS, "running_fraction": 1.5},
        {"prometheus_url": PROMETHEUS, "scale_down_window_s": 7200},
    ],
)
def test_keda_options_refuse_bad_values(fields: dict) -> None:
    with pytest.raises(ValueError):
        KedaOptions(**fields)


def test_k8s_cli_writes_and_checks_the_scaled_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tiny.yaml"
    main(["k8s", "tiny-llama", "--max-replicas", "3", "--prometheus-url", PROMETHEUS, "-o", str(out)])
    kinds = [o["kind"] for o in yaml.safe_load_all(out.read_text())]
    assert kinds == ["Deployment", "Service", "ScaledObject"]
    assert main(["k8s", "--check", str(out), "--crd", str(KEDA_CRD)]) == 0
    assert "valid (Deployment, Service, ScaledObject)" in capsys.readouterr().out
    out.write_text(out.read_text().replace("scaleTargetRef:", "scaleTarget:"))
    with pytest.raises(SystemExit, match="'scaleTargetRef' is a required property"):
        main(["k8s", "--check", str(out), "--crd", str(KEDA_CRD)])
    with pytest.raises(SystemExit, match="--prometheus-url"):
        main(["k8s", "tiny-llama", "--max-replicas", "3"])
