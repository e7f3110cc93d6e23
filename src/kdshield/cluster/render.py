"""Deployable cluster configs, rendered from the packaged templates in ``cluster/templates``.

``kdshield cluster render KIND --out FILE [--set key=value ...]`` with KIND one of

- ``launcher``: a Ray cluster launcher YAML for AWS (``ray up FILE``): CPU head, a GPU worker
  group scaling from 0, kdshield and its Python dependencies installed by setup commands;
- ``kuberay-cluster``: a KubeRay ``RayCluster`` with in-tree autoscaling;
- ``kuberay-job``: a KubeRay ``RayJob`` that runs ``kdshield tune ...`` on such a cluster.

A template's ``${name}`` placeholders are its settings (:data:`SETTINGS`); a scalar that is
exactly one placeholder takes the setting's type (ints stay ints). Neither kind opens the
dashboard or GCS port to the world, and Ray's token authentication stays on in all of them.
"""

from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kdshield.config import redact_url
from kdshield.errors import InputError
from kdshield.outputs import write_atomic

_RAY_VERSION = "2.60.0"
_KDSHIELD_VERSION = "0.1.0"


def _ray_version() -> str:
    try:
        import ray

        return ray.__version__
    except ImportError:  # pragma: no cover - ray is a dependency
        return _RAY_VERSION


_KUBERAY = {
    "name": ("kdshield", "RayCluster / RayJob name"),
    "namespace": ("default", "Kubernetes namespace"),
    "image": (f"kdshield-ray:{_KDSHIELD_VERSION}-cpu", f"head image: rayproject/ray:{_RAY_VERSION}-py311 with "
                                                       "kdshield installed (README: Running on a cluster)"),
    "gpu_image": (f"kdshield-ray:{_KDSHIELD_VERSION}-gpu", f"GPU worker image: rayproject/ray:{_RAY_VERSION}-py311-gpu "
                                                           "with kdshield installed"),
    "head_cpus": (2, "head pod CPUs (it runs drivers; Ray is told 0 so no training lands there)"),
    "head_memory": ("8Gi", "head pod memory"),
    "gpu_node_cpus": (8, "CPUs of one GPU worker pod"),
    "gpu_node_gpus": (1, "GPUs of one GPU worker pod"),
    "gpu_node_memory": ("32Gi", "memory of one GPU worker pod"),
    "min_gpu_workers": (0, "GPU worker pods kept when idle"),
    "max_gpu_workers": (4, "most GPU worker pods the autoscaler adds"),
    "idle_timeout_seconds": (300, "idle seconds before the autoscaler removes a worker pod"),
    "pvc": ("kdshield-data", "ReadWriteMany PersistentVolumeClaim mounted at /data on every pod"),
}

SETTINGS: dict[str, dict[str, tuple[Any, str]]] = {
    "launcher": {
        "cluster_name": ("kdshield", "cluster name (also names its security group)"),
        "region": ("us-west-2", "AWS region"),
        "image_id": ("latest_dlami", "AMI; latest_dlami: Ray picks the region's latest Deep Learning AMI"),
        "head_instance_type": ("m5.2xlarge", "head instance type (CPU only)"),
        "gpu_instance_type": ("g5.2xlarge", "GPU worker instance type"),
        "gpu_node_cpus": (8, "CPUs of one GPU worker instance"),
        "gpu_node_gpus": (1, "GPUs of one GPU worker instance"),
        "min_gpu_workers": (0, "GPU workers kept when idle"),
        "max_gpu_workers": (4, "most GPU workers the autoscaler adds"),
        "idle_timeout_minutes": (5, "idle minutes before the autoscaler removes a worker"),
        "disk_gb": (200, "root volume size of every node"),
        "ray_version": (_RAY_VERSION, "Ray installed on the nodes (match the client's)"),
        "torch_spec": ("torch>=2.4,<3", "pip requirement for torch (the CUDA build on GPU nodes)"),
        "kdshield_dist": ("./dist", "local directory holding the kdshield wheel (`pip wheel --no-deps -w dist .`), "
                                    "copied to ~/kdshield-dist on every node"),
        # $HOME, not ~: the setup command quotes the requirement, and bash expands no ~ inside quotes
        "kdshield_spec": (f"$HOME/kdshield-dist/kdshield-{_KDSHIELD_VERSION}-py3-none-any.whl",
                          "pip requirement for kdshield on the nodes (default: the copied wheel)"),
    },
    "kuberay-cluster": {**_KUBERAY, "ray_version": (_RAY_VERSION, "spec.rayVersion (>= 2.52 for token auth)")},
    "kuberay-job": {
        **_KUBERAY,
        "ray_version": (_RAY_VERSION, "spec.rayVersion (>= 2.52 for token auth)"),
        "method": ("bedkd", "defense to tune"),
        "run": ("/data/run", "RUN directory (on the shared volume) from `kdshield attack`"),
        "num_samples": (16, "trials of the search"),
        "workers": (1, "Ray Train workers per trial"),
        "gpus_per_worker": (1, "GPUs per worker"),
        "storage": ("sqlite:////data/tune/study.db", "Optuna storage URL (survives the driver); no password: "
                                                      "a URL with one goes in storage_secret"),
        "storage_secret": ("", "a Kubernetes Secret whose key `url` holds the storage URL (with its password); the "
                               "head pod gets it as $KDSHIELD_STORAGE and the RayJob itself carries none"),
        "out": ("/data/tune/out", "output directory of the search"),
        "extra_args": ("", "further `kdshield tune` arguments, appended verbatim"),
        "deadline_seconds": (86400, "activeDeadlineSeconds of the RayJob"),
    },
}

TEMPLATE_FILES = {"launcher": "launcher-aws.yaml", "kuberay-cluster": "kuberay-cluster.yaml",
                  "kuberay-job": "kuberay-job.yaml"}

_PLACEHOLDER = re.compile(r"\$\{([a-z_]+)\}")


def template_text(kind: str) -> str:
    return resources.files("kdshield.cluster").joinpath("templates", TEMPLATE_FILES[kind]).read_text()


def _resolve(kind: str, overrides: dict[str, Any]) -> dict[str, Any]:
    if kind not in SETTINGS:
        raise InputError(f"cluster render: unknown kind {kind!r} (choose from {', '.join(SETTINGS)})")
    known = SETTINGS[kind]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise InputError(f"cluster render {kind}: unknown setting {unknown[0]!r} "
                         f"(settings: {', '.join(sorted(known))})")
    values = {k: default for k, (default, _) in known.items()}
    if "ray_version" in values:
        values["ray_version"] = _ray_version()
    for key, value in overrides.items():
        default = known[key][0]
        if isinstance(default, int) and not isinstance(default, bool):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InputError(f"cluster render {kind}: {key}={value!r}: expected a whole number >= 0")
        elif value is None or isinstance(value, (dict, list)):
            raise InputError(f"cluster render {kind}: {key}={value!r}: expected a single value")
        else:
            value = str(value)
        values[key] = value
    for lo, hi in (("min_gpu_workers", "max_gpu_workers"),):
        if lo in values and values[lo] > values[hi]:
            raise InputError(f"cluster render {kind}: {lo}={values[lo]} is above {hi}={values[hi]}")
    return values


def _substitute(node: Any, values: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        return {_substitute(k, values): _substitute(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, values) for v in node]
    if isinstance(node, str):
        whole = _PLACEHOLDER.fullmatch(node)
        if whole:
            return copy.deepcopy(values[whole.group(1)])
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), node)
    return node


def tune_entrypoint(values: dict[str, Any]) -> str:
    """The RayJob's entrypoint: ``kdshield tune`` against the cluster the job runs on (the storage
    URL from the Secret through $KDSHIELD_STORAGE when ``storage_secret`` is set)."""
    storage = "" if values["storage_secret"] else f"--storage {values['storage']} "
    cmd = (f"kdshield tune --method {values['method']} --run {values['run']} "
           f"--num-samples {values['num_samples']} {storage}--resume "
           f"--workers {values['workers']} --gpus-per-worker {values['gpus_per_worker']} "
           f"--address auto --out {values['out']}")
    return f"{cmd} {values['extra_args']}".strip()


def _has_password(url: str) -> bool:
    from sqlalchemy.engine import make_url  # with optuna; only storage URLs need it

    try:
        return bool(make_url(url).password)
    except Exception:  # noqa: BLE001 - not a URL: a secret in another shape cannot be ruled out
        return "@" in url


def render(kind: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config of ``kind`` as a dict, with ``overrides`` applied (bad ones raise InputError)."""
    values = _resolve(kind, overrides or {})
    if kind == "kuberay-job":
        if _has_password(values["storage"]):
            raise InputError(f"cluster render kuberay-job: storage={redact_url(values['storage'])} holds a password, "
                             "which would be written into the RayJob; put the URL in a Kubernetes Secret (key `url`) "
                             "and pass storage_secret=NAME")
        cluster_values = {k: v for k, v in values.items() if k in SETTINGS["kuberay-cluster"]}
        cluster = render("kuberay-cluster", cluster_values)
        if values["storage_secret"]:
            head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
            head.setdefault("env", []).append({"name": "KDSHIELD_STORAGE", "valueFrom": {"secretKeyRef": {
                "name": values["storage_secret"], "key": "url"}}})
        values = {**values, "cluster_spec": cluster["spec"], "entrypoint": tune_entrypoint(values)}
    return _substitute(yaml.safe_load(template_text(kind)), values)


def render_to_file(kind: str, out: str | Path, overrides: dict[str, Any] | None = None) -> Path:
    """Render ``kind`` into ``out`` (YAML with a header naming its settings); returns the path."""
    config = render(kind, overrides)
    out = Path(out)
    if out.is_dir():
        raise InputError(f"{out}: is a directory (give a file name)")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: no such directory")
    values = _resolve(kind, overrides or {})
    header = [_PLACEHOLDER.sub(lambda m: str(values.get(m.group(1), m.group(0))), line)
              for line in template_text(kind).splitlines() if line.startswith("#")]
    body = yaml.safe_dump(config, sort_keys=False, width=100)
    return write_atomic(out, "\n".join(header) + "\n" + body)
