"""Offline checks of cluster/: the Ray cluster launcher YAMLs, the KubeRay manifests, their image
and the README that drives them. No cloud calls and no Ray cluster; a few seconds in all.

    python -m pytest tests/unit/test_cluster_configs.py -q

What is checked:
- launcher YAMLs against the cluster schema the installed Ray ships
  (ray/autoscaler/ray-schema.json), then `validate_config(prepare_config(cfg))` as `ray up` does,
  plus what the schema cannot see (defaults merged in silently, node types, install commands,
  token auth, fields that must agree within one file);
- KubeRay manifests for the fields KubeRay requires and rejects (ray.io/v1, RayJob/RayService,
  headGroupSpec/workerGroupSpecs, rayStartParams, autoscaling, containers with resources), their pod
  templates against the official Kubernetes client's API types, and their serveConfigV2 against Ray
  Serve's own schema;
- every repository path and import path any of these files names exists, and the fine-tune
  command lines use only the flags pipelines/finetune.py defines.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
DOCKERFILE = KUBERAY / "Dockerfile"
README = CLUSTER / "README.md"

# file -> (provider type, GPU worker machine type, GPUs per GPU node)
LAUNCHER = {
    "aws-a100.yaml": ("aws", "p4d.24xlarge", 8),
    "aws-h100.yaml": ("aws", "p5.48xlarge", 8),
    "gcp-h100.yaml": ("gcp", "a3-highgpu-8g", 8),
}
KUBERAY_MANIFESTS = {"rayjob-finetune.yaml": "RayJob", "rayservice-serve.yaml": "RayService"}

# The command-line contract of pipelines/finetune.py (a public interface).
FINETUNE = "pipelines/finetune.py"
FINETUNE_FLAGS = {
    "--config", "--model", "--data", "--output", "--storage-path",
    "--num-workers", "--use-gpu", "--max-steps", "--resume",
}
SERVE_IMPORT_PATH = "serve.app:build_app"
GPU_SERVE_CONFIG = "serve/config.gpu.yaml"
SHARED_STORAGE = ("s3://", "gs://")

# Fields of the KubeRay v1 types these manifests may use (KubeRay 1.6 CRDs); a typo in a field
# name is otherwise dropped silently by a lenient apply, or rejected only on the cluster.
KUBERAY_CLUSTER_KEYS = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "headServiceAnnotations", "managedBy", "rayVersion", "suspend",
    "upgradeStrategy", "workerGroupSpecs",
}
KUBERAY_HEAD_KEYS = {
    "enableIngress", "headService", "labels", "rayStartParams", "resources", "serviceType",
    "template",
}
KUBERAY_WORKER_KEYS = {
    "groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts",
    "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template",
}
KUBERAY_AUTOSCALER_KEYS = {
    "env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy", "resources",
    "securityContext", "upscalingMode", "version", "volumeMounts",
}
KUBERAY_SPEC_KEYS = {
    "RayJob": {
        "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy",
        "entrypoint", "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId",
        "managedBy", "metadata", "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML",
        "shutdownAfterJobFinishes", "submissionMode", "submitterConfig", "submitterPodTemplate",
        "suspend", "ttlSecondsAfterFinished",
    },
    "RayService": {
        "deploymentUnhealthySecondThreshold", "excludeHeadPodFromServeSvc", "managedBy",
        "rayClusterConfig", "rayClusterDeletionDelaySeconds", "serveConfigV2", "serveService",
        "serviceUnhealthySecondThreshold", "upgradeStrategy",
    },
}
CLUSTER_SPEC_FIELD = {"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
MAX_KUBERAY_NAME = 47  # RayJob/RayService names: 53 (RayCluster) - 6, DNS-1035 labels

# A repository path named in a config or doc: a top-level folder of this repo, then a file with
# a known extension (or a Dockerfile). Not preceded by "/", "~" or a word character, so remote
# paths (s3://bucket/serve/x.yaml, /home/ray/fdllm/serve/x.yaml, ~/fdllm-src/...) never match.
REPO_PATH_RE = re.compile(
    r"(?<![\w.~/-])(?:\./)?"
    r"((?:pipelines|serve|cluster|fdllm|tests)/[\w./-]*"
    r"(?:\.(?:py|ya?ml|json|toml|md|txt|sh)|Dockerfile))\b"
)
PY_COMMAND_RE = re.compile(r"\bpython3?\s+(?:\./)?(pipelines/\w+\.py)([^\n;&|#]*)")


# ---------------------------------------------------------------------------------------------
# loading


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _launcher(name: str) -> dict:
    return _load(CLUSTER / name)


def _manifest(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]
    assert len(docs) == 1, f"{name}: expected one document, got {len(docs)}"
    return docs[0]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _scanned_files() -> list[Path]:
    """Every file of cluster/ whose text may name repository paths or commands."""
    files = sorted(CLUSTER.glob("*.yaml")) + sorted(KUBERAY.glob("*.yaml"))
    return files + [p for p in (README, DOCKERFILE) if p.exists()]


def _command_text(path: Path) -> str:
    """The text of a file where commands live, with shell line continuations joined.

    YAML: its parsed string values (a `>-` block is one line; nested YAML strings such as
    serveConfigV2 stay line by line). Markdown: its fenced code blocks, not the prose.
    """
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        text = "\n".join(_string_leaves(list(yaml.safe_load_all(text))))
    elif path.suffix == ".md":
        text = "\n".join(re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S))
    return re.sub(r"\\\n\s*", " ", text)


def _string_leaves(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _string_leaves(key)
            yield from _string_leaves(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from _string_leaves(item)


def _referenced_paths() -> dict[str, list[str]]:
    """Repository path -> the cluster/ files that name it."""
    found: dict[str, set[str]] = {}
    for path in _scanned_files():
        for match in REPO_PATH_RE.finditer(path.read_text()):
            found.setdefault(match.group(1), set()).add(str(path.relative_to(REPO)))
    return {p: sorted(files) for p, files in sorted(found.items())}


def _serve_configs() -> list[tuple[str, dict]]:
    """(origin, parsed Serve config) for every serveConfigV2 in the KubeRay manifests."""
    out = []
    for name, kind in KUBERAY_MANIFESTS.items():
        if kind == "RayService":
            out.append((name, yaml.safe_load(_manifest(name)["spec"]["serveConfigV2"])))
    return out


def _import_paths() -> list[str]:
    paths = {app["import_path"] for _, cfg in _serve_configs() for app in cfg["applications"]}
    return sorted(paths)


def _finetune_commands() -> list[tuple[str, list[str]]]:
    """(origin, [script, *arguments]) of every `python pipelines/...py` command in cluster/."""
    out = []
    for path in _scanned_files():
        for match in PY_COMMAND_RE.finditer(_command_text(path)):
            script, rest = match.group(1), match.group(2)
            out.append((f"{path.relative_to(REPO)}: {script}", [script, *shlex.split(rest)]))
    return out


def _flags(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _ray_schema() -> dict:
    autoscaler = pytest.importorskip("ray.autoscaler")
    return json.loads((Path(autoscaler.__file__).parent / "ray-schema.json").read_text())


def _gpu_node_types(cfg: dict) -> dict[str, dict]:
    return {
        name: nt for name, nt in cfg["available_node_types"].items()
        if nt.get("resources", {}).get("GPU", 0) > 0
    }


def _commands(cfg: dict, key: str) -> str:
    return "\n".join(cfg.get(key, []))


def _boot_image(node_config: dict) -> str:
    """The image a launcher node type boots: an AWS ImageId or a GCP boot disk's sourceImage."""
    if "ImageId" in node_config:
        return node_config["ImageId"]
    (boot,) = [d for d in node_config["disks"] if d.get("boot")]
    return boot["initializeParams"]["sourceImage"]


# ---------------------------------------------------------------------------------------------
# the set of files


class _NoRepeatedKeys(yaml.SafeLoader):
    """PyYAML, Ray and Serve keep the last of two equal keys without a word; here a repeat is an error."""


def _mapping_without_repeats(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"repeated key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_NoRepeatedKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def test_no_yaml_repeats_a_key():
    """Every YAML file of the repository and the Serve configs embedded in the KubeRay manifests: a
    merge once left two `engine:` blocks in the GPU Serve config, and the second silently won."""
    listed = subprocess.run(["git", "ls-files", "*.yaml", "*.yml"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.split()
    assert GPU_SERVE_CONFIG in listed
    for name in listed:
        list(yaml.load_all((REPO / name).read_text(), Loader=_NoRepeatedKeys))
    for name in KUBERAY_MANIFESTS:
        for doc in yaml.load_all((KUBERAY / name).read_text(), Loader=_NoRepeatedKeys):
            if "serveConfigV2" in (doc or {}).get("spec", {}):
                yaml.load(doc["spec"]["serveConfigV2"], Loader=_NoRepeatedKeys)


def test_cluster_folder_has_the_expected_files():
    assert sorted(p.name for p in CLUSTER.glob("*.yaml")) == sorted(LAUNCHER)
    assert sorted(p.name for p in KUBERAY.glob("*.yaml")) == sorted(KUBERAY_MANIFESTS)
    assert DOCKERFILE.is_file() and README.is_file()


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher YAMLs


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_yaml_matches_ray_schema(name):
    jsonschema = pytest.importorskip("jsonschema")
    # The raw file first: the schema forbids unknown top-level keys, so typos fail here.
    jsonschema.validate(_launcher(name), _ray_schema())


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_yaml_passes_ray_up_validation(name):
    pytest.importorskip("jsonschema")
    util = pytest.importorskip("ray.autoscaler._private.util")
    # What `ray up` does: merge the provider's defaults, then validate. validate_config on the raw
    # file would fail on a missing `cluster_synced_files` with a misleading "Ray version" message.
    # prepare_config is not idempotent (it prepends setup_commands again), hence the copy.
    prepared = util.prepare_config(copy.deepcopy(_launcher(name)))
    util.validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_yaml_sets_every_default_list(name):
    providers = pytest.importorskip("ray.autoscaler._private.providers")
    util = pytest.importorskip("ray.autoscaler._private.util")
    cfg = _launcher(name)
    # prepare_config merges the provider's defaults.yaml key by key: any list left out (setup
    # commands, start commands, rsync filters) is inherited silently, e.g. a nightly Ray wheel.
    defaults = providers._get_default_config(cfg["provider"])
    missing = sorted(k for k, v in defaults.items() if isinstance(v, list) and k not in cfg)
    assert not missing, f"{name} inherits Ray's default {missing}"
    prepared = util.prepare_config(copy.deepcopy(cfg))
    everything = json.dumps(prepared)
    assert "ray-wheels" not in everything and "dev0" not in everything


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_node_types(name):
    provider, machine_type, gpus = LAUNCHER[name]
    cfg = _launcher(name)
    assert cfg["provider"]["type"] == provider
    assert cfg["idle_timeout_minutes"] > 0
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    assert head["resources"].get("CPU") == 0, "nothing but Ray's own processes on the head"

    gpu_types = _gpu_node_types(cfg)
    assert gpu_types, f"{name} has no GPU worker node type"
    machine_key = "InstanceType" if provider == "aws" else "machineType"
    for type_name, nt in gpu_types.items():
        assert nt["node_config"][machine_key] == machine_type, type_name
        assert nt["resources"]["GPU"] == gpus, type_name
        assert 0 <= nt["min_workers"] <= nt["max_workers"] <= cfg["max_workers"], type_name
    assert sum(nt.get("min_workers", 0) for nt in types.values()) <= cfg["max_workers"]

    # Ray refuses a node whose Python differs from the head's, to the patch level: one image.
    images = {_boot_image(nt["node_config"]) for nt in types.values()}
    assert len(images) == 1, f"{name}: head and workers must boot the same image, got {images}"


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_installs_this_package(name):
    cfg = _launcher(name)
    extras = set(_pyproject()["project"]["optional-dependencies"])
    # The checkout is file-mounted from the directory `ray up` runs in, and installed from there.
    mounts = cfg["file_mounts"]
    checkout = next(remote for remote, local in mounts.items() if local == ".")
    # `ray start` runs in ~, which Ray puts on the import path of every Serve app and replica: a checkout
    # there under an importable name (~/fdllm) is imported as an empty namespace package, not the install
    assert not Path(checkout).name.isidentifier(), f"{name}: the checkout at {checkout} shadows a package in ~"
    for key, wanted in (("head_setup_commands", {"train", "serve"}),
                        ("worker_setup_commands", {"train", "serve", "gpu"})):
        commands = _commands(cfg, key)
        install_re = r"cd (\S+) && .*?pip install .*?-e \"\.\[([\w,]+)\]\""
        installs = re.findall(install_re, commands, re.S)
        assert installs, f"{name}: {key} does not `pip install -e .[...]` the checkout"
        for where, extra_list in installs:
            assert where == checkout, f"{name}: {key} installs from {where}, mounted at {checkout}"
            used = set(extra_list.split(","))
            assert used == wanted, f"{name}: {key} installs extras {used}, want {wanted}"
            assert used <= extras, f"{name}: extras {used - extras} are not in pyproject.toml"
    assert "torch==" in _commands(cfg, "worker_setup_commands"), "GPU nodes pin torch"


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_uses_token_auth(name):
    cfg = _launcher(name)
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token ray start" in _commands(cfg, key), f"{name}: {key}"
    assert "export RAY_AUTH_MODE=token" in _commands(cfg, "setup_commands")


def test_gcp_fields_agree():
    cfg = _launcher("gcp-h100.yaml")
    project, zone = cfg["provider"]["project_id"], cfg["provider"]["availability_zone"]
    assert zone.startswith(cfg["provider"]["region"] + "-")
    for name, nt in cfg["available_node_types"].items():
        for disk in nt["node_config"]["disks"]:
            disk_type = disk["initializeParams"]["diskType"]
            assert disk_type.startswith(f"zones/{zone}/"), f"{name}: {disk_type} is not in {zone}"
    for name, nt in _gpu_node_types(cfg).items():
        assert nt["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE", name
        for account in nt["node_config"]["serviceAccounts"]:
            assert account["email"].endswith(f"@{project}.iam.gserviceaccount.com"), name


@pytest.mark.parametrize("name", sorted(n for n, v in LAUNCHER.items() if v[0] == "aws"))
def test_aws_gpu_workers_can_write_the_bucket(name):
    for type_name, nt in _gpu_node_types(_launcher(name)).items():
        arn = nt["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), type_name


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_metadata_names_the_cluster_commands(name):
    cfg = _launcher(name)
    argv = shlex.split(cfg["metadata"]["finetune_entrypoint"])
    assert argv[:2] == ["python", FINETUNE]
    assert "--use-gpu" in argv
    assert _flag_value(argv, "--storage-path").startswith(SHARED_STORAGE)
    gpu_types = _gpu_node_types(cfg).values()
    max_gpus = sum(nt["max_workers"] * nt["resources"]["GPU"] for nt in gpu_types)
    assert 0 < int(_flag_value(argv, "--num-workers")) <= max_gpus
    assert cfg["metadata"]["serve_config"] == GPU_SERVE_CONFIG


# ---------------------------------------------------------------------------------------------
# KubeRay manifests


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"][CLUSTER_SPEC_FIELD[doc["kind"]]]


def _containers(spec: dict):
    yield "head", spec["headGroupSpec"]["template"]["spec"]["containers"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]["containers"]


def _gpus(container: dict) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def _group_gpus(group: dict) -> int:
    """GPUs of one pod of a worker group (its Ray container is the first one)."""
    return _gpus(group["template"]["spec"]["containers"][0])


def _max_gpus(spec: dict) -> int:
    """GPUs of a KubeRay cluster scaled to every group's maxReplicas."""
    return sum(g["maxReplicas"] * _group_gpus(g) for g in spec["workerGroupSpecs"])


@pytest.mark.parametrize("name", sorted(KUBERAY_MANIFESTS))
def test_kuberay_manifest_kind_and_fields(name):
    doc = _manifest(name)
    kind = KUBERAY_MANIFESTS[name]
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    meta_name = doc["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", meta_name), meta_name
    assert len(meta_name) <= MAX_KUBERAY_NAME, meta_name
    assert set(doc["spec"]) <= KUBERAY_SPEC_KEYS[kind], set(doc["spec"]) - KUBERAY_SPEC_KEYS[kind]
    spec = _cluster_spec(doc)
    assert set(spec) <= KUBERAY_CLUSTER_KEYS, set(spec) - KUBERAY_CLUSTER_KEYS
    assert set(spec["headGroupSpec"]) <= KUBERAY_HEAD_KEYS
    assert set(spec["autoscalerOptions"]) <= KUBERAY_AUTOSCALER_KEYS
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= KUBERAY_WORKER_KEYS, set(group) - KUBERAY_WORKER_KEYS


def _unknown_fields(value, type_name: str, path: str) -> list[str]:
    """Paths in `value` that the Kubernetes type `type_name` has no field for, by the official client's
    models (`kubernetes.client.V1PodSpec.attribute_map`...): an independent oracle of the API."""
    import kubernetes.client as k8s

    if type_name.startswith(("List[", "list[")):
        return [bad for i, item in enumerate(value) for bad in _unknown_fields(item, type_name[5:-1], f"{path}[{i}]")]
    model = getattr(k8s, type_name, None)
    if model is None or not isinstance(value, dict):  # a scalar, a map (Dict[str, str]), IntOrString, Quantity
        return []
    fields = {json_name: name for name, json_name in model.attribute_map.items()}
    return [bad for key, item in value.items()
            for bad in ([f"{path}.{key}"] if key not in fields else
                        _unknown_fields(item, model.openapi_types[fields[key]], f"{path}.{key}"))]


@pytest.mark.parametrize("name", sorted(KUBERAY_MANIFESTS))
def test_kuberay_pod_templates_hold_only_kubernetes_fields(name):
    """KubeRay passes the groups' pod templates to Kubernetes: a misspelt field there (`mountPth`,
    `efect`, `medum`) is dropped by a lenient apply, so the volume is never mounted or the taint never
    tolerated. Checked against the official client's types, every level down."""
    spec = _cluster_spec(_manifest(name))
    groups = [("headGroupSpec", spec["headGroupSpec"])] + [
        (f"workerGroupSpecs[{group['groupName']}]", group) for group in spec["workerGroupSpecs"]]
    for where, group in groups:
        assert _unknown_fields(group["template"], "V1PodTemplateSpec", f"{where}.template") == []
    # the autoscaler sidecar's Kubernetes-typed fields (KubeRay's AutoscalerOptions)
    typed = {"resources": "V1ResourceRequirements", "env": "List[V1EnvVar]", "envFrom": "List[V1EnvFromSource]",
             "volumeMounts": "List[V1VolumeMount]", "securityContext": "V1SecurityContext"}
    for key, value in spec["autoscalerOptions"].items():
        assert _unknown_fields(value, typed.get(key, ""), f"autoscalerOptions.{key}") == []


@pytest.mark.parametrize("name", sorted(KUBERAY_MANIFESTS))
def test_kuberay_cluster_autoscales_gpu_workers(name):
    spec = _cluster_spec(_manifest(name))
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] >= 0
    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    for group in groups:
        replicas = group.get("replicas", group["minReplicas"])
        assert 0 <= group["minReplicas"] <= replicas <= group["maxReplicas"], group["groupName"]
        assert group["maxReplicas"] > group["minReplicas"], f"{group['groupName']} cannot scale"
    assert any(_group_gpus(g) > 0 for g in groups)


@pytest.mark.parametrize("name", sorted(KUBERAY_MANIFESTS))
def test_kuberay_ray_start_params_and_resources(name):
    spec = _cluster_spec(_manifest(name))
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        params = group["rayStartParams"]  # KubeRay's map[string]string: every value a string
        assert isinstance(params, dict)
        assert all(isinstance(v, str) for v in params.values()), params
        # KubeRay rejects resources given both as ray start flags and as group `resources`.
        resource_params = {"num-cpus", "num-gpus", "memory", "resources"} & set(params)
        assert not (group.get("resources") and resource_params), resource_params
    for group_name, containers in _containers(spec):
        assert containers, group_name
        ray_container = containers[0]  # KubeRay's Ray container is the first one
        assert ray_container["name"] and ray_container["image"], group_name
        resources = ray_container["resources"]
        for side in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[side]), f"{group_name}: {side}"
        # Kubernetes requires extended resources (GPUs) to have requests equal to limits.
        gpus = {side: resources[side].get("nvidia.com/gpu") for side in ("requests", "limits")}
        assert gpus["requests"] == gpus["limits"], group_name
    images = {c[0]["image"] for _, c in _containers(spec)}
    assert len(images) == 1, f"{name}: head and workers must run one image (one Ray, one Python)"


@pytest.mark.parametrize("name", sorted(KUBERAY_MANIFESTS))
def test_kuberay_token_auth_and_ray_version(name):
    spec = _cluster_spec(_manifest(name))
    assert spec["authOptions"]["mode"] == "token"
    assert spec["authOptions"]["secretName"]
    # KubeRay needs rayVersion >= 2.52 for token auth; it must be the image's Ray.
    base_image = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-", DOCKERFILE.read_text(), re.M)
    assert base_image and spec["rayVersion"] == base_image.group(1)


def test_kuberay_image_runs_from_the_job_working_dir():
    job = _manifest("rayjob-finetune.yaml")
    workdir = re.search(r"^WORKDIR (\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == workdir
    assert re.search(r'pip install .*-e "\.\[train,serve,gpu\]"', DOCKERFILE.read_text())


def test_rayjob_entrypoint():
    job = _manifest("rayjob-finetune.yaml")
    entrypoint = job["spec"]["entrypoint"]
    # KubeRay pastes the entrypoint into its submitter's shell line (`... -- ENTRYPOINT ; fi`):
    # a `&&`, `;` or `|` would run outside the Ray job.
    assert not re.search(r"&&|;|\|", entrypoint), entrypoint
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", FINETUNE]
    assert "--use-gpu" in argv
    assert _flag_value(argv, "--storage-path").startswith(SHARED_STORAGE)
    assert 0 < int(_flag_value(argv, "--num-workers")) <= _max_gpus(_cluster_spec(job))


SERVE_CONFIGS = _serve_configs()


@pytest.mark.parametrize("origin,config", SERVE_CONFIGS, ids=[o for o, _ in SERVE_CONFIGS])
def test_serve_config_v2_is_a_valid_serve_config(origin, config):
    schema = pytest.importorskip("ray.serve.schema")
    serve_config = pytest.importorskip("ray.serve.config")
    option_utils = pytest.importorskip("ray._common.ray_option_utils")
    model = schema.ServeDeploySchema
    validate = getattr(model, "model_validate", None) or model.parse_obj
    validate(config)
    # Serve's schema ignores unknown keys (a misspelt `num_replica` passes): check names too.
    fields = lambda m: set(getattr(m, "model_fields", None) or m.__fields__)  # noqa: E731
    assert set(config) <= fields(schema.ServeDeploySchema)
    for app in config["applications"]:
        assert set(app) <= fields(schema.ServeApplicationSchema), app["name"]
        for deployment in app.get("deployments", []):
            assert set(deployment) <= fields(schema.DeploymentSchema), deployment["name"]
            autoscaling = deployment.get("autoscaling_config", {})
            assert set(autoscaling) <= fields(serve_config.AutoscalingConfig), deployment["name"]
            actor_options = deployment.get("ray_actor_options", {})
            option_utils.validate_actor_options(actor_options, in_options=True)
    service = _manifest(origin)
    spec = _cluster_spec(service)
    gpus_per_pod = max(_group_gpus(g) for g in spec["workerGroupSpecs"])
    max_gpus = _max_gpus(spec)
    job_argv = shlex.split(_manifest("rayjob-finetune.yaml")["spec"]["entrypoint"])
    storage = _flag_value(job_argv, "--storage-path")
    for app in config["applications"]:
        assert app["import_path"] == SERVE_IMPORT_PATH
        # The replicas read the checkpoint the RayJob wrote: under its --storage-path.
        assert app["args"]["model"].startswith(storage.rstrip("/") + "/"), app["args"]["model"]
        from tests.helpers import deployed

        deployment = deployed(app)
        gpus = deployment.ray_actor_options.get("num_gpus", 0)
        assert 0 < gpus <= gpus_per_pod, deployment.name
        max_replicas = deployment._deployment_config.autoscaling_config.max_replicas
        assert max_replicas * gpus <= max_gpus, f"{deployment.name}: more GPUs than pods"


SERVE_FILES = [("serve/config.yaml", _load(REPO / "serve/config.yaml")), (GPU_SERVE_CONFIG, _load(REPO / GPU_SERVE_CONFIG)),
               *SERVE_CONFIGS]


@pytest.mark.parametrize("origin,config", SERVE_FILES, ids=[o for o, _ in SERVE_FILES])
def test_serve_options_are_changed_in_place_and_replicas_have_time_to_finish(origin, config):
    """Serve replaces every replica (reloading the model, cutting streams) when an application's `args`
    change, and applies a `deployments:` change to the running ones: replica counts, autoscaling and
    queue limits live there. Ray's own code version says which is which. A scaled-down replica's streams
    get more than Serve's default 20 s."""
    deploy_utils = pytest.importorskip("ray.serve._private.deploy_utils")
    schema = pytest.importorskip("ray.serve.schema")
    from serve.app import ServerConfig
    from tests.helpers import deployed

    serve_options = set(schema.DeploymentSchema.model_fields) & set(ServerConfig.__dataclass_fields__)
    for app in config["applications"]:
        assert not serve_options & set(app["args"]), f"{origin}: Serve options in args restart every replica on an edit"
        (options,) = app["deployments"]
        edited = copy.deepcopy(app)
        for key in ("num_replicas", "max_ongoing_requests", "max_queued_requests"):
            if key in options:
                edited["deployments"][0][key] += 1
        edited["deployments"][0].get("autoscaling_config", {})["max_replicas"] = 99
        assert edited != app
        version = lambda a: deploy_utils.get_app_code_version(schema.ServeApplicationSchema.model_validate(a))  # noqa: E731
        assert version(edited) == version(app), origin
        assert deployed(app)._deployment_config.graceful_shutdown_timeout_s >= 300, origin


@pytest.mark.parametrize("origin,config", SERVE_CONFIGS, ids=[o for o, _ in SERVE_CONFIGS])
def test_serve_config_v2_is_the_repo_gpu_serve_config(origin, config):
    path = REPO / GPU_SERVE_CONFIG
    if not path.exists():
        pytest.skip(f"no {GPU_SERVE_CONFIG} in this checkout (test_referenced_path_exists fails)")

    def without_model(cfg):
        cfg = copy.deepcopy(cfg)
        for app in cfg.get("applications", []):
            app.get("args", {}).pop("model", None)
        return cfg

    assert without_model(config) == without_model(_load(path)), (
        f"serveConfigV2 in {origin} differs from {GPU_SERVE_CONFIG} beyond args.model: copy the "
        "file's content into serveConfigV2 and keep the shared-storage model URI"
    )


# ---------------------------------------------------------------------------------------------
# versions


def test_ray_and_torch_pins_agree():
    texts = {p: p.read_text() for p in _scanned_files()}
    ray_pins = set()
    for text in texts.values():
        ray_pins |= set(re.findall(r"\bray(?:\[[\w,]+\])?==(\d+\.\d+\.\d+)", text))
        ray_pins |= set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text))
        ray_pins |= set(re.findall(r'rayVersion: "(\d+\.\d+\.\d+)"', text))
    assert len(ray_pins) == 1, f"Ray versions disagree across cluster/: {ray_pins}"
    ray = pytest.importorskip("ray")
    assert ray_pins == {ray.__version__}, "cluster/ pins another Ray than the one tested here"

    torch_pins = {v for text in texts.values() for v in re.findall(r"\btorch==([\d.]+)", text)}
    assert len(torch_pins) == 1, torch_pins
    (floor,) = re.findall(r"torch>=([\d.]+)", " ".join(_pyproject()["project"]["dependencies"]))
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(next(iter(torch_pins))) >= as_tuple(floor)


# The Triton each pinned torch's Linux CUDA wheel requires (its METADATA's `triton==`); a new pin
# needs its entry here, looked up once, so the check below cannot pass by default.
TORCH_CUDA_WHEEL_TRITON = {"2.13.0": "3.7.1"}


def test_gpu_nodes_install_nothing_that_replaces_their_cuda_torch():
    """torch's Linux CUDA wheel requires the Triton it was built with (2.13.0: triton==3.7.1). The gpu
    extra asked for triton>=3.9, so pip replaced the pinned torch on every GPU node (and in the image)
    with a newer one, after flash-attn had compiled against the first. The extras a GPU node installs
    name neither triton, torch above the pin, nor flash-attn (a source build against the node's CUDA
    toolkit, which torch refuses for another CUDA major); Triton's own floor admits the pinned wheel's."""
    deps = _pyproject()["project"]["optional-dependencies"]
    (pin,) = {v for p in _scanned_files() for v in re.findall(r"\btorch==([\d.]+)", p.read_text())}
    name = lambda req: re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower()  # noqa: E731
    for extra in ("train", "serve", "gpu"):
        assert not {name(r) for r in deps[extra]} & {"torch", "triton", "flash-attn"}, (extra, deps[extra])
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    for extra in ("kernels", "dev"):
        (floor,) = [re.search(r">=([\d.]+)", r).group(1) for r in deps[extra] if name(r) == "triton"]
        assert as_tuple(floor) <= as_tuple(TORCH_CUDA_WHEEL_TRITON[pin]), (extra, floor)


# ---------------------------------------------------------------------------------------------
# paths, import paths and flags named anywhere in cluster/

REFERENCED = _referenced_paths()


def test_paths_are_found():
    # Guards the scanner itself: these names must be seen, or the next test checks nothing.
    assert {FINETUNE, GPU_SERVE_CONFIG} <= set(REFERENCED)


@pytest.mark.parametrize("path", sorted(REFERENCED))
def test_referenced_path_exists(path):
    assert (REPO / path).is_file(), f"{path} is named in {REFERENCED[path]} but does not exist"


@pytest.mark.parametrize("import_path", _import_paths())
def test_serve_import_path_resolves(import_path):
    module, attr = import_path.split(":")
    stem = module.replace(".", "/")
    candidates = [f"{stem}.py", f"{stem}/__init__.py"]
    source = next((REPO / c for c in candidates if (REPO / c).is_file()), None)
    assert source, f"{import_path}: none of {candidates} exists"
    # Read, not imported: importing the app would pull in torch and Ray Serve.
    defined = re.search(rf"^(?:def|class)\s+{attr}\b|^{attr}\s*=", source.read_text(), re.M)
    assert defined, f"{import_path}: {source.relative_to(REPO)} defines no {attr}"


COMMANDS = _finetune_commands()


@pytest.mark.parametrize("origin,argv", COMMANDS, ids=[o for o, _ in COMMANDS])
def test_command_flags_exist(origin, argv):
    script, flags = argv[0], _flags(argv[1:])
    if script == FINETUNE:
        unknown = set(flags) - FINETUNE_FLAGS
        assert not unknown, f"{origin}: {sorted(unknown)} are not flags of {FINETUNE}"
    source = REPO / script
    if not source.is_file():
        pytest.skip(f"{script} is not in this checkout (test_referenced_path_exists fails)")
    # Read, not run (`--help` would import torch and Ray): a flag counts as defined when its
    # literal ("--num-workers") or its attribute name (num_workers) appears in the script.
    text = source.read_text()
    missing = [
        f for f in flags
        if not re.search(rf"""["']{re.escape(f)}["']|\b{f[2:].replace("-", "_")}\b""", text)
    ]
    assert not missing, f"{origin}: {script} defines no {missing}"


# ---------------------------------------------------------------------------------------------
# object storage: the cluster reads the model from the bucket and serves what the fine-tune exports

CLUSTER_FINETUNE_CONFIG = "pipelines/configs/qwen2.5-1.5b.yaml"


def _dataclass_fields(source: str, cls: str) -> set[str]:
    """Annotated field names of a dataclass, read from the source (not imported: no torch/Ray)."""
    import ast

    tree = ast.parse((REPO / source).read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
    return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}


def _servable_export(argv: list[str]) -> str:
    """Where a cluster fine-tune command publishes its servable model (pipelines/finetune.py's
    default output: STORAGE_PATH/RUN_NAME/servable)."""
    config = _load(REPO / _flag_value(argv, "--config"))
    storage = _flag_value(argv, "--storage-path") or config["storage_path"]
    assert "output" not in config and _flag_value(argv, "--output") is None, "the default export path is used"
    run_name = _flag_value(argv, "--run-name") or config["run_name"]
    return f"{storage.rstrip('/')}/{run_name}/servable"


def test_cluster_finetune_reads_model_and_data_from_object_storage():
    config = _load(REPO / CLUSTER_FINETUNE_CONFIG)
    assert config["model"].startswith(SHARED_STORAGE), "a local model path exists on no autoscaled node"
    assert all(d.startswith(SHARED_STORAGE) for d in config["data"])
    assert config["storage_path"].startswith(SHARED_STORAGE) and config["run_name"]


def _bucket(uri: str) -> str:
    """`s3://bucket/a/b` -> `s3://bucket`."""
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


# Fine-tune commands that run on a cluster (they write to shared storage); the README's local one does not.
CLUSTER_FINETUNES = [(o, a) for o, a in COMMANDS if a[0] == FINETUNE and _flag_value(a, "--storage-path")]
UPLOAD_RE = re.compile(r"^[#\s]*(?:aws s3 sync|gcloud storage rsync)\s.*?(\S+://\S+)", re.M)


@pytest.mark.parametrize("origin,argv", CLUSTER_FINETUNES, ids=[o for o, _ in CLUSTER_FINETUNES])
def test_cluster_finetune_commands_name_model_and_data_in_their_bucket(origin, argv):
    """The fine-tune config's model and data name a placeholder bucket that the README's edits (a
    `sed` on the manifest, for KubeRay, where the config is baked into the image) never reach: every
    cluster command passes them, in the bucket it writes to, and the README uploads them there."""
    bucket = _bucket(_flag_value(argv, "--storage-path"))
    uploaded = {u.rstrip("/").split("://", 1)[1] for u in UPLOAD_RE.findall(_command_text(README))}
    for flag in ("--model", "--data"):
        value = _flag_value(argv, flag)
        assert value and value.startswith(bucket + "/"), f"{origin}: {flag} {value} is not in {bucket}"
        assert value.rstrip("/").split("://", 1)[1] in uploaded, f"{origin}: cluster/README.md never uploads {value}"


def _serving_pairs() -> list[tuple[str, list[str], dict]]:
    """(origin, fine-tune argv, Serve config that serves its result) for the launcher and KubeRay."""
    pairs = []
    for name in sorted(LAUNCHER):
        meta = _launcher(name)["metadata"]
        pairs.append((name, shlex.split(meta["finetune_entrypoint"]), _load(REPO / meta["serve_config"])))
    job_argv = shlex.split(_manifest("rayjob-finetune.yaml")["spec"]["entrypoint"])
    pairs += [(origin, job_argv, cfg) for origin, cfg in SERVE_CONFIGS]
    return pairs


@pytest.mark.parametrize("origin,argv,config", _serving_pairs(), ids=[p[0] for p in _serving_pairs()])
def test_serve_loads_the_servable_export_of_the_finetune(origin, argv, config):
    export = _servable_export(argv)
    for flag in ("--model", "--data"):  # one cloud: the command reads from its own object store
        value = _flag_value(argv, flag)
        assert value is None or value.split("://")[0] == export.split("://")[0], f"{origin}: {flag} {value}"
    server_fields = _dataclass_fields("serve/app.py", "ServerConfig")
    engine_fields = _dataclass_fields("fdllm/engine/params.py", "EngineConfig")
    for app in config["applications"]:
        args = app["args"]
        # The repository's Serve config is written for S3; README step 3 points it at the gs:// export
        # on Google Cloud: the path after the scheme must agree.
        served = args["model"].split("://", 1)[1]
        assert served == export.split("://", 1)[1], f"{origin}: serves {args['model']}, the fine-tune exports {export}"
        assert set(args) <= server_fields, set(args) - server_fields
        assert args.get("engine"), f"{origin}: engine sizing belongs in the Serve config"
        assert set(args["engine"]) <= engine_fields, set(args["engine"]) - engine_fields
        assert "api_key" not in args, f"{origin}: the API key comes from a secret or the environment"


def test_rayservice_api_key_comes_from_a_secret():
    spec = _cluster_spec(_manifest("rayservice-serve.yaml"))
    for group in spec["workerGroupSpecs"]:  # the replicas run on the workers (the head has 0 CPUs)
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0].get("env", [])}
        assert env["FDLLM_API_KEY"]["valueFrom"]["secretKeyRef"]["name"], group["groupName"]


@pytest.mark.parametrize("bucket", ["s3://my-bucket", "gs://my-bucket"])
def test_readme_substitution_leaves_no_placeholder(bucket):
    """The README's `sed ... | kubectl apply` commands, run as written: every image and bucket placeholder
    is replaced, the bucket's scheme with it (a GKE cluster reads gs://, never the manifests' s3://)."""
    commands = re.findall(r"^(sed (?:-e \"[^\"]+\" )+)\\\n\s+(cluster/kuberay/\S+\.yaml)", README.read_text(), re.M)
    assert sorted(path for _, path in commands) == sorted(f"cluster/kuberay/{m}" for m in KUBERAY_MANIFESTS)
    for sed, path in commands:
        out = subprocess.run(["bash", "-c", f"{sed} {path}"], cwd=REPO, capture_output=True, text=True, check=True,
                             env={"PATH": "/usr/bin:/bin", "REGISTRY": "reg.test/me", "BUCKET": bucket}).stdout
        out = json.dumps(yaml.safe_load(out))  # what kubectl applies: the comments, which name the placeholders, gone
        assert "YOUR_BUCKET" not in out and "registry.example.com" not in out, path
        other = "s3://" if bucket.startswith("gs://") else "gs://"
        assert f"{bucket}/" in out and other not in out, path
