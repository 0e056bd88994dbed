"""deploy/kuberay/ validated without a cluster: built-in kinds against Kubernetes' schemas (kubernetes-validate),
RayCluster / RayJob against the KubeRay CRD subset of ``kuberay_schema`` (KubeRay v1.7.0, commit
59d663aeec13760646da3db9c1cf8cfe883e30b7; its docstring says what was read), plus what a schema cannot see: image
versions against requirements.txt, Secret references, no credential in any file, and the RayJobs' command lines
parsed and loaded by mocolab itself."""

from __future__ import annotations

import argparse
import copy
import importlib
import re
import shlex
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kuberay_schema
import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "kuberay"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3)(?P<minor>\d+)(-[a-z0-9]+)*$")
MOCOLAB_IMAGE = re.compile(r"^REGISTRY/mocolab:[\w.-]+$")  # built from deploy/kuberay/Dockerfile
OTHER_IMAGES = {"postgres:17"}  # runs no Ray and no mocolab
BUCKET_VALUE = "test-bucket"


def _docs() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


DOCS = _docs()


def _doc(kind: str, name: str) -> dict[str, Any]:
    return copy.deepcopy(next(d for _, d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name))


def _ids(docs) -> list[str]:
    return [f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in docs]


BUILTIN = [(f, d) for f, d in DOCS if not d["apiVersion"].startswith("ray.io/")]
RAY = [(f, d) for f, d in DOCS if d["apiVersion"].startswith("ray.io/")]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==")
            pins[re.split(r"\[", name)[0].strip().lower()] = version.strip()
    return pins


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for node in _walk(doc) for c in node.get("containers", [])]


def _ray_containers() -> list[dict[str, Any]]:
    return [c for _, d in RAY for _, t in kuberay_schema.pod_templates(d) for c in t["spec"]["containers"]]


# --- schemas -----------------------------------------------------------------------------------------------------


def test_the_manifests_cover_every_piece():
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in DOCS}
    assert {
        ("RayCluster", "mocolab"),
        ("RayJob", "mocolab-pretrain"),
        ("RayJob", "mocolab-sweep-temperature"),
        ("Deployment", "mocolab-mlflow"),
        ("Service", "mocolab-mlflow"),
        ("StatefulSet", "mocolab-postgres"),
        ("Service", "mocolab-postgres"),
    } <= kinds
    assert {d["kind"] for _, d in BUILTIN} == {"Deployment", "Service", "StatefulSet", "Secret"}


@pytest.mark.parametrize("doc", [d for _, d in BUILTIN], ids=_ids(BUILTIN))
def test_builtin_kinds_pass_kubernetes_own_schemas(doc):
    kubernetes_validate.validate(doc, kuberay_schema.KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("doc", [d for _, d in RAY], ids=_ids(RAY))
def test_ray_resources_pass_the_kuberay_crd_schema(doc):
    kuberay_schema.validate(doc)


def _parent(doc: dict, path: str) -> tuple[Any, Any]:
    """The node holding the dotted ``path`` of ``doc`` (list indexes as numbers) and the last key."""
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = doc
    for part in parents:
        node = node[part]
    return node, last


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A mutation: set ``path`` of a document to ``value``."""

    def mutate(doc: dict) -> None:
        node, last = _parent(doc, path)
        node[last] = value

    return mutate


def _rename(path: str, new: str) -> Callable[[dict], None]:
    """A mutation: the key at ``path`` misspelt as ``new``."""

    def mutate(doc: dict) -> None:
        node, last = _parent(doc, path)
        node[new] = node.pop(last)

    return mutate


def _drop(path: str) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        node, last = _parent(doc, path)
        del node[last]

    return mutate


HEAD = "spec.headGroupSpec"
HEAD_CONTAINER = f"{HEAD}.template.spec.containers.0"
WORKER = "spec.workerGroupSpecs.0"
CONTAINER = "spec.template.spec.containers.0"
CLUSTER, PRETRAIN = ("RayCluster", "mocolab"), ("RayJob", "mocolab-pretrain")
SWEEP = ("RayJob", "mocolab-sweep-temperature")
MLFLOW = ("Deployment", "mocolab-mlflow")
# case: (kind and name, mutation, what the error message says)
BROKEN = {
    "RayCluster: misspelt workerGroupSpec": (
        CLUSTER,
        _rename("spec.workerGroupSpecs", "workerGroupSpec"),
        "workerGroupSpec",
    ),
    "RayCluster: misspelt rayStartParam": (
        CLUSTER,
        _rename(f"{HEAD}.rayStartParams", "rayStartParam"),
        "rayStartParam",
    ),
    "RayCluster: minReplicas as a string": (
        CLUSTER,
        _set(f"{WORKER}.minReplicas", "0"),
        "'0' is not of type 'integer'",
    ),
    "RayCluster: maxReplicas beyond int32": (CLUSTER, _set(f"{WORKER}.maxReplicas", 2**31), "maximum"),
    "RayCluster: worker group without maxReplicas": (
        CLUSTER,
        _drop(f"{WORKER}.maxReplicas"),
        "'maxReplicas' is a required property",
    ),
    "RayCluster: auth mode outside the enum": (
        CLUSTER,
        _set("spec.authOptions.mode", "tokens"),
        "'tokens' is not one of",
    ),
    "RayCluster: rayStartParams value not a string": (
        CLUSTER,
        _set(f"{HEAD}.rayStartParams.num-cpus", 0),
        "0 is not of type 'string'",
    ),
    "RayCluster: misspelt container field": (CLUSTER, _rename(f"{HEAD_CONTAINER}.envFrom", "envFrm"), "envFrm"),
    "RayCluster: containerPort as a string": (
        CLUSTER,
        _set(f"{HEAD_CONTAINER}.ports.0.containerPort", "6379"),
        "'6379' is not of type 'integer'",
    ),
    "RayCluster: misspelt metadata field": (CLUSTER, _rename("metadata.labels", "label"), "label"),
    "RayJob: misspelt entryPoint": (PRETRAIN, _rename("spec.entrypoint", "entryPoint"), "entryPoint"),
    "RayJob: backoffLimit with clusterSelector": (
        PRETRAIN,
        _set("spec.backoffLimit", 2),
        "backoffLimit is incompatible",
    ),
    "RayJob: unknown submissionMode": (SWEEP, _set("spec.submissionMode", "K8sJob"), "submissionMode"),
    "Deployment: replicas as a string": (MLFLOW, _set("spec.replicas", "1"), "'1' is not of type 'integer'"),
    "Deployment: misspelt container field": (MLFLOW, _rename(f"{CONTAINER}.command", "comand"), "comand"),
    "Service: misspelt selector": (("Service", "mocolab-mlflow"), _rename("spec.selector", "selectr"), "selectr"),
    "StatefulSet: unknown retention policy field": (
        ("StatefulSet", "mocolab-postgres"),
        _set("spec.persistentVolumeClaimRetentionPolicy.whenDelete", "Retain"),
        "whenDelete",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validation_refuses_a_broken_manifest(case):
    (kind, name), mutate, message = BROKEN[case]
    doc = _doc(kind, name)
    mutate(doc)
    check = (
        kuberay_schema.validate
        if doc["apiVersion"].startswith("ray.io/")
        else (lambda d: kubernetes_validate.validate(d, kuberay_schema.KUBERNETES_VERSION, strict=True))
    )
    with pytest.raises(jsonschema.ValidationError) as refused:
        check(doc)
    assert message in str(refused.value.message), refused.value.message


# --- images ------------------------------------------------------------------------------------------------------


def _dockerfile_base() -> str:
    froms = [line.split()[1] for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line.startswith("FROM ")]
    assert len(froms) == 1, froms
    return froms[0]


def version_mismatches(image: str, ray_pin: str, python: str) -> list[str]:
    """How a ``rayproject/ray:<ray>-py<XY>-...`` image differs from the pinned Ray and the project's Python."""
    match = RAY_IMAGE.match(image)
    if not match:
        return [f"{image} is not a rayproject/ray:<version>-py<XY> image"]
    problems = []
    if match["ray"] != ray_pin:
        problems.append(f"{image}: Ray {match['ray']}, requirements.txt pins {ray_pin}")
    if f"{match['py']}.{match['minor']}" != python:
        problems.append(f"{image}: Python {match['py']}.{match['minor']}, the project's is {python}")
    return problems


def _project_python() -> str:
    """The Python the pins were resolved on (requirements.txt's header), which requires-python must admit."""
    resolved = re.search(r"on Python (\d+\.\d+)", (REPO / "requirements.txt").read_text())
    assert resolved, "requirements.txt's header no longer names the Python its pins were resolved on"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(resolved[1]), (requires, resolved[1])
    return resolved[1]


def test_every_image_runs_the_pinned_ray_and_the_projects_python():
    ray_pin, python = _pins()["ray"], _project_python()
    assert version_mismatches(_dockerfile_base(), ray_pin, python) == []
    images = {c["image"] for _, d in DOCS for c in _containers(d)}
    for image in images - OTHER_IMAGES:
        assert MOCOLAB_IMAGE.match(image) or version_mismatches(image, ray_pin, python) == [], image
    cluster = _doc("RayCluster", "mocolab")
    assert cluster["spec"]["rayVersion"] == ray_pin
    assert all(MOCOLAB_IMAGE.match(c["image"]) for c in _ray_containers())  # the driver and workers import mocolab


def test_a_mismatched_image_is_reported():
    assert version_mismatches("rayproject/ray:2.60.0-py311-gpu", "2.60.0", "3.11") == []
    assert len(version_mismatches("rayproject/ray:2.59.0-py310-gpu", "2.60.0", "3.11")) == 2
    assert version_mismatches("rayproject/ray:latest", "2.60.0", "3.11") != []


# --- cluster shape, auth, exposure -------------------------------------------------------------------------------


def test_cpu_head_gpu_workers_autoscaling_and_token_auth():
    spec = _doc("RayCluster", "mocolab")["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_limits = [c.get("resources", {}).get("limits", {}) for c in head["template"]["spec"]["containers"]]
    assert all("nvidia.com/gpu" not in limits for limits in head_limits)
    assert spec["enableInTreeAutoscaling"] is True
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 < group["maxReplicas"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 8
    assert spec["authOptions"] == {"mode": "token", "secretName": "mocolab-ray-auth"}


def test_nothing_is_exposed_outside_the_cluster():
    assert _doc("RayCluster", "mocolab")["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    services = [d for _, d in DOCS if d["kind"] == "Service"]
    assert {s["spec"].get("type", "ClusterIP") for s in services} == {"ClusterIP"}
    assert not any("hostPort" in port for _, d in DOCS for c in _containers(d) for port in c.get("ports", []))


def test_every_ray_container_tracks_to_the_mlflow_service_with_bucket_credentials():
    service = _doc("Service", "mocolab-mlflow")
    uri = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    for container in _ray_containers():
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"] == uri, container["name"]
        assert {"secretRef": {"name": "mocolab-s3"}} in container["envFrom"], container["name"]


def test_rayjobs_run_on_the_raycluster():
    cluster = _doc("RayCluster", "mocolab")["metadata"]["name"]
    for _, job in [(f, d) for f, d in RAY if d["kind"] == "RayJob"]:
        assert job["spec"]["clusterSelector"] == {kuberay_schema.CLUSTER_SELECTOR_KEY: cluster}
        assert "rayClusterSpec" not in job["spec"]


def test_the_postgres_volume_outlives_the_statefulset():
    spec = _doc("StatefulSet", "mocolab-postgres")["spec"]
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    claim = spec["volumeClaimTemplates"][0]["metadata"]["name"]
    mounts = spec["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(m["name"] == claim for m in mounts)
    assert not [d for _, d in DOCS if d["kind"] == "PersistentVolumeClaim"]  # none that `kubectl delete -f` removes


# --- secrets -----------------------------------------------------------------------------------------------------


def _example_secrets() -> dict[str, set[str]]:
    docs = yaml.safe_load_all((DEPLOY / "secrets.example.yaml").read_text())
    return {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {})) for d in docs}


def secret_references(doc: dict[str, Any]) -> list[tuple[str, str | None]]:
    """``(secret, key)`` of every reference in a manifest; key None for a whole-Secret ``envFrom``."""
    refs: list[tuple[str, str | None]] = []
    for node in _walk(doc):
        if "secretKeyRef" in node:
            refs.append((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
        if "secretRef" in node:
            refs.append((node["secretRef"]["name"], None))
        if "secretName" in node.get("authOptions", {}):
            refs.append((node["authOptions"]["secretName"], "auth_token"))  # KubeRay reads this key
    return refs


def missing_secrets(refs, secrets: dict[str, set[str]]) -> list[tuple[str, str | None]]:
    return [(name, key) for name, key in refs if name not in secrets or (key is not None and key not in secrets[name])]


def test_every_secret_reference_names_an_example_secret_and_key():
    secrets = _example_secrets()
    refs = [ref for _, d in DOCS if d["kind"] != "Secret" for ref in secret_references(d)]
    assert {name for name, _ in refs} == set(secrets), "an example Secret nothing uses, or a used one not listed"
    assert missing_secrets(refs, secrets) == []


def test_a_reference_to_a_missing_secret_key_is_reported():
    deployment = _doc("Deployment", "mocolab-mlflow")
    _set("spec.template.spec.containers.0.env.0.valueFrom.secretKeyRef.key", "uri")(deployment)
    assert missing_secrets(secret_references(deployment), _example_secrets()) == [("mocolab-mlflow-db", "uri")]


def test_example_secrets_hold_placeholders_only():
    for doc in yaml.safe_load_all((DEPLOY / "secrets.example.yaml").read_text()):
        assert "data" not in doc, "base64 data could hide a real value: use stringData placeholders"
        for key, value in doc["stringData"].items():
            scheme, _, rest = value.partition("://")
            parts = re.split(r"[:@/]", rest) if rest else [value]
            assert all(PLACEHOLDER.match(p) or p.isdigit() for p in parts), (doc["metadata"]["name"], key)


CREDENTIAL_IN_URI = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:(?P<password>[^@\s]+)@")
SECRET_NAMED = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)


def credential_literals(text: str) -> list[str]:
    """Passwords written into URIs of ``text`` that are neither CAPITALS placeholders nor $VARIABLES."""
    return [
        m["password"]
        for m in CREDENTIAL_IN_URI.finditer(text)
        if not PLACEHOLDER.match(m["password"]) and not m["password"].startswith("$")
    ]


def test_no_credential_is_written_anywhere_in_deploy():
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert credential_literals(path.read_text()) == [], path.name
    for _, doc in BUILTIN + RAY:
        for node in _walk(doc):
            if "name" in node and "value" in node and SECRET_NAMED.search(node["name"]):
                pytest.fail(f"{doc['metadata']['name']}: env {node['name']} has a literal value; use a Secret")
    assert credential_literals("postgresql://mlflow:hunter2@db:5432/mlflow") == ["hunter2"]


def test_the_mlflow_backend_store_comes_from_a_secret():
    container = _doc("Deployment", "mocolab-mlflow")["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[:2] == ["mlflow", "server"]
    store = command[command.index("--backend-store-uri") + 1]
    variable = re.fullmatch(r"\$\((\w+)\)", store)
    assert variable, store
    (entry,) = [e for e in container["env"] if e["name"] == variable[1]]
    assert entry["valueFrom"]["secretKeyRef"]["name"] == "mocolab-mlflow-db"
    assert command[command.index("--artifacts-destination") + 1].startswith("s3://BUCKET/")
    assert command[command.index("--port") + 1] == str(_doc("Service", "mocolab-mlflow")["spec"]["ports"][0]["port"])


def test_buckets_are_written_as_the_bucket_placeholder():
    for path in MANIFESTS:
        for uri in re.findall(r"s3://[^\s\"']*", path.read_text()):
            assert uri.startswith("s3://BUCKET/"), (path.name, uri)


# --- the RayJobs' commands ---------------------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    """What ``mocolab.cli.main`` does with a subcommand's arguments (its parser, without running anything)."""
    from mocolab.cli import SUBCOMMANDS, VERBOSE_HELP

    assert argv[0] == "mocolab" and argv[1] in SUBCOMMANDS, argv
    parser = argparse.ArgumentParser(prog=f"mocolab {argv[1]}")
    importlib.import_module(SUBCOMMANDS[argv[1]][0]).add_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    return parser.parse_args(argv[2:])


JOBS = [(f, d) for f, d in RAY if d["kind"] == "RayJob"]


@pytest.mark.parametrize("job", [d for _, d in JOBS], ids=_ids(JOBS))
def test_rayjob_entrypoints_parse_and_load_as_mocolab_configs(job, monkeypatch):
    from mocolab.config import Config, load_config, parse_override
    from mocolab.tune.spec import load_sweep

    monkeypatch.chdir(REPO)  # the image's workingDir holds this repository
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mocolab-mlflow:5000")
    argv = shlex.split(job["spec"]["entrypoint"].replace("BUCKET", BUCKET_VALUE))
    args = _parse(argv)
    keys = [parse_override(text)[0] for text in args.overrides]
    assert "scaling.storage_path" in keys and "data.root" in keys
    if argv[1] == "pretrain":
        assert (REPO / args.config).is_file()
        cfg = load_config(args.config, args.overrides)
    else:
        assert argv[1] == "sweep" and (REPO / args.sweep_file).is_file()
        _, _, (cfg, *_) = load_sweep(args.sweep_file, args.overrides)
    assert set(keys) <= set(Config().flat()), set(keys) - set(Config().flat())
    assert cfg.scaling.storage_path == f"s3://{BUCKET_VALUE}/mocolab/ray_results"
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers == 8


def test_the_readme_installs_the_kuberay_version_the_schema_was_read_from():
    readme = (DEPLOY / "README.md").read_text()
    assert f"--version {kuberay_schema.KUBERAY_VERSION}" in readme
