"""The Helm chart, offline: lint, every rendered object against the Kubernetes schemas, and the
numbers the chart and the other deployment files share with the server (ports, probe paths,
grace period, memory budget) checked against the server's own configuration."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import helm_python
import httpx
import kubernetes_validate
import pytest
import yaml

from modelmora.app import create_app
from modelmora.auth.mode import auth_enabled
from modelmora.cluster.membership import check_cluster_settings
from modelmora.config import ConfigurationError, Settings, load_settings
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


def secret_data(objects: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in objects["Secret"]["data"].items()}


def pod_environment(objects: dict[str, Any], pod_ip: str) -> dict[str, str]:
    """The container's environment as the kubelet gives it: the downward API's pod IP, keys of
    the rendered Secret, and $(VAR) expanded from the variables defined before it."""
    secret = secret_data(objects)
    env: dict[str, str] = {}
    for var in container(objects)["env"]:
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
        elif "fieldRef" in var["valueFrom"]:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", var
            env[var["name"]] = pod_ip
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == objects["Secret"]["metadata"]["name"], var
            if ref["key"] in secret:
                env[var["name"]] = secret[ref["key"]]
            else:  # a key the pod would not start without fails here too
                assert ref.get("optional") is True, f"{var['name']}: no key {ref['key']} in the Secret"
    return env


def pod_settings(objects: dict[str, Any], tmp_path: Path, env: dict[str, str]) -> Settings:
    """What `serve --config` reads in the pod: the rendered modelmora.yaml and its environment."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        return rendered_settings(objects, tmp_path)


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
    # one pod: nobody to route to, so no advertised URL and no cluster secret
    assert not any(e["name"].startswith("MODELMORA_CLUSTER__") for e in container(objects)["env"])
    assert "cluster-secret" not in objects["Secret"]["data"]
    assert not pod_settings(objects, tmp_path, pod_environment(objects, "10.42.0.7")).cluster.enabled


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


def test_replicated_release_routes_between_pods(tmp_path: Path) -> None:
    """cluster.advertisePodIP auto: several pods with Redis jobs advertise their IP, with a
    generated cluster secret, and the server's start checks for routing pass in such a pod."""
    objects = render(REPLICATED_GPU)
    env = {e["name"]: e for e in container(objects)["env"]}
    assert env["MODELMORA_CLUSTER__SECRET"]["valueFrom"]["secretKeyRef"]["key"] == "cluster-secret"
    assert "optional" not in env["MODELMORA_CLUSTER__SECRET"]["valueFrom"]["secretKeyRef"]
    secret = secret_data(objects)
    assert len(secret["cluster-secret"]) >= 32 and secret["cluster-secret"] != secret["bootstrap-key"]

    pod_env = pod_environment(objects, "10.42.0.7")
    settings = pod_settings(objects, tmp_path, pod_env)
    assert settings.cluster.enabled
    assert settings.cluster.advertise_url == f"http://10.42.0.7:{settings.server.port}"
    assert settings.cluster.grpc_advertise_url == f"10.42.0.7:{settings.server.grpc_port}"
    assert settings.cluster.secret is not None
    assert settings.cluster.secret.get_secret_value() == secret["cluster-secret"]
    assert settings.jobs.redis_url == REPLICATED_GPU["secrets"]["redisUrl"]
    assert auth_enabled(settings)  # the pod binds every interface
    check_cluster_settings(settings, auth_on=True)
    # the secret is what the check needs: a pod without it would refuse to start
    pod_env.pop("MODELMORA_CLUSTER__SECRET")
    with pytest.raises(ConfigurationError, match=r"but cluster\.secret is not"):
        check_cluster_settings(pod_settings(objects, tmp_path, pod_env), auth_on=True)

    # a given secret is used as it is, and must be long enough for cluster.secret
    given = "routing-secret-0123456789abcdefghijklmnop"
    objects = render({**REPLICATED_GPU, "secrets": {**REPLICATED_GPU["secrets"], "clusterSecret": given}})
    assert secret_data(objects)["cluster-secret"] == given
    with pytest.raises(helm_python.HelmError, match="clusterSecret must be at least 32"):
        render({**REPLICATED_GPU, "secrets": {**REPLICATED_GPU["secrets"], "clusterSecret": "short"}})


def routing_env(values: dict[str, Any]) -> dict[str, Any]:
    return {
        e["name"]: e for e in container(render(values))["env"] if e["name"].startswith("MODELMORA_CLUSTER__")
    }


def test_when_pods_advertise_themselves() -> None:
    replicated = {**REPLICATED_GPU, "cluster": {"advertisePodIP": "auto"}}
    assert routing_env(replicated)
    assert not routing_env({**replicated, "cluster": {"advertisePodIP": False}})
    # auto: one pod has nobody to route to
    one = {k: v for k, v in REPLICATED_GPU.items() if k != "autoscaling"} | {"replicaCount": 1}
    assert not routing_env(one)
    assert routing_env({**one, "cluster": {"advertisePodIP": True}})
    # auto: an existing Secret may lack cluster-secret; true takes it from there
    external = {**replicated, "secrets": {"existingSecret": "mm-secrets"}}
    external["config"] = {**REPLICATED_GPU["config"], "jobs": {"backend": "redis"}}
    assert not routing_env(external)
    forced = routing_env({**external, "cluster": {"advertisePodIP": True}})
    assert forced["MODELMORA_CLUSTER__SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "mm-secrets",
        "key": "cluster-secret",
    }
    # auto: with TLS a peer's certificate would have to name the pod's IP; true says it does
    tls = {"certfile": "/etc/modelmora-tls/tls.crt", "keyfile": "/etc/modelmora-tls/tls.key"}
    with_tls = {**replicated, "config": {**REPLICATED_GPU["config"], "server": {"tls": tls}}}
    assert not routing_env(with_tls)
    forced = routing_env({**with_tls, "cluster": {"advertisePodIP": True}})
    assert forced["MODELMORA_CLUSTER__ADVERTISE_URL"]["value"] == "https://$(POD_IP):8000"


def test_advertising_without_redis_refuses_to_render() -> None:
    with pytest.raises(helm_python.HelmError, match="advertisePodIP needs Redis jobs"):
        render({"cluster": {"advertisePodIP": True}})
    values = {**REPLICATED_GPU, "cluster": {"advertisePodIP": True}}
    values["secrets"] = {k: v for k, v in REPLICATED_GPU["secrets"].items() if k != "redisUrl"}
    with pytest.raises(helm_python.HelmError, match="advertisePodIP needs Redis jobs"):
        render(values)
    with pytest.raises(helm_python.HelmError, match="must be auto, true or false"):
        render({"cluster": {"advertisePodIP": "yes"}})


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


COMPOSE = ROOT / "deploy" / "compose"


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as compose's env_file reads them."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def interpolated(value: object, given: dict[str, str]) -> str:
    """compose's ${VAR:-default} and ${VAR:?error} with `given` as the shell's environment."""

    def one(match: re.Match[str]) -> str:
        name, op, rest = match[1], match[2], match[3]
        if name in given:
            return given[name]
        assert op != ":?", f"{name} must be set: {rest}"
        return rest or ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, str(value))


def compose_environments(*files: str, given: dict[str, str]) -> dict[str, dict[str, str]]:
    """Each ModelMora service's environment in these compose files (later files override keys),
    on top of modelmora.env.example as its env_file (what an operator copies)."""
    base = env_file(COMPOSE / "modelmora.env.example")
    envs: dict[str, dict[str, str]] = {}
    for name in files:
        compose = yaml.safe_load((COMPOSE / name).read_text(encoding="utf-8"))
        for service, spec in compose["services"].items():
            if service.startswith("modelmora"):
                env = envs.setdefault(service, dict(base))
                env.update({k: interpolated(v, given) for k, v in spec.get("environment", {}).items()})
    return envs


def test_image_and_compose_agree_with_the_server() -> None:
    defaults = Settings()
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    (expose,) = re.findall(r"^EXPOSE (.+)$", dockerfile, re.MULTILINE)
    assert expose.split() == [str(defaults.server.port), str(defaults.server.grpc_port)]
    assert "/health/ready" in dockerfile.split("HEALTHCHECK", 1)[1].split("\n\n", 1)[0]
    assert 'ENTRYPOINT ["modelmora"]' in dockerfile and 'CMD ["serve"]' in dockerfile
    for name in ("single.yml", "replicated.yml"):
        compose = yaml.safe_load((COMPOSE / name).read_text(encoding="utf-8"))
        for service, spec in compose["services"].items():
            if service.startswith("modelmora"):
                grace = float(spec["stop_grace_period"].removesuffix("s"))
                drain, unload = defaults.server.drain_seconds, defaults.lifecycle.unload_grace_seconds
                assert grace > 2 * drain + unload, (name, service)

    # the settings each service's environment gives must pass the server's start checks (the
    # image binds every interface: API keys on), and each replica advertises its own address
    host = {"MODELMORA_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:5432/modelmora"}
    variants = {
        ("single.yml",): {"modelmora": None},
        ("replicated.yml",): {"modelmora-1": "modelmora-1", "modelmora-2": "modelmora-2"},
        ("replicated.yml", "replicated.host.yml"): {"modelmora-1": "127.0.0.1", "modelmora-2": "127.0.0.1"},
    }
    for files, advertised in variants.items():
        envs = compose_environments(*files, given=host)
        assert set(envs) == set(advertised), files
        urls = set()
        for service, env in envs.items():
            with pytest.MonkeyPatch.context() as patch:
                for key, value in env.items():
                    patch.setenv(key, value)
                settings = Settings()
            require_shared(settings)
            check_cluster_settings(settings, auth_on=True)
            if advertised[service] is None:
                assert not settings.cluster.enabled, (files, service)
                continue
            server = settings.server
            assert settings.cluster.advertise_url == f"http://{advertised[service]}:{server.port}", (
                files,
                service,
            )
            assert settings.cluster.grpc_advertise_url == f"{advertised[service]}:{server.grpc_port}"
            urls.add(settings.cluster.advertise_url)
        # no two replicas advertise the same URL
        assert len(urls) == len([h for h in advertised.values() if h is not None]), files
