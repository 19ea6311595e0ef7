"""The Helm chart, offline: lint, every rendered object against the Kubernetes schemas, and the
numbers the chart and the other deployment files share with the server (ports, probe paths,
grace period, memory budget) checked against the server's own configuration."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import helm_python
import httpx
import kubernetes_validate
import pytest
import yaml

from modelmora.app import create_app
from modelmora.config import Settings, load_settings
from modelmora.lifecycle.runners import in_process_runner_factory
from modelmora.results.store import require_shared
from tests.deploy.chart import CHART, ROOT, render

REPLICATED_GPU = yaml.safe_load((CHART / "ci" / "replicated-gpu-values.yaml").read_text(encoding="utf-8"))
VALUE_SETS = {"default": None, "replicated-gpu": REPLICATED_GPU}
KUBE_VERSIONS = ("1.30.0", "1.32.0")
# Custom resources: no schema bundled with kubernetes-validate (checked by hand below).
CRD_KINDS = {"ServiceMonitor"}


def container(objects: dict[str, Any]) -> dict[str, Any]:
    (only,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return dict(only)


def rendered_settings(objects: dict[str, Any], tmp_path: Path) -> Settings:
    """The server's Settings from the rendered modelmora.yaml: what `serve --config` would read."""
    path = tmp_path / "modelmora.yaml"
    path.write_text(objects["ConfigMap"]["data"]["modelmora.yaml"], encoding="utf-8")
    return load_settings(path)


@pytest.fixture
async def app_paths(tmp_path: Path) -> set[str]:
    """The REST paths the server declares (its OpenAPI document)."""
    settings = Settings(server={"data_dir": str(tmp_path / "data")})  # type: ignore[arg-type]
    app = create_app(settings, in_process_runner_factory)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mm") as client:
        response = await client.get("/openapi.json")
    response.raise_for_status()
    return set(response.json()["paths"])


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_lint_strict_without_findings(values: dict[str, Any] | None) -> None:
    report = helm_python.lint(CHART, values, strict=True, kube_version="v1.32.0")
    assert report["errors"] == []
    # severity 1 is information ("icon is recommended"); warnings and errors fail
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_object_is_valid_kubernetes(values: dict[str, Any] | None, kube_version: str) -> None:
    objects = render(values)
    for kind, obj in objects.items():
        if kind in CRD_KINDS:
            continue
        kubernetes_validate.validate(obj, kube_version, strict=True)
    expected = {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"}
    expected.add("PersistentVolumeClaim")
    assert expected <= set(objects)


def test_default_release_is_one_pod_with_a_claim(tmp_path: Path) -> None:
    objects = render(None)
    spec = objects["Deployment"]["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"  # one ReadWriteOnce claim
    (data,) = (v for v in spec["template"]["spec"]["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == objects["PersistentVolumeClaim"]["metadata"]["name"]
    assert {"HorizontalPodAutoscaler", "ServiceMonitor"}.isdisjoint(objects)
    settings = rendered_settings(objects, tmp_path)
    assert settings.jobs.backend == "sqlite"
    assert settings.registry.database_url is None
    # the bootstrap key is generated, long enough for auth.bootstrap_key
    assert len(objects["Secret"]["data"]["bootstrap-key"]) >= 44  # base64 of >= 32 characters


def test_probes_ports_and_grace_agree_with_the_server(tmp_path: Path, app_paths: set[str]) -> None:
    defaults = Settings()
    objects = render(None)
    settings = rendered_settings(objects, tmp_path)
    c = container(objects)

    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": defaults.server.port, "grpc": defaults.server.grpc_port}
    assert (settings.server.port, settings.server.grpc_port) == (ports["http"], ports["grpc"])
    assert settings.server.host == "0.0.0.0"
    service = {p["name"]: p for p in objects["Service"]["spec"]["ports"]}
    assert service["http"]["port"] == ports["http"] and service["grpc"]["port"] == ports["grpc"]
    assert service["grpc"]["appProtocol"] == "grpc"

    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert {"/health/live", "/health/ready"} <= app_paths

    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert settings.server.drain_seconds == defaults.server.drain_seconds
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    # the pod keeps serving through the preStop sleep, then drains; after a drain that timed out
    # uvicorn waits up to drain_seconds more, then the workers get unload_grace_seconds: the kill
    # comes after all of it
    drain, unload = settings.server.drain_seconds, settings.lifecycle.unload_grace_seconds
    assert pod["terminationGracePeriodSeconds"] > pre_stop + 2 * drain + unload

    limit = c["resources"]["limits"]["memory"]
    assert limit == c["resources"]["requests"]["memory"] == "8192Mi"
    assert settings.resources.max_memory_mb is not None and settings.resources.max_memory_mb < 8192
    assert c["args"] == ["--config", "/etc/modelmora/modelmora.yaml", "serve"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/data", "/etc/modelmora", "/tmp"} <= mounts
    assert settings.server.data_dir == Path("/data")


def test_replicated_gpu_release(tmp_path: Path) -> None:
    objects = render(REPLICATED_GPU)
    settings = rendered_settings(objects, tmp_path)
    assert settings.jobs.backend == "redis"  # a Redis URL in the secrets switches the job store
    require_shared(settings)  # file results on the ReadWriteMany claim: what the server checks at start
    assert settings.resources.max_memory_mb == 32768 * 80 // 100
    c = container(objects)
    env = {e["name"]: e for e in c["env"]}
    for name, key in {
        "MODELMORA_REGISTRY__DATABASE_URL": "database-url",
        "MODELMORA_JOBS__REDIS_URL": "redis-url",
        "MODELMORA_AUTH__BOOTSTRAP_KEY": "bootstrap-key",
        "AWS_SECRET_ACCESS_KEY": "s3-secret-access-key",
    }.items():
        assert env[name]["valueFrom"]["secretKeyRef"]["key"] == key
        assert key in objects["Secret"]["data"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "replicas" not in objects["Deployment"]["spec"]  # the autoscaler owns the count
    assert objects["Deployment"]["spec"]["strategy"]["type"] == "RollingUpdate"
    hpa_metrics = {m["type"]: m for m in objects["HorizontalPodAutoscaler"]["spec"]["metrics"]}
    assert hpa_metrics["Pods"]["pods"]["metric"]["name"] == "modelmora_queue_depth"
    assert objects["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    monitor = objects["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == objects["Service"]["spec"]["selector"]


def test_model_store_gives_each_pod_an_empty_dir(tmp_path: Path) -> None:
    values = {**REPLICATED_GPU, "modelStore": {"url": "s3://models/modelmora"}}
    values["persistence"] = {"accessModes": ["ReadWriteOnce"]}
    # Redis jobs with file results in each pod's emptyDir: one pod's result would be 404 on another
    with pytest.raises(helm_python.HelmError, match="job results must be shared"):
        render(values)
    values["config"] = {**REPLICATED_GPU["config"], "results": {"backend": "s3"}}
    objects = render(values)
    require_shared(rendered_settings(objects, tmp_path))
    assert "PersistentVolumeClaim" not in objects
    volumes = {v["name"]: v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["data"]
    config = yaml.safe_load(objects["ConfigMap"]["data"]["modelmora.yaml"])
    assert config["registry"]["model_store"] == "s3://models/modelmora"


def test_several_replicas_without_shared_files_refuse_to_render() -> None:
    values = {"replicaCount": 2, "secrets": {"databaseUrl": "postgresql+psycopg://db/mm"}}
    with pytest.raises(helm_python.HelmError, match="shared model files"):
        render(values)
    values = {"replicaCount": 2, "persistence": {"accessModes": ["ReadWriteMany"]}}
    with pytest.raises(helm_python.HelmError, match="shared registry database"):
        render(values)


def test_image_and_compose_agree_with_the_server() -> None:
    defaults = Settings()
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    (expose,) = re.findall(r"^EXPOSE (.+)$", dockerfile, re.MULTILINE)
    assert expose.split() == [str(defaults.server.port), str(defaults.server.grpc_port)]
    assert "/health/ready" in dockerfile.split("HEALTHCHECK", 1)[1].split("\n\n", 1)[0]
    assert 'ENTRYPOINT ["modelmora"]' in dockerfile and 'CMD ["serve"]' in dockerfile
    for name in ("single.yml", "replicated.yml"):
        compose = yaml.safe_load((ROOT / "deploy" / "compose" / name).read_text(encoding="utf-8"))
        for service, spec in compose["services"].items():
            if service.startswith("modelmora"):
                grace = float(spec["stop_grace_period"].removesuffix("s"))
                drain, unload = defaults.server.drain_seconds, defaults.lifecycle.unload_grace_seconds
                assert grace > 2 * drain + unload, (name, service)
                # the settings the service's environment gives must pass the server's start checks
                with pytest.MonkeyPatch.context() as env:
                    for key, value in spec.get("environment", {}).items():
                        env.setenv(key, str(value))
                    require_shared(Settings())
