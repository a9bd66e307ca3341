"""Deployment files: docker-compose.yml, deploy/k8s, deploy/Dockerfile and deploy/grpc_health_check.py.

Static checks (no Docker engine or cluster needed): the compose file against the compose specification, every
service command and container args through the service's own argparse parser (so a mistyped flag fails here, not
at `docker compose up`), the wiring between services (addresses, ports, probes, depends_on), the Dockerfile's
install order, and the health probe script against a real in-process gRPC health server on loopback.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import socket
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.args import ArgsBase
from gateway.config import GatewayArgs
from scheduler_svc.config import SchedulerArgs
from vision_svc.config import VisionArgs
from worker_svc.config import WorkerArgs

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
K8S_DIR = REPO / "deploy" / "k8s"
HEALTH_SCRIPT = REPO / "deploy" / "grpc_health_check.py"

ARGS = {"gateway": GatewayArgs, "scheduler": SchedulerArgs, "worker": WorkerArgs, "vision": VisionArgs}
GRPC_SERVICES = ("scheduler", "worker", "vision")
# The compose service that writes the internal token, and where every service reads it.
TOKEN_INIT = "internal-token"
# Compose services that are not Mirador's, behind the opt-in "monitoring" profile.
MONITORING = ("prometheus", "grafana")
PROMETHEUS_YML = REPO / "deploy" / "prometheus.yml"
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "mirador-dashboard.json"
MONITORING_DIR = K8S_DIR / "monitoring"
TOKEN_DIR = "/var/lib/mirador/secrets"
# Which service each address flag must point at.
ADDRESS_TARGETS = {"scheduler_address": "scheduler", "worker_address": "worker", "vision_address": "vision"}
# Where the image puts the default model (a symlink made at build time) and the health probe script.
DEFAULT_MODEL = "/models/default"
IMAGE_HEALTH_SCRIPT = "/app/deploy/grpc_health_check.py"


# ------------------------------------------------------------------------------------------------ helpers


def load_yaml_all(text: str) -> list[Any]:
    """PyYAML when installed, else ruamel.yaml (a check-jsonschema dependency); both resolve `<<` merge keys."""
    try:
        import yaml
    except ImportError:
        from ruamel.yaml import YAML

        return [d for d in YAML(typ="safe", pure=True).load_all(text) if d is not None]
    return [d for d in yaml.safe_load_all(text) if d is not None]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # raise instead of printing usage and exiting
        raise ValueError(message)


def parse_service_argv(argv: list[str], where: str) -> tuple[str, argparse.Namespace]:
    """`mirador <service> flags...` minus `mirador`: (service, namespace) from the service's own parser."""
    assert argv, f"{where}: empty command"
    service = argv[0]
    assert service in ARGS, f"{where}: first element {service!r} is not one of {sorted(ARGS)}"
    # allow_abbrev=False: the services accept unambiguous prefixes, but deploy files should spell flags out, and a
    # truncated flag is how a typo would slip through.
    parser = _Parser(prog=f"mirador {service}", allow_abbrev=False)
    ARGS[service].add_cli_args(parser)
    try:
        ns = parser.parse_args(argv[1:])
    except ValueError as e:
        pytest.fail(f"{where}: `mirador {service}` rejects its arguments: {e}\n  argv: {argv}")
    return service, ns


def check_args_build(service: str, ns: argparse.Namespace, where: str) -> ArgsBase:
    """The namespace also passes the dataclass's own validation (__post_init__)."""
    try:
        return ARGS[service].from_cli_args(ns)
    except ValueError as e:
        pytest.fail(f"{where}: {e}")


_COMPOSE_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def compose_interpolate(value: str) -> str:
    """${VAR:-default} / ${VAR-default} / ${VAR} with nothing set, as `docker compose` would with an empty env."""
    return _COMPOSE_VAR.sub(lambda m: m.group(2) or "", value)


def split_address(value: str, where: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    assert sep and host and port.isdigit(), f"{where}: address {value!r} is not host:port"
    return host, int(port)


# ------------------------------------------------------------------------------------------------ compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    docs = load_yaml_all(COMPOSE.read_text())
    assert len(docs) == 1 and isinstance(docs[0], dict), "docker-compose.yml must be one YAML mapping"
    return docs[0]


@pytest.fixture(scope="module")
def compose_commands(compose) -> dict[str, tuple[list[str], argparse.Namespace]]:
    out = {}
    for name, svc in compose["services"].items():
        if name == TOKEN_INIT or name in MONITORING:
            continue
        cmd = svc.get("command")
        assert isinstance(cmd, list) and all(isinstance(c, str) for c in cmd), (
            f"compose service {name}: command must be a list of strings"
        )
        argv = [compose_interpolate(c) for c in cmd]
        service, ns = parse_service_argv(argv, f"docker-compose.yml service {name}")
        assert service == name, f"compose service {name} runs `mirador {service}`"
        check_args_build(service, ns, f"docker-compose.yml service {name}")
        out[name] = (argv, ns)
    return out


def _check_jsonschema_exe() -> str:
    exe = Path(sys.executable).parent / "check-jsonschema"
    if exe.exists():
        return str(exe)
    found = shutil.which("check-jsonschema")
    if found is None:
        pytest.fail("check-jsonschema is not installed (pip install -e '.[test]')")
    return found


def test_compose_matches_compose_spec():
    proc = subprocess.run(
        [_check_jsonschema_exe(), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"docker-compose.yml fails the compose spec:\n{proc.stdout}\n{proc.stderr}"


def test_compose_services_and_commands(compose, compose_commands):
    services = {k: v for k, v in compose["services"].items() if k != TOKEN_INIT and k not in MONITORING}
    assert set(services) == set(ARGS), f"compose services {sorted(services)} != {sorted(ARGS)}"
    for name, svc in services.items():
        assert svc.get("image") == "mirador:latest", f"{name}: image"
        assert svc.get("build") == {"context": ".", "dockerfile": "deploy/Dockerfile"}, f"{name}: build"
        _, ns = compose_commands[name]
        assert ns.host == "0.0.0.0", f"{name}: must listen on 0.0.0.0 inside its container"
        assert ns.model_path == DEFAULT_MODEL, (
            f"{name}: default --model-path should be the image's {DEFAULT_MODEL}"
        )
        raw_model = svc["command"][svc["command"].index("--model-path") + 1]
        assert raw_model.startswith("${MIRADOR_MODEL"), (
            f"{name}: --model-path should come from $MIRADOR_MODEL"
        )


def test_compose_addresses_point_at_the_right_service(compose_commands):
    ports = {name: ns.port for name, (_, ns) in compose_commands.items()}
    required = {
        "gateway": {"scheduler_address"},
        "scheduler": {"worker_address", "vision_address"},
        "worker": {"vision_address"},
        "vision": set(),
    }
    for name, (_, ns) in compose_commands.items():
        for flag, target in ADDRESS_TARGETS.items():
            value = getattr(ns, flag, None)
            if flag in required[name]:
                argv = compose_commands[name][0]
                assert "--" + flag.replace("_", "-") in argv, (
                    f"{name}: --{flag.replace('_', '-')} must be set"
                )
            if not value:
                continue
            host, port = split_address(value, f"compose {name} --{flag}")
            assert host == target, f"compose {name}: --{flag} {value} should name the {target} service"
            assert port == ports[target], (
                f"compose {name}: --{flag} {value} but {target} listens on {ports[target]}"
            )


def test_compose_dependencies_ports_and_healthchecks(compose, compose_commands):
    services = compose["services"]

    def deps(name):
        d = services[name].get("depends_on", {})
        assert isinstance(d, dict), f"{name}: depends_on must use the long form with conditions"
        return {k: v.get("condition") for k, v in d.items()}

    assert deps("gateway") == {"scheduler": "service_healthy"}
    assert deps("scheduler") == {"worker": "service_healthy", "vision": "service_healthy"}
    published = {
        name: svc["ports"] for name, svc in services.items() if svc.get("ports") and name not in MONITORING
    }
    gw_port = compose_commands["gateway"][1].port
    assert published == {"gateway": [f"{gw_port}:{gw_port}"]}, "only the gateway's port is published"
    for name, svc in services.items():
        if name == TOKEN_INIT or name in MONITORING:
            continue
        test = svc.get("healthcheck", {}).get("test")
        assert isinstance(test, list) and test[0] == "CMD", (
            f"{name}: healthcheck test must be an exec-form CMD"
        )
        port = compose_commands[name][1].port
        if name in GRPC_SERVICES:
            assert test[1:] == ["python", IMAGE_HEALTH_SCRIPT, f"localhost:{port}"], (
                f"{name}: healthcheck {test}"
            )
        else:
            assert f"http://localhost:{port}/health" in " ".join(test), f"{name}: healthcheck {test}"


def test_compose_services_share_a_generated_internal_token(compose, compose_commands, tmp_path):
    """The one-shot service writes a random token once; every service reads it from the shared volume."""
    services = compose["services"]
    init = services[TOKEN_INIT]
    assert init.get("restart") == "no", f"{TOKEN_INIT} runs once"
    mount = next(v for v in init["volumes"] if v.split(":")[1] == TOKEN_DIR)
    volume = mount.split(":")[0]
    assert volume in compose["volumes"] and not mount.endswith(":ro"), f"{TOKEN_INIT} writes {TOKEN_DIR}"
    for name, (_, ns) in compose_commands.items():
        assert ns.internal_token_file == f"{TOKEN_DIR}/token", f"{name}: --internal-token-file"
        assert f"{volume}:{TOKEN_DIR}:ro" in services[name]["volumes"], f"{name}: mounts the token read-only"
    for name in ("vision", "worker"):  # the scheduler and the gateway wait for these already
        condition = services[name]["depends_on"][TOKEN_INIT]["condition"]
        assert condition == "service_completed_successfully", f"{name} waits for the token"
    # Run the init's code against a temporary directory: a 64-hex-digit token, private, kept on the next run.
    entry = init["entrypoint"]
    assert entry[:2] == ["python", "-c"]
    code = entry[2].replace(TOKEN_DIR, str(tmp_path))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    token_file = tmp_path / "token"
    token = token_file.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token) and (token_file.stat().st_mode & 0o777) == 0o600
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert token_file.read_text() == token, "a restart must keep the token the running services hold"


# ------------------------------------------------------------------------------------------------ kubernetes


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH")
    proc = subprocess.run([kubectl, "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize deploy/k8s failed:\n{proc.stderr}"
    return load_yaml_all(proc.stdout)


def _by_kind(docs, kind) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.fixture(scope="module")
def k8s_containers(k8s_docs) -> dict[str, tuple[dict[str, Any], dict[str, Any], argparse.Namespace]]:
    """service -> (deployment, container, parsed args), with $(VAR) references resolved from the ConfigMaps."""
    configmaps = _by_kind(k8s_docs, "ConfigMap")
    out = {}
    for dep_name, dep in _by_kind(k8s_docs, "Deployment").items():
        containers = dep["spec"]["template"]["spec"]["containers"]
        assert len(containers) == 1, f"{dep_name}: one container expected"
        c = containers[0]
        env = {}
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = e["value"]
            else:
                ref = e["valueFrom"]["configMapKeyRef"]
                assert ref["name"] in configmaps, f"{dep_name}: env {e['name']} refers to a missing ConfigMap"
                env[e["name"]] = configmaps[ref["name"]]["data"][ref["key"]]
        where = f"deploy/k8s Deployment {dep_name}"
        assert "command" not in c, f"{where}: use args (the image's entrypoint is `mirador`)"

        def resolve(arg: str, where=where, env=env) -> str:
            def one(m):
                assert m.group(1) in env, f"{where}: $({m.group(1)}) is not a container env var"
                return env[m.group(1)]

            return re.sub(r"\$\((\w+)\)", one, arg)

        service, ns = parse_service_argv([resolve(a) for a in c["args"]], where)
        check_args_build(service, ns, where)
        assert service not in out, f"two Deployments run {service}"
        out[service] = (dep, c, ns)
    assert set(out) == set(ARGS), f"k8s Deployments run {sorted(out)}, expected {sorted(ARGS)}"
    return out


def test_k8s_args_and_probes(k8s_containers):
    for service, (dep, c, ns) in k8s_containers.items():
        name = dep["metadata"]["name"]
        assert ns.host == "0.0.0.0", f"{name}: must listen on 0.0.0.0"
        assert c["image"].split(":")[0].endswith("mirador"), f"{name}: image {c['image']}"
        ports = {p.get("name"): p["containerPort"] for p in c["ports"]}
        assert ns.port in ports.values(), f"{name}: containerPort {ports} does not match --port {ns.port}"
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert kind in c, f"{name}: no {kind}"
        if service in GRPC_SERVICES:
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[kind].get("grpc", {}).get("port") == ns.port, (
                    f"{name}: {kind} must be grpc on {ns.port}"
                )
        else:
            get = c["readinessProbe"].get("httpGet", {})
            assert get.get("path") == "/health", f"{name}: readiness must GET /health"
            assert ports.get(get.get("port"), get.get("port")) == ns.port, f"{name}: readiness port"
        requests = c.get("resources", {}).get("requests", {})
        assert "cpu" in requests and "memory" in requests, f"{name}: resource requests"
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert labels.get("app.kubernetes.io/name") == "mirador", f"{name}: labels"
        assert labels.get("app.kubernetes.io/component") == service, f"{name}: labels"


def test_k8s_addresses_resolve_to_the_right_service(k8s_docs, k8s_containers):
    services = _by_kind(k8s_docs, "Service")
    for dep, _, ns in k8s_containers.values():
        for flag, target in ADDRESS_TARGETS.items():
            value = getattr(ns, flag, None)
            if not value:
                continue
            where = f"{dep['metadata']['name']} --{flag.replace('_', '-')} {value}"
            host, port = split_address(value, where)
            assert host in services, f"{where}: no Service named {host}"
            svc = services[host]
            target_dep, target_c, target_ns = k8s_containers[target]
            pod_labels = target_dep["spec"]["template"]["metadata"]["labels"]
            assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items()), (
                f"{where}: Service {host} does not select the {target} pods"
            )
            svc_port = next((p for p in svc["spec"]["ports"] if p["port"] == port), None)
            assert svc_port is not None, f"{where}: Service {host} has no port {port}"
            named = {p.get("name"): p["containerPort"] for p in target_c["ports"]}
            target_port = svc_port.get("targetPort", port)
            assert named.get(target_port, target_port) == target_ns.port, (
                f"{where}: Service {host}:{port} forwards to {target_port}, but {target} listens on {target_ns.port}"
            )


def test_k8s_services_read_the_internal_token_from_one_secret(k8s_containers):
    for dep, c, ns in k8s_containers.values():
        name = dep["metadata"]["name"]
        token_dir = str(Path(ns.internal_token_file).parent)
        mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == token_dir), None)
        assert mount is not None and mount.get("readOnly"), f"{name}: {token_dir} must be a read-only mount"
        volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
        assert volume.get("secret", {}).get("secretName") == "mirador-internal-token", f"{name}: token secret"
    assert (
        "kubectl create secret generic mirador-internal-token" in (K8S_DIR / "kustomization.yaml").read_text()
    )


def test_k8s_worker_gpu_limit_is_an_opt_in_comment(k8s_containers):
    limits = k8s_containers["worker"][1]["resources"].get("limits", {})
    assert "nvidia.com/gpu" not in limits, "the default manifests must schedule on CPU-only clusters"
    assert re.search(r"#\s*nvidia\.com/gpu:\s*1", (K8S_DIR / "worker.yaml").read_text()), (
        "worker.yaml should carry the GPU limit as a commented example"
    )


def test_k8s_manifests_match_kubernetes_schemas(k8s_docs):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in k8s_docs:
        try:
            # 1.27: the first release with GA gRPC probes; strict rejects unknown fields (typos).
            kubernetes_validate.validate(doc, "1.27.0", strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {e}")


# ------------------------------------------------------------------------------------------------ monitoring


def test_compose_monitoring_is_an_opt_in_profile_scraping_every_service(compose, compose_commands):
    services = compose["services"]
    for name in MONITORING:
        assert services[name].get("profiles") == ["monitoring"], f"{name}: behind the monitoring profile"
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    for volume in services["grafana"]["volumes"]:
        host = REPO / volume.split(":")[0]
        assert host.exists(), f"grafana mounts {volume}, which does not exist"
    # the targets are the services' metrics endpoints as their compose commands open them
    expected = {f"gateway:{compose_commands['gateway'][1].port}"}
    for name in GRPC_SERVICES:
        ns = compose_commands[name][1]
        assert ns.metrics_port > 0, f"compose {name}: --metrics-port must be set"
        expected.add(f"{name}:{ns.metrics_port}")
    config = load_yaml_all(PROMETHEUS_YML.read_text())[0]
    targets = {t for sc in config["scrape_configs"] for st in sc["static_configs"] for t in st["targets"]}
    assert targets == expected
    assert all(sc.get("metrics_path", "/metrics") == "/metrics" for sc in config["scrape_configs"])


def test_grafana_provisioning_points_at_the_dashboard(compose):
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    provider = load_yaml_all((GRAFANA_DIR / "provisioning" / "dashboards" / "mirador.yml").read_text())[0]
    path = provider["providers"][0]["options"]["path"]
    assert mounts["./deploy/grafana/mirador-dashboard.json"].startswith(path + "/")
    datasource = load_yaml_all((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        0
    ]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


# What a Grafana dashboard must have for Grafana to load it and for its panels to query Prometheus (the parts of
# Grafana's dashboard model this file uses; offline, so not Grafana's whole schema).
DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 30},
        "templating": {"type": "object", "required": ["list"]},
        "panels": {
            "type": "array",
            "minItems": 6,
            "items": {
                "type": "object",
                "required": ["id", "type", "title", "gridPos", "targets", "datasource"],
                "properties": {
                    "id": {"type": "integer"},
                    "type": {"enum": ["timeseries", "stat", "gauge", "bargauge", "table", "heatmap"]},
                    "gridPos": {
                        "type": "object",
                        "required": ["x", "y", "w", "h"],
                        "properties": {
                            "x": {"type": "integer", "minimum": 0, "maximum": 23},
                            "w": {"type": "integer", "minimum": 1, "maximum": 24},
                        },
                    },
                    "datasource": {"type": "object", "required": ["type", "uid"]},
                    "targets": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["expr", "refId"],
                            "properties": {"expr": {"type": "string", "pattern": "mirador:"}},
                        },
                    },
                },
            },
        },
    },
}


def test_dashboard_loads_and_queries_only_metrics_the_code_declares():
    import json

    import jsonschema

    dashboard = json.loads(DASHBOARD.read_text())
    jsonschema.validate(dashboard, DASHBOARD_SCHEMA)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("throughput", "time to first token", "inter-token", "queue", "kv", "cache hit", "errors"):
        assert topic in titles, f"the dashboard has no {topic} panel"
    declared = set()
    for path in [*REPO.glob("*/metrics.py")]:
        declared |= set(re.findall(r'(?:PREFIX \+ |\(\s*)"([a-z0-9_]+)"', path.read_text()))
    used = {
        m
        for p in dashboard["panels"]
        for t in p["targets"]
        for m in re.findall(r"mirador:([a-z0-9_]+)", t["expr"])
    }
    suffixes = ("_bucket", "_total", "_count", "_sum")
    missing = {
        m
        for m in used
        if m not in declared and not any(m.endswith(x) and m[: -len(x)] in declared for x in suffixes)
    }
    assert not missing, f"the dashboard queries metrics no service declares: {sorted(missing)}"


def test_k8s_metrics_ports_are_exposed_and_annotated(k8s_docs, k8s_containers):
    services = _by_kind(k8s_docs, "Service")
    for name in GRPC_SERVICES:
        dep, c, ns = k8s_containers[name]
        ports = {p.get("name"): p["containerPort"] for p in c["ports"]}
        assert ns.metrics_port and ports.get("metrics") == ns.metrics_port, f"{name}: metrics containerPort"
        annotations = dep["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/port") == str(ns.metrics_port), f"{name}: prometheus.io/port"
        svc_ports = {p["name"]: p for p in services[f"mirador-{name}"]["spec"]["ports"]}
        assert svc_ports["metrics"]["targetPort"] == "metrics", f"{name}: Service port 'metrics'"
    policies = _by_kind(k8s_docs, "NetworkPolicy")
    for name in GRPC_SERVICES:
        ns = k8s_containers[name][2]
        opened = {p["port"] for rule in policies[f"mirador-{name}"]["spec"]["ingress"] for p in rule["ports"]}
        assert ns.metrics_port in opened, (
            f"NetworkPolicy mirador-{name} must admit scrapes of {ns.metrics_port}"
        )


def test_k8s_disruption_budgets_and_gateway_autoscaler(k8s_docs, k8s_containers):
    pods = {svc: dep["spec"]["template"]["metadata"]["labels"] for svc, (dep, _, _) in k8s_containers.items()}

    def selected(selector) -> set[str]:
        out = set()
        for svc, labels in pods.items():
            ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
            for expr in selector.get("matchExpressions", []):
                assert expr["operator"] == "In"
                ok = ok and labels.get(expr["key"]) in expr["values"]
            if ok:
                out.add(svc)
        return out

    pdbs = _by_kind(k8s_docs, "PodDisruptionBudget")
    covered = {name: selected(p["spec"]["selector"]) for name, p in pdbs.items()}
    assert covered == {"mirador-gateway": {"gateway"}, "mirador-backend": {"scheduler", "worker", "vision"}}
    assert pdbs["mirador-backend"]["spec"]["maxUnavailable"] == 1
    hpas = _by_kind(k8s_docs, "HorizontalPodAutoscaler")
    gw = hpas["mirador-gateway"]["spec"]
    assert gw["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mirador-gateway"}
    assert gw["metrics"][0]["resource"]["name"] == "cpu"
    assert gw["minReplicas"] > pdbs["mirador-gateway"]["spec"]["minAvailable"], (
        "a drain must leave one gateway"
    )
    assert "cpu" in k8s_containers["gateway"][1]["resources"]["requests"], (
        "CPU utilization needs a CPU request"
    )


def test_k8s_monitoring_component(k8s_docs):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH")
    proc = subprocess.run(
        [kubectl, "kustomize", str(MONITORING_DIR)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    docs = load_yaml_all(proc.stdout)
    services = _by_kind(k8s_docs, "Service")
    monitor = _by_kind(docs, "ServiceMonitor")["mirador"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    port_names = set()
    for svc in services.values():
        if all(svc["metadata"].get("labels", {}).get(k) == v for k, v in selector.items()):
            port_names |= {p["name"] for p in svc["spec"]["ports"]}
    assert {"http", "metrics"} <= port_names
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    # the adapter rule serves the scheduler's gauge under the name the HPA asks for
    rules = load_yaml_all(
        _by_kind(docs, "ConfigMap")["mirador-prometheus-adapter-rules"]["data"]["config.yaml"]
    )[0]
    rule = rules["rules"][0]
    assert rule["seriesQuery"].startswith("mirador:num_queue_reqs{")
    assert '"num_queue_reqs"' in (REPO / "scheduler_svc" / "metrics.py").read_text()
    hpa = _by_kind(docs, "HorizontalPodAutoscaler")["mirador-scheduler"]["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"]
    assert hpa["scaleTargetRef"]["name"] == "mirador-scheduler"
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            continue  # a CRD: kubernetes-validate has no schema for it (checked field by field above)
        try:
            kubernetes_validate.validate(doc, "1.27.0", strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {e}")


# ------------------------------------------------------------------------------------------------ Dockerfile


def _dockerfile_instructions() -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    out, cur = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        cur += " " + s.removesuffix("\\").strip()
        if not s.endswith("\\"):
            out.append(cur.strip())
            cur = ""
    return out


def test_dockerfile_installs_torch_before_the_project():
    ins = _dockerfile_instructions()
    assert ins[0] == "FROM python:3.11-slim"
    assert 'ARG TORCH_SPEC="torch==2.13.0"' in ins
    assert 'ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"' in ins
    torch_at = next(
        (
            i
            for i, s in enumerate(ins)
            if s.startswith("RUN ")
            and re.search(r"pip install\b", s)
            and "${TORCH_SPEC}" in s
            and "${TORCH_INDEX_URL}" in s
        ),
        None,
    )
    project_at = next(
        (
            i
            for i, s in enumerate(ins)
            if s.startswith("RUN ") and re.search(r"pip install\b[^&;|]*\s\.(\s|$)", s)
        ),
        None,
    )
    copy_at = next((i for i, s in enumerate(ins) if re.fullmatch(r"COPY \. /app/?", s)), None)
    assert torch_at is not None, "no `pip install ${TORCH_SPEC}` from ${TORCH_INDEX_URL}"
    assert project_at is not None, "no `pip install .`"
    assert copy_at is not None, "the repo must be copied to /app (the compose healthchecks use /app/deploy)"
    assert torch_at < copy_at < project_at, "torch must be installed before the repo is copied and installed"


def test_dockerfile_builds_the_default_model_and_runs_unprivileged():
    ins = _dockerfile_instructions()
    model_at = next((i for i, s in enumerate(ins) if "mirador default-model" in s), None)
    assert model_at is not None and "MIRADOR_CACHE_DIR=/models" in ins[model_at]
    assert "ln -s" in ins[model_at] and DEFAULT_MODEL in ins[model_at]
    users = [s.split(None, 1)[1] for s in ins if s.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert ins.index(next(s for s in ins if s.startswith("USER "))) < model_at, (
        "build the model as the runtime user, so it owns /models"
    )
    assert 'ENTRYPOINT ["mirador"]' in ins
    assert not any(s.startswith("HEALTHCHECK") for s in ins), "probes live in compose and k8s"
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".venv", ".git"):
        assert entry in ignored, f".dockerignore must exclude {entry}"


# ------------------------------------------------------------------------------------------------ health probe


def _load_health_script():
    spec = importlib.util.spec_from_file_location("grpc_health_check", HEALTH_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_health_probe_exit_codes(health_server, capsys):
    probe = _load_health_script()
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    servicer.set("mirador.Worker", health_pb2.HealthCheckResponse.SERVING)
    assert probe.main([address]) == 1, "NOT_SERVING must fail"
    assert probe.main([address, "mirador.Worker"]) == 0
    assert probe.main([address, "no.such.Service"]) == 1, "an unknown service (NOT_FOUND) must fail"
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert probe.main([address]) == 0
    assert probe.main([]) == 2 and probe.main(["a", "b", "c"]) == 2
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    assert probe.main([closed]) == 1


def test_health_probe_as_a_command(health_server):
    """As the compose healthcheck runs it: `python grpc_health_check.py ADDRESS`, judged by exit code."""
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    proc = subprocess.run(
        [sys.executable, str(HEALTH_SCRIPT), address], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert "SERVING" in proc.stdout


def test_k8s_network_policies_let_only_the_right_pods_reach_each_port():
    """Only the gateway is public; each gRPC port admits exactly the components that call it (issue 10 item 5)."""
    docs = load_yaml_all((K8S_DIR / "networkpolicy.yaml").read_text())
    assert "networkpolicy.yaml" in (K8S_DIR / "kustomization.yaml").read_text()
    want = {
        "gateway": (None, 8000),
        "scheduler": ({"gateway"}, 50051),
        "worker": ({"scheduler"}, 50052),
        "vision": ({"scheduler", "worker", "gateway"}, 50053),  # encodes, pulls, decode hints
    }
    got, scraped = {}, {}
    for d in docs:
        assert d["kind"] == "NetworkPolicy" and d["spec"]["policyTypes"] == ["Ingress"]
        rules = d["spec"]["ingress"]
        # a rule whose peers are namespaces admits Prometheus to the metrics port, and nothing else
        scrape = [r for r in rules if any("namespaceSelector" in p for p in r.get("from", []))]
        (rule,) = [r for r in rules if r not in scrape]
        component = d["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        peers = {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in rule.get("from", [])}
        (port,) = [p["port"] for p in rule["ports"]]
        got[component] = (peers or None, port)
        scraped[component] = sorted(p["port"] for r in scrape for p in r["ports"])
    assert got == want
    assert scraped == {"gateway": [], "scheduler": [9051], "worker": [9052], "vision": [9053]}
    # the ports are the ones the services listen on
    compose = COMPOSE.read_text()
    for component, (_, port) in want.items():
        assert f'"--port", "{port}"' in compose, component
