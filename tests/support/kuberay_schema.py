"""JSON schemas for the RayCluster / RayJob fields that deploy/kuberay/ uses, written from KubeRay's CRDs.

Read from KubeRay v1.7.0 (commit 59d663aeec13760646da3db9c1cf8cfe883e30b7), the ``v1`` version's
``openAPIV3Schema`` in ``ray-operator/config/crd/bases/ray.io_rayclusters.yaml`` and ``ray.io_rayjobs.yaml``, and
the operator's own admission rules in ``ray-operator/controllers/ray/utils/validation.go``. No package ships those
files, so this is our own schema for the subset we use: the CRD's types, required fields and enums, ``int32`` as its
range, and ``additionalProperties: false`` on every object whose CRD properties are fixed (a field the CRD has but
this subset does not list is refused too: add it here from the CRD). Pod templates (CRD: the full core/v1
PodTemplateSpec) and ``metadata`` (ObjectMeta) are validated with Kubernetes' own schemas (kubernetes-validate).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jsonschema
import kubernetes_validate

KUBERAY_VERSION = "1.7.0"  # the CRDs read; deploy/kuberay/README.md installs this operator version
KUBERNETES_VERSION = "1.37"

INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
POD_TEMPLATE = {"type": "object"}  # checked as core/v1 PodTemplateSpec by validate()


def _fixed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """An object with exactly these properties, as the CRD's object with fixed ``properties`` (no free keys)."""
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    return schema


WORKER_GROUP = _fixed(
    {
        "groupName": {"type": "string"},
        "replicas": INT32,
        "minReplicas": INT32,
        "maxReplicas": INT32,
        "idleTimeoutSeconds": INT32,
        "numOfHosts": INT32,
        "suspend": {"type": "boolean"},
        "labels": STRING_MAP,
        "resources": STRING_MAP,
        "rayStartParams": STRING_MAP,
        "template": POD_TEMPLATE,
    },
    required=("groupName", "maxReplicas", "minReplicas", "template"),
)

RAY_CLUSTER_SPEC = _fixed(
    {
        "rayVersion": {"type": "string"},
        "suspend": {"type": "boolean"},
        "authOptions": _fixed(
            {
                "mode": {"type": "string", "enum": ["disabled", "token"]},
                "secretName": {"type": "string"},
                "enableK8sTokenAuth": {"type": "boolean"},
            }
        ),
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": _fixed(
            {
                "upscalingMode": {"type": "string", "enum": ["Default", "Aggressive", "Conservative"]},
                "idleTimeoutSeconds": INT32,
                "version": {"type": "string", "enum": ["v1", "v2"]},
                "image": {"type": "string"},
                "imagePullPolicy": {"type": "string"},
            }
        ),
        "headGroupSpec": _fixed(
            {
                "serviceType": {"type": "string"},
                "enableIngress": {"type": "boolean"},
                "labels": STRING_MAP,
                "resources": STRING_MAP,
                "rayStartParams": STRING_MAP,
                "template": POD_TEMPLATE,
            },
            required=("template",),
        ),
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
    },
    required=("headGroupSpec",),
)

RAY_JOB_SPEC = _fixed(
    {
        "entrypoint": {"type": "string"},
        "clusterSelector": STRING_MAP,
        "rayClusterSpec": RAY_CLUSTER_SPEC,
        "submissionMode": {"type": "string"},
        "submitterConfig": _fixed({"backoffLimit": INT32}),
        "runtimeEnvYAML": {"type": "string"},
        "jobId": {"type": "string"},
        "metadata": STRING_MAP,
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": INT32,
        "activeDeadlineSeconds": INT32,
        "backoffLimit": INT32,
        "suspend": {"type": "boolean"},
    }
)


def _resource(kind: str, spec: dict[str, Any], spec_required: bool) -> dict[str, Any]:
    return _fixed(
        {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": {"type": "object"},  # checked as ObjectMeta by validate()
            "spec": spec,
        },
        required=("apiVersion", "kind", "metadata") + (("spec",) if spec_required else ()),
    )


SCHEMAS = {
    "RayCluster": _resource("RayCluster", RAY_CLUSTER_SPEC, spec_required=True),
    "RayJob": _resource("RayJob", RAY_JOB_SPEC, spec_required=True),
}

SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
CLUSTER_SELECTOR_KEY = "ray.io/cluster"


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(path, template)`` of every pod template in a RayCluster or RayJob (its embedded cluster spec)."""
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        cluster, prefix = spec, "spec"
    else:
        cluster, prefix = spec.get("rayClusterSpec"), "spec.rayClusterSpec"
    if cluster:
        yield f"{prefix}.headGroupSpec.template", cluster["headGroupSpec"]["template"]
        for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
            yield f"{prefix}.workerGroupSpecs[{i}].template", group["template"]


def _builtin(data: dict[str, Any], where: str) -> None:
    try:
        kubernetes_validate.validate(data, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        err.message = f"{where}: {err.message}"
        raise


def operator_rules(doc: dict[str, Any]) -> list[str]:
    """What KubeRay's admission (validation.go, ``ValidateRayJobSpec``) refuses that the schema lets through."""
    spec = doc["spec"]
    problems = []
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        problems.append(f"submissionMode {mode!r} is not one of {SUBMISSION_MODES}")
    selector = spec.get("clusterSelector")
    if not selector and not spec.get("rayClusterSpec"):
        problems.append("one of rayClusterSpec or clusterSelector must be set")
    if selector:
        if not selector.get(CLUSTER_SELECTOR_KEY):
            problems.append(f"clusterSelector needs a non-empty {CLUSTER_SELECTOR_KEY}")
        if mode == "SidecarMode":
            problems.append("clusterSelector is not supported in SidecarMode")
        if spec.get("backoffLimit", 0) > 0:
            problems.append("backoffLimit is incompatible with clusterSelector")
        if spec.get("suspend"):
            problems.append("clusterSelector mode does not support suspend")
    return problems


def validate(doc: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``doc`` (a RayCluster or RayJob) fits the CRD subset, its
    metadata fits ObjectMeta and its pod templates fit PodTemplateSpec."""
    kind = doc.get("kind")
    if kind not in SCHEMAS:
        raise jsonschema.ValidationError(f"kind {kind!r} is not one of {sorted(SCHEMAS)}")
    jsonschema.Draft202012Validator(SCHEMAS[kind]).validate(doc)
    _builtin({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}, "metadata")
    for path, template in pod_templates(doc):
        _builtin({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}, path)
    if kind == "RayJob":
        problems = operator_rules(doc)
        if problems:
            raise jsonschema.ValidationError("; ".join(problems))
