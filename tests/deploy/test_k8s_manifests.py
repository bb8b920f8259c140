"""deploy/k8s: every manifest validates offline against the Kubernetes API schemas (kubernetes-validate, strict: an
unknown or misspelt field fails), and the pieces fit together: probes, resources, the ConfigMap (valid settings) and
Secret the Deployments read, the grace period covering the drain, /metrics scrapeable without a key, the Service
selecting the pods, the HPA scaling the Deployment on queue depth, Redis durable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from deploy_files import FLUSH_MARGIN_S, K8S, load_yaml_documents, unknown_famserve_vars, validate_settings_env

# The oldest version the manifests need (the preStop sleep action is on by default from 1.30) and a recent one;
# both must be among the schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", "1.34.0")
MANIFESTS = sorted(path for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")
DEPLOYMENTS = ("deployment.yaml", "deployment-gpu.yaml")


def _resources(name: str) -> list[dict[str, Any]]:
    return load_yaml_documents(K8S / name)


def _one(name: str, kind: str) -> dict[str, Any]:
    found = [doc for doc in _resources(name) if doc["kind"] == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["famserve"]
    return containers[0]


def test_there_are_manifests() -> None:
    names = {path.name for path in MANIFESTS}
    assert {"deployment.yaml", "deployment-gpu.yaml", "service.yaml", "hpa.yaml", "redis.yaml", "configmap.yaml",
            "secret.yaml"} <= names


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_manifest_validates_offline(path: Path, version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    documents = load_yaml_documents(path)
    assert documents, f"{path.name} holds no resource"
    for document in documents:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{path.name}: {document['kind']}/{document['metadata']['name']}: {where}: {exc.message}")


def test_kustomization_lists_every_manifest_but_the_gpu_variant() -> None:
    kustomization = load_yaml_documents(K8S / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(path.name for path in MANIFESTS
                                                        if path.name != "deployment-gpu.yaml")


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_probes_health_and_readiness(name: str) -> None:
    container = _container(_one(name, "Deployment"))
    assert container["ports"] == [{"name": "http", "containerPort": 8000}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_has_requests_and_limits(name: str) -> None:
    resources = _container(_one(name, "Deployment"))["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_reads_configmap_and_api_keys_from_the_secret(name: str) -> None:
    container = _container(_one(name, "Deployment"))
    configmap = _one("configmap.yaml", "ConfigMap")
    secret = _one("secret.yaml", "Secret")
    assert container["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]
    keys = next(item for item in container["env"] if item["name"] == "FAMSERVE_API_KEYS")
    assert keys["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert keys["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]
    assert unknown_famserve_vars([item["name"] for item in container["env"]]) == []


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_runs_as_the_image_user_with_a_state_volume(name: str) -> None:
    pod = _one(name, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
    mounts = {mount["mountPath"]: mount["name"] for mount in _container({"spec": {"template": {"spec": pod}}})
              ["volumeMounts"]}
    assert "/var/lib/famserve" in mounts
    assert mounts["/var/lib/famserve"] in {volume["name"] for volume in pod["volumes"]}


def test_gpu_variant_asks_for_a_gpu_and_uses_cuda_in_bfloat16() -> None:
    container = _container(_one("deployment-gpu.yaml", "Deployment"))
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["FAMSERVE_DEVICE"] == "cuda"
    assert env["FAMSERVE_DTYPE"] == "bfloat16"


def test_gpu_variant_replaces_the_cpu_deployment() -> None:
    cpu, gpu = (_one(name, "Deployment") for name in DEPLOYMENTS)
    assert gpu["metadata"]["name"] == cpu["metadata"]["name"]
    assert gpu["spec"]["selector"] == cpu["spec"]["selector"]


def test_configmap_holds_only_known_settings_and_points_at_the_redis_service() -> None:
    data = _one("configmap.yaml", "ConfigMap")["data"]
    assert unknown_famserve_vars(list(data)) == []
    assert all(isinstance(value, str) for value in data.values())  # a ConfigMap holds strings only
    redis_service = _one("redis.yaml", "Service")["metadata"]["name"]
    assert data["FAMSERVE_SESSION_STORE"] == f"redis://{redis_service}:6379/0"


def test_configmap_values_are_valid_settings() -> None:
    validate_settings_env(_one("configmap.yaml", "ConfigMap")["data"])


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_termination_grace_covers_prestop_drain_and_flush(name: str) -> None:
    """The kubelet sends SIGKILL terminationGracePeriodSeconds after deletion began: the preStop pause, the drain
    (FAMSERVE_SHUTDOWN_GRACE_S) and the session flush must fit."""
    pod = _one(name, "Deployment")["spec"]["template"]["spec"]
    pause_s = _container({"spec": {"template": {"spec": pod}}})["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain_s = float(_one("configmap.yaml", "ConfigMap")["data"]["FAMSERVE_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] >= pause_s + drain_s + FLUSH_MARGIN_S


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_pods_scraped_by_annotation_serve_metrics_without_a_key(name: str) -> None:
    """Annotation-discovered scraping carries no credentials, and the pods get API keys from the Secret: so the
    ConfigMap must open /metrics (and the annotations point at it)."""
    annotations = _one(name, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert (annotations["prometheus.io/path"], annotations["prometheus.io/port"]) == ("/metrics", "8000")
    assert _one("configmap.yaml", "ConfigMap")["data"]["FAMSERVE_METRICS_OPEN"] == "true"


def test_service_selects_the_deployment_pods() -> None:
    service = _one("service.yaml", "Service")
    for name in DEPLOYMENTS:
        labels = _one(name, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_hpa_scales_the_deployment_on_queue_depth() -> None:
    hpa = _one("hpa.yaml", "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", _one("deployment.yaml", "Deployment")["metadata"]["name"])
    assert [metric["type"] for metric in hpa["spec"]["metrics"]] == ["Pods"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "famserve_num_requests_waiting"
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_redis_is_durable_and_persistent() -> None:
    statefulset = _one("redis.yaml", "StatefulSet")
    args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["--appendonly"] == "yes"
    assert pairs["--appendfsync"] == "always"
    assert pairs["--maxmemory-policy"] == "noeviction"
    claims = [claim["metadata"]["name"] for claim in statefulset["spec"]["volumeClaimTemplates"]]
    mounts = statefulset["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert [mount["name"] for mount in mounts] == claims


def test_secret_is_a_documented_placeholder() -> None:
    secret = _one("secret.yaml", "Secret")
    assert secret["stringData"]["api-keys"].startswith("REPLACE-ME")
    assert "kubectl" in (K8S / "secret.yaml").read_text()  # how to create the real one
