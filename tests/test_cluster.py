"""The cluster configs in cluster/: the launcher YAML through Ray's own validator, the KubeRay manifests through
the real CRD schemas, their security properties, and autoscaling proven on this machine with Ray's fake
multi-node provider (GPU worker nodes come up for the sweep and go away when it is done)."""

from __future__ import annotations

import copy
import functools
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

from conftest import RayCluster, free_ports, light_smoke_sweep, wait_for_job_agent

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRDS = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "kuberay"
AWS = CLUSTER / "aws.yaml"
RAYCLUSTER = CLUSTER / "kuberay-raycluster.yaml"
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"

def load(path: Path):
    return yaml.safe_load(path.read_text())


# -- the cluster launcher YAML, through Ray's validator -------------------------------------------------------

def test_aws_config_passes_rays_own_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    config = load(AWS)
    validate_config(config)                                  # ray-schema.json and Ray's cross-field checks
    validate_config(prepare_config(copy.deepcopy(config)))   # with the AWS defaults filled in, as `ray up` does

    # Read back the way the autoscaler v2 of `ray up` reads it.
    types = AutoscalingConfig(copy.deepcopy(config), skip_content_hash=True).get_node_type_configs()
    head = types.pop(config["head_node_type"])
    assert head.resources == {"CPU": 0}                      # no trial, task or Train worker lands on the head
    assert types and all(t.resources.get("GPU", 0) >= 1 for t in types.values())
    assert all(t.min_worker_nodes == 0 for t in types.values())  # GPUs only while there is work
    assert all(0 < t.idle_timeout_s <= 600 for t in types.values())  # per type, honoured by autoscaler v2


def _misspelt_node_field(c):
    c["available_node_types"]["gpu_1x"]["idle_timeout_sec"] = c["available_node_types"]["gpu_1x"].pop("idle_timeout_s")


def _wrong_type_min_workers(c):
    c["available_node_types"]["gpu_1x"]["min_workers"] = "0"


def _fractional_gpu_resource(c):
    c["available_node_types"]["gpu_1x"]["resources"]["GPU"] = 0.5


def _misspelt_top_level(c):
    c["idle_timeout_minute"] = c.pop("idle_timeout_minutes")


def _misspelt_docker_option(c):
    c["docker"]["run_option"] = c["docker"].pop("run_options")


def _unknown_head_type(c):
    c["head_node_type"] = "head_node"


@pytest.mark.parametrize("breakage", [_misspelt_node_field, _wrong_type_min_workers, _fractional_gpu_resource,
                                      _misspelt_top_level, _misspelt_docker_option, _unknown_head_type])
def test_a_broken_aws_config_fails_the_same_validation(breakage):
    from ray.autoscaler._private.util import validate_config

    config = load(AWS)
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(config)


# -- the KubeRay manifests, through the real CRD schemas ------------------------------------------------------

_SCHEMA_MAPS = ("properties", "patternProperties")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf")
_SCHEMA_ONE = ("items", "additionalProperties", "not")


def kubernetes_schema(node):
    """A CRD's OpenAPI v3 schema as a JSON Schema with the API server's semantics: unknown fields are errors
    (what `kubectl apply` does with its default strict field validation; the server would otherwise prune
    them silently), `nullable` admits null, `x-kubernetes-int-or-string` admits exactly ints and strings.
    The other `x-kubernetes-*` keywords are checked by the validator below (list-map keys, sets); CEL rules
    (`x-kubernetes-validations`) are not evaluated here, so a test checks that no manifest sets a field that has one."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS:
            out[key] = {name: kubernetes_schema(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS:
            out[key] = [kubernetes_schema(sub) for sub in value]
        elif key in _SCHEMA_ONE and isinstance(value, dict):
            out[key] = kubernetes_schema(value)
        else:
            out[key] = value
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False):
        out = {"anyOf": [out, {"type": "null"}]}
    elif ("properties" in out and "additionalProperties" not in out
          and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _list_map_keys(validator, keys, instance, schema):
    if not validator.is_type(instance, "array"):
        return
    seen = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry for list-map keys {keys}: {key}")
            seen.add(key)


def _list_type(validator, kind, instance, schema):
    if kind == "set" and validator.is_type(instance, "array"):
        items = [json.dumps(i, sort_keys=True) for i in instance]
        if len(items) != len(set(items)):
            yield jsonschema.ValidationError("duplicate entries in a list-type set")


KubernetesValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-map-keys": _list_map_keys, "x-kubernetes-list-type": _list_type})


@functools.lru_cache(maxsize=None)
def crd(filename: str) -> dict:
    return load(CRDS / filename)


def served_schema(crd_doc: dict, version: str) -> dict:
    served = [v for v in crd_doc["spec"]["versions"] if v["name"] == version and v.get("served")]
    assert served, f"{crd_doc['metadata']['name']} does not serve {version}"
    return served[0]["schema"]["openAPIV3Schema"]


@functools.lru_cache(maxsize=None)
def _validator(filename: str, version: str):
    schema = kubernetes_schema(served_schema(crd(filename), version))
    KubernetesValidator.check_schema(schema)
    return KubernetesValidator(schema)


def manifest_errors(doc: dict, filename: str) -> list[str]:
    """Everything the API server's schema validation would reject in `doc` (empty: valid)."""
    spec = crd(filename)["spec"]
    group, _, version = doc.get("apiVersion", "").partition("/")
    if group != spec["group"] or doc.get("kind") != spec["names"]["kind"]:
        return [f"{doc.get('apiVersion')} {doc.get('kind')} is not a {spec['group']} {spec['names']['kind']}"]
    name = doc.get("metadata", {}).get("name", "")
    errors = [] if re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63 else \
        [f"metadata.name {name!r} is not a DNS-1123 label"]
    found = _validator(filename, version).iter_errors(doc)
    return errors + [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in found]


def _rule_paths(schema, path=()):
    """Property paths ('*' for list items) of the schema nodes that carry CEL rules."""
    if schema.get("x-kubernetes-validations"):
        yield path
    for name, sub in schema.get("properties", {}).items():
        yield from _rule_paths(sub, path + (name,))
    if isinstance(schema.get("items"), dict):
        yield from _rule_paths(schema["items"], path + ("*",))
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _rule_paths(schema["additionalProperties"], path + ("*",))


def _present(doc, path) -> bool:
    if not path:
        return True
    head, rest = path[0], path[1:]
    if head == "*":
        values = doc if isinstance(doc, list) else list(doc.values()) if isinstance(doc, dict) else []
        return any(_present(v, rest) for v in values)
    return isinstance(doc, dict) and head in doc and _present(doc[head], rest)


MANIFESTS = [(RAYCLUSTER, "ray.io_rayclusters.yaml"), (RAYJOB, "ray.io_rayjobs.yaml")]


@pytest.mark.parametrize("path, crd_file", MANIFESTS, ids=["raycluster", "rayjob"])
def test_kuberay_manifest_is_valid_against_the_crd(path, crd_file):
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert manifest_errors(doc, crd_file) == []
    # CEL rules are not evaluated above: make sure none could apply.
    schema = served_schema(crd(crd_file), "v1")
    assert [p for p in _rule_paths(schema) if _present(doc, p)] == []


def test_kuberay_manifests_have_the_autoscaling_shape():
    cluster, job = load(RAYCLUSTER), load(RAYJOB)
    spec = cluster["spec"]
    assert job["spec"]["rayClusterSpec"] == spec             # the RayJob runs the same cluster
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for pod in [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]:
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    groups = spec["workerGroupSpecs"]
    assert groups and all(g["minReplicas"] == 0 and g.get("replicas", 0) == 0 for g in groups)
    assert all(c["resources"]["limits"].get("nvidia.com/gpu") for g in groups for c in g["template"]["spec"]["containers"])
    assert job["spec"]["entrypoint"].startswith("python -m pad_ray.sweep sweeps/cifar10.yaml")
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def _break_misspelt(doc):
    group = _cluster_spec(doc)["workerGroupSpecs"][0]
    group["minReplica"] = group.pop("minReplicas")
    return "'minReplica' was unexpected"


def _break_type(doc):
    _cluster_spec(doc)["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    return "maxReplicas: 'eight' is not of type 'integer'"


def _break_enum(doc):
    _cluster_spec(doc)["authOptions"]["mode"] = "tokens"
    return "authOptions.mode: 'tokens' is not one of"


def _break_required(doc):
    del _cluster_spec(doc)["headGroupSpec"]
    return "'headGroupSpec' is a required property"


def _break_quantity(doc):
    _cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = [16]
    return "limits.cpu: [16] is not valid"


def _break_duplicate_volume(doc):
    volumes = _cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["volumes"]
    volumes.append(copy.deepcopy(volumes[0]))
    return "volumes: duplicate entry for list-map keys ['name']"


def _break_container_field(doc):
    container = _cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["environment"] = container.pop("env")
    return "'environment' was unexpected"


def _cluster_spec(doc):
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


@pytest.mark.parametrize("path, crd_file", MANIFESTS, ids=["raycluster", "rayjob"])
@pytest.mark.parametrize("breakage", [_break_misspelt, _break_type, _break_enum, _break_required, _break_quantity,
                                      _break_duplicate_volume, _break_container_field])
def test_a_broken_kuberay_manifest_fails(path, crd_file, breakage):
    doc = load(path)
    expected = breakage(doc)
    errors = manifest_errors(doc, crd_file)
    assert any(expected in e for e in errors), errors


def test_a_broken_rayjob_fails():
    doc = load(RAYJOB)
    doc["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert manifest_errors(doc, "ray.io_rayjobs.yaml")
    doc = load(RAYJOB)
    doc["spec"]["entryPoint"] = doc["spec"].pop("entrypoint")
    assert manifest_errors(doc, "ray.io_rayjobs.yaml")
    doc = load(RAYJOB)
    doc["kind"] = "RayCluster"
    assert manifest_errors(doc, "ray.io_rayjobs.yaml")


# -- security of the shipped configs --------------------------------------------------------------------------

SECRET_NAME = re.compile(r"(token|passw|secret|credential|access_key|api_key|private_key)", re.I)
SECRET_TEXT = [
    re.compile(r"AKIA[0-9A-Z]{16}"),                                   # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)(RAY_AUTH_TOKEN|MLFLOW_TRACKING_PASSWORD|AWS_SECRET_ACCESS_KEY)\s*[=:]\s*[\"']?[^\s\"'$<{]"),
    re.compile(r"(?i)--(token|password)[= ]+[^\s$<{]"),
    re.compile(r"://[^/\s:@]+:[^/\s@$<{]+@"),                            # credentials inside a URI
]


def _walk(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, path + (str(key),))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, path + (str(index),))
    else:
        yield path, node


def _high_entropy(text: str) -> list[str]:
    """Long random-looking words (keys, tokens): letters and digits mixed, many distinct characters."""
    words = re.findall(r"[A-Za-z0-9+/_-]{24,}={0,2}", text)
    return [w for w in words if re.search(r"[a-z]", w) and re.search(r"\d", w) and len(set(w)) >= 16
            and "/" not in w.strip("/")]


@pytest.mark.parametrize("path", [AWS, RAYCLUSTER, RAYJOB, DOCKERFILE, CLUSTER / "README.md"], ids=lambda p: p.name)
def test_no_literal_secrets(path):
    text = path.read_text()
    assert [p.pattern for p in SECRET_TEXT if p.search(text)] == []
    assert _high_entropy(text) == []
    if path.suffix == ".yaml":
        doc = load(path)
        # No value under a secret-looking key, except a reference to a Secret or a file.
        for where, value in _walk(doc):
            leaf = where[-1] if where else ""
            if SECRET_NAME.search(leaf) and isinstance(value, str):
                assert leaf in ("secretName",) or value.startswith("~/"), f"{'.'.join(where)} = {value!r}"
        # Kubernetes env: secret-looking variables only from Secrets.
        for where, value in _walk(doc):
            if where[-1:] == ("name",) and len(where) > 2 and where[-3] == "env" and SECRET_NAME.search(value):
                env = _at(doc, where[:-1])
                assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), f"{value} is not from a Secret"


def _at(doc, path):
    for part in path:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def _start_commands(config):
    return [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]


def test_aws_token_auth_and_loopback_only():
    config = load(AWS)
    text = AWS.read_text()
    starts = _start_commands(config)
    assert len(starts) >= 2
    for command in starts:  # RAY_AUTH_MODE=token in the environment of every `ray start`
        before = command.split("ray start")[0]
        assert re.search(r"\bRAY_AUTH_MODE=token\b", before), command
    assert "RAY_AUTH_MODE=disabled" not in text
    # The token file travels as a file mount from the user's machine; no token value in the YAML.
    assert any(Path(src).name == "auth_token" for src in config["file_mounts"].values())

    head = " ".join(config["head_start_ray_commands"])
    hosts = re.findall(r"--dashboard-host[= ](\S+)", head)
    assert hosts and all(ipaddress.ip_address(h).is_loopback for h in hosts)
    mlflow = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert mlflow, "the head starts an MLflow tracking server"
    for command in mlflow:
        words = shlex.split(command.replace("&&", " ").replace("&", " "))
        host = words[words.index("--host") + 1]
        assert ipaddress.ip_address(host).is_loopback, command
        assert "--serve-artifacts" in words
    assert "0.0.0.0" not in text
    run_options = " ".join(config["docker"].get("run_options", []) + config["docker"].get("head_run_options", []))
    assert not re.search(r"(^|\s)(-p|--publish)(\s|=)", run_options)   # no published ports
    assert "--shm-size" in run_options                                 # the object store lives in /dev/shm
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:" in head


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_token_auth_and_cluster_internal_services(path):
    doc = load(path)
    spec = _cluster_spec(doc)
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    dashboard = ipaddress.ip_address(head["rayStartParams"].get("dashboard-host", "0.0.0.0"))
    # 0.0.0.0 inside the pod is the pod network only: acceptable because nothing above exposes it.
    assert dashboard.is_loopback or dashboard.is_private or dashboard.is_unspecified
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        assert not pod.get("hostNetwork", False)
        for container in pod["containers"]:
            assert all("hostPort" not in port for port in container.get("ports", []))
            assert all(e.get("value") != "disabled" for e in container.get("env", []) if e["name"] == "RAY_AUTH_MODE")
    text = path.read_text()
    assert "LoadBalancer" not in text and "NodePort" not in text


def test_one_image_everywhere_built_by_the_dockerfile():
    import ray

    dockerfile = DOCKERFILE.read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-")          # the Ray version the tests run
    assert re.search(r"pip install[^\n]*\btorch\b", dockerfile) and "torchvision" in dockerfile
    assert re.search(r"pip install[^\n]* \.(\s|$)", dockerfile)           # pad_ray itself
    built = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", dockerfile).group(1)
    aws = load(AWS)["docker"]["image"]
    cluster = load(RAYCLUSTER)["spec"]
    kube = {c["image"] for pod in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
            for c in pod["template"]["spec"]["containers"]}
    assert {aws} == kube == {built}
    assert cluster["rayVersion"] == ray.__version__


def test_readme_covers_launch_submit_watch_teardown():
    text = (CLUSTER / "README.md").read_text()
    for needle in ["ray up cluster/aws.yaml", "ray down cluster/aws.yaml", "kubectl apply -f cluster/",
                   "kubectl delete", "ray job submit --working-dir . -- python -m pad_ray.sweep sweeps/cifar10.yaml",
                   "RAY_AUTH_MODE=token", "ray dashboard", "port-forward", "PAD_RAY_DATA", "PAD_RAY_HOME",
                   "PAD_RAY_STORE", "PAD_RAY_STORAGE", "MLFLOW_TRACKING_URI", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
                   "GPU-hours", "docker build"]:
        assert needle in text, needle


# -- autoscaling on this machine: Ray's fake multi-node provider ----------------------------------------------

IDLE_TIMEOUT_S = 15
MAX_GPU_WORKERS = 2

WATCH_NODES = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
with open(sys.argv[2], "a") as out:
    while True:
        nodes = [{"id": n["NodeID"], "alive": n["Alive"], "gpu": n["Resources"].get("GPU", 0)} for n in ray.nodes()]
        out.write(json.dumps({"t": time.time(), "nodes": nodes}) + "\\n")
        out.flush()
        time.sleep(0.5)
"""

PLACEMENTS = """
import json, sys
from ray.util.state import list_actors, list_tasks
kw = dict(address=sys.argv[1], detail=True, limit=10000, raise_on_missing_output=False)
print(json.dumps({
    "actors": [{"class_name": a.class_name, "node_id": a.node_id} for a in list_actors(**kw)],
    "tasks": [{"name": t.name, "node_id": t.node_id} for t in list_tasks(filters=[("name", "=", "_el2n_task")], **kw)],
}))
"""


class SeparateDisksFakeProvider(FakeMultiNodeProvider):
    """Ray's fake multi-node provider, except that each fake node unpacks job working dirs into a directory of
    its own, as a real node does on its own disk. Otherwise all nodes share the head's, and every node that
    joins re-extracts the job's working dir under the running driver and trials (their cwd vanishes).
    Loaded by the autoscaler process as `provider: {type: external, module: test_cluster....}`."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        from ray._private import parameter

        original = parameter.RayParams.__init__

        def own_runtime_dir(params, *args, **kwargs):
            node = kwargs.get("env_vars", {}).get("RAY_OVERRIDE_NODE_ID_FOR_TESTING", "")
            kwargs.setdefault("runtime_env_dir_name", f"runtime_resources_{node[-5:]}")
            original(params, *args, **kwargs)

        parameter.RayParams.__init__ = own_runtime_dir
        try:
            super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
        finally:
            parameter.RayParams.__init__ = original


def fake_cluster_config(gcs_address: str) -> dict:
    """The whole autoscaling config (the wheel has no fake_multi_node/example.yaml to fill defaults from): a head
    with no CPUs and a worker type with one fake GPU, as aws.yaml has them."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID, FAKE_HEAD_NODE_TYPE

    return {
        "cluster_name": "pad-ray-fake",
        "max_workers": MAX_GPU_WORKERS,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_S / 60,   # autoscaler v1 (what `ray start` runs): global only
        "provider": {"type": "external", "module": f"{__name__}.{SeparateDisksFakeProvider.__name__}",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "head_node_id": FAKE_HEAD_NODE_ID,
                     "gcs_address": gcs_address},
        "auth": {},
        "available_node_types": {
            FAKE_HEAD_NODE_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "min_workers": 0, "max_workers": 0},
            "gpu_1x": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
                       "max_workers": MAX_GPU_WORKERS},
        },
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def gpu_sweep(home: Path) -> Path:
    """sweeps/smoke.yaml with one GPU per trial, one expert set, 4 light trials."""
    sweep = light_smoke_sweep()   # ${PAD_RAY_*} stay for the job to expand
    sweep["name"] = "autoscale"
    sweep["space"] = {"alpha": [0.0, 0.1, 0.2, 0.3], "ir": [0.75]}
    sweep["base"]["distill"].update(iterations=8, eval_every=4)
    sweep["trial_resources"] = {"cpu": 1, "gpu": 1}
    path = home.parent / "autoscale.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def _alive_workers(record: dict, head: str) -> set[str]:
    return {n["id"] for n in record["nodes"] if n["alive"] and n["id"] != head}


@pytest.mark.slow
def test_gpu_workers_scale_up_for_a_submitted_sweep_and_back_down(tmp_path, mnist_root):
    import ray
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
    from ray.autoscaler._private.util import validate_config

    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    ip = ray.util.get_node_ip_address()
    # Free ports and a temp dir of its own: no other cluster on this machine is joined, or stopped.
    gcs_port, dashboard_port, client_port, agent_port = free_ports(4)
    cluster = RayCluster(Path(tempfile.mkdtemp(prefix="ray", dir="/tmp")), address=f"{ip}:{gcs_port}")
    config = fake_cluster_config(cluster.address)
    validate_config(config)
    config_path = tmp_path / "autoscaling.yaml"
    config_path.write_text(yaml.safe_dump(config))
    token = tmp_path / "auth_token"                  # token auth, the token from the environment
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    home = tmp_path / "home"
    sweep = gpu_sweep(home)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_enable_autoscaler_v2"))}
    env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}", "RAY_TMPDIR": str(cluster.temp_dir),
                "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",
                "PAD_RAY_HOME": str(home), "PAD_RAY_DATA": str(mnist_root),
                # The fake GPU nodes report a GPU that torch here cannot use; without this, trials, Train
                # workers and EL2N tasks would fail on them (as they must on a real node with a broken driver).
                "PAD_RAY_FAKE_GPUS": "1"})
    # The autoscaler imports SeparateDisksFakeProvider from this file.
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(Path(__file__).parent), env.get("PYTHONPATH")] if p)
    nodes_log = tmp_path / "nodes.jsonl"
    watcher = None
    try:
        start = subprocess.run(
            [ray_bin, "start", "--head", f"--port={gcs_port}", "--num-cpus=0", "--num-gpus=0",
             f"--autoscaling-config={config_path}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={client_port}",
             f"--dashboard-agent-listen-port={agent_port}", f"--temp-dir={cluster.temp_dir}", "--disable-usage-stats"],
            capture_output=True, text=True, timeout=180, env=env)
        assert start.returncode == 0, start.stderr[-3000:]
        watcher = subprocess.Popen([sys.executable, "-c", WATCH_NODES, cluster.address, str(nodes_log)],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(lambda: _records(nodes_log), 120, "the node watcher never connected")
        assert _alive_workers(_records(nodes_log)[-1], FAKE_HEAD_NODE_ID) == set()  # min_workers 0: no GPUs yet
        wait_for_job_agent(cluster.address, env)

        submitted = time.time()
        job = subprocess.run([ray_bin, "job", "submit", "--working-dir", str(REPO), "--", "python", "-m",
                              "pad_ray.sweep", str(sweep)], capture_output=True, text=True, timeout=1200, env=env)
        finished = time.time()
        output = job.stdout + job.stderr
        assert job.returncode == 0 and "succeeded" in output, output[-4000:]

        # Scale-up: GPU nodes joined while the sweep ran, as many as it could use, never more than allowed.
        during = [r for r in _records(nodes_log) if submitted <= r["t"] <= finished]
        peak = max(len(_alive_workers(r, FAKE_HEAD_NODE_ID)) for r in during)
        assert peak == MAX_GPU_WORKERS, f"at most {peak} GPU worker nodes were alive during the sweep"
        workers = {n["id"] for r in during for n in r["nodes"] if n["id"] != FAKE_HEAD_NODE_ID}
        # A node that went idle mid-sweep and was removed is listed dead, with no resources: only live ones count.
        assert all(n["gpu"] == 1 for r in during for n in r["nodes"] if n["id"] in workers and n["alive"])

        # Where the work ran: every trial, Train worker and EL2N task on a GPU worker node, none on the head.
        placed = subprocess.run([sys.executable, "-c", PLACEMENTS, f"http://127.0.0.1:{dashboard_port}"],
                                capture_output=True, text=True, timeout=120, env=env)
        assert placed.returncode == 0, placed.stderr[-3000:]
        placements = json.loads(placed.stdout.strip().splitlines()[-1])
        # Ray names function trainables `ImplicitFunc` or `wrap_function.<locals>.ImplicitFunc`. Trials reuse
        # actors (reuse_actors), so each actor ran one or more of the 4 trials: all of them on GPU nodes.
        trials = [a for a in placements["actors"] if a["class_name"].endswith("ImplicitFunc")]
        train_workers = [a for a in placements["actors"] if a["class_name"].endswith("RayTrainWorker")]
        assert trials and len(train_workers) >= 2 and placements["tasks"], placements
        assert {p["node_id"] for p in trials + train_workers + placements["tasks"]} <= workers

        # Scale-down: idle GPU nodes go away after the idle timeout.
        _wait_for(lambda: _records(nodes_log) and not _alive_workers(_records(nodes_log)[-1], FAKE_HEAD_NODE_ID),
                  IDLE_TIMEOUT_S + 180, "GPU worker nodes still alive long after the sweep ended")
    finally:
        try:
            if watcher is not None:
                watcher.kill()
                watcher.wait(timeout=30)
        finally:
            left = cluster.stop()  # this cluster's processes only (`ray stop` would stop every cluster here)
    assert not left, f"Ray processes of this test still running after it: {left}"

    # The sweep itself: every trial in MLflow under PAD_RAY_HOME, the results table written.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    experiment = client.get_experiment_by_name("autoscale")
    runs = client.search_runs([experiment.experiment_id])
    assert len([r for r in runs if "trial_id" in r.data.tags]) == 4
    assert (home / "sweeps" / "autoscale" / "results.csv").is_file()


def _wait_for(condition, timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.5)
