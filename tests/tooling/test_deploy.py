"""deploy/: the Kubernetes manifests validate against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields fail) and keep what operating the server needs."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S_VERSION = "1.32"


def load(name: str) -> dict:
    [doc] = yaml.safe_load_all((DEPLOY / name).read_text())
    return doc


def container(deployment: dict) -> dict:
    [server] = deployment["spec"]["template"]["spec"]["containers"]
    return server


@pytest.mark.parametrize("name", ["deployment.yaml", "service.yaml"])
def test_manifest_validates_against_the_kubernetes_schema(name):
    kubernetes_validate.validate(load(name), K8S_VERSION, strict=True)


def test_the_validator_catches_a_broken_manifest():
    broken = copy.deepcopy(load("deployment.yaml"))
    container(broken)["readinessProbe"]["httpGet"]["prot"] = 8000  # a typo'd field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_the_manifests():
    kustomization = load("kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert all((DEPLOY / r).is_file() for r in kustomization["resources"])
    assert {"deployment.yaml", "service.yaml"} <= set(kustomization["resources"])


def test_deployment_probes_resources_and_a_drain_that_fits_the_grace_period():
    deployment = load("deployment.yaml")
    pod = deployment["spec"]["template"]
    server = container(deployment)
    assert server["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # the model load
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1  # one GPU per pod
    assert server["resources"]["requests"]["memory"]
    env = {e["name"]: e["value"] for e in server["env"]}
    assert env["MODEL_WEIGHTS"] == "pretrained"
    pre_stop = server["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # preStop, then the HTTP drain and the workers' stop, each at most SHUTDOWN_TIMEOUT_S.
    worst = int(pre_stop[1]) + 2 * float(env["SHUTDOWN_TIMEOUT_S"])
    assert worst < pod["spec"]["terminationGracePeriodSeconds"] == 30
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == server["ports"][0]["containerPort"]
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001  # the image's user


def test_service_and_service_monitor_select_the_pods():
    deployment, service, monitor = (load("deployment.yaml"), load("service.yaml"),
                                    load("servicemonitor.yaml"))
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    assert re.fullmatch(r"monitoring\.coreos\.com/v\d+", monitor["apiVersion"])
