"""Multi-node Ray clusters on one machine, for tests, benchmarks and experiments.

Two kinds, both Ray's own machinery:

- :func:`multinode_cluster`: ``ray.cluster_utils.Cluster``: a head and several worker raylets,
  each a real Ray node with its own node id and resources (nodes can be added and removed).
- :class:`LocalAutoscalingCluster`: a head whose autoscaler monitor runs Ray's real
  autoscaler (v1) with the ``fake_multinode`` provider: worker nodes are started and stopped
  by the autoscaler as raylets on this machine.

``ray.cluster_utils.AutoscalingCluster`` does the latter too, but runs ``ray stop --force``
on start and shutdown, which kills *every* Ray process of the machine (other users' too),
and its wheel lacks the base ``example.yaml`` it loads. Here the head is started in this
process (so every process of the cluster descends from it and is stopped by it alone) from a
full config written out by :func:`fake_multinode_config`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from kdshield.cluster.connect import connect as connect_

HEAD_TYPE = "ray.head.default"


@contextlib.contextmanager
def token_auth() -> Iterator[None]:
    """Ray token authentication on for a cluster started from this process (and this driver).

    ``ray.init()`` turns it on by default for the local clusters it starts (Ray >= 2.59), but
    clusters started node by node (``ray.cluster_utils.Cluster``, an autoscaling head) get it
    only from ``RAY_AUTH_MODE=token`` in the environment their processes inherit. The token is
    Ray's default one (``~/.ray/auth_token``, generated if missing).
    """
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
    from ray._raylet import Config

    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")
    ensure_token_if_auth_enabled()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
        Config.initialize("")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def multinode_cluster(worker_cpus: list[float], *, head_cpus: float = 0,
                      connect: bool = True) -> Iterator[Any]:
    """A ``ray.cluster_utils.Cluster`` with a head of ``head_cpus`` CPUs and one worker node per
    entry of ``worker_cpus``; the driver is connected through :func:`kdshield.cluster.connect`.

    Ray must not be initialised in this process already. Everything is stopped on exit.
    """
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        raise RuntimeError("multinode_cluster: call ray.shutdown() first")
    node_args = {"object_store_memory": 200 * 1024**2, "include_dashboard": False}
    with token_auth():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, **node_args})
        try:
            for cpus in worker_cpus:
                cluster.add_node(num_cpus=cpus, object_store_memory=node_args["object_store_memory"])
            cluster.wait_for_nodes()
            if connect:
                connect_(cluster.address)
            yield cluster
        finally:
            if ray.is_initialized():
                ray.shutdown()
            cluster.shutdown()


def fake_multinode_config(*, head_cpus: float, worker_types: dict[str, dict[str, Any]], gcs_address: str,
                          max_workers: int, idle_timeout_minutes: float = 0.1,
                          upscaling_speed: float = 1.0) -> dict[str, Any]:
    """A complete autoscaler config for the ``fake_multinode`` provider.

    ``worker_types`` maps a node type name to ``{"resources": {"CPU": 2}, "min_workers": 0,
    "max_workers": 3}``. Every key the autoscaler reads is present, so nothing is filled in from
    the (missing) packaged defaults.
    """
    types = {HEAD_TYPE: {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}}
    for name, spec in worker_types.items():
        types[name] = {"node_config": {}, "min_workers": 0, **copy.deepcopy(spec)}
    return {
        "cluster_name": "kdshield-fake",
        "max_workers": max_workers,
        "upscaling_speed": upscaling_speed,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {},
        "available_node_types": types,
        "head_node_type": HEAD_TYPE,
        "docker": {},
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


class LocalAutoscalingCluster:
    """Ray's real autoscaler over the ``fake_multinode`` provider, on this machine.

    >>> with LocalAutoscalingCluster(head_cpus=0, worker_types={"cpu2": {"resources": {"CPU": 2},
    ...                                "max_workers": 3}}, max_workers=3) as cluster:
    ...     connect(cluster.address)

    ``update_interval_s`` is the autoscaler's loop period (``AUTOSCALER_UPDATE_INTERVAL_S``).
    """

    def __init__(self, *, head_cpus: float, worker_types: dict[str, dict[str, Any]], max_workers: int,
                 idle_timeout_minutes: float = 0.1, upscaling_speed: float = 1.0,
                 update_interval_s: int = 1):
        self.port = free_port()
        import ray._private.services as services

        self.address = f"{services.get_node_ip_address()}:{self.port}"
        self.config = fake_multinode_config(head_cpus=head_cpus, worker_types=worker_types,
                                            gcs_address=self.address, max_workers=max_workers,
                                            idle_timeout_minutes=idle_timeout_minutes,
                                            upscaling_speed=upscaling_speed)
        self.update_interval_s = update_interval_s
        self.head = None
        self._dir = None

    def start(self) -> "LocalAutoscalingCluster":
        import ray._private.node
        import ray._private.parameter

        self._auth = token_auth()
        self._auth.__enter__()
        self._dir = tempfile.mkdtemp(prefix="kdshield-autoscaler-")
        config_path = Path(self._dir, "autoscaler.json")
        config_path.write_text(json.dumps(self.config, indent=1))
        # The monitor (autoscaler) process inherits this process's environment.
        saved = {k: os.environ.get(k) for k in ("RAY_FAKE_CLUSTER", "AUTOSCALER_UPDATE_INTERVAL_S")}
        os.environ.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S=str(int(self.update_interval_s)))
        try:
            head_cpus = self.config["available_node_types"][HEAD_TYPE]["resources"]["CPU"]
            params = ray._private.parameter.RayParams(
                num_cpus=head_cpus, num_gpus=0, gcs_server_port=self.port, include_dashboard=False,
                autoscaling_config=str(config_path), object_store_memory=200 * 1024**2,
                min_worker_port=0, max_worker_port=0)
            self.head = ray._private.node.Node(params, head=True, shutdown_at_exit=True, spawn_reaper=True)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return self

    def shutdown(self) -> None:
        """Stop the worker nodes the autoscaler started, then the head (only this cluster's processes)."""
        import psutil

        if self.head is None:
            return
        from ray._private import ray_constants

        # Worker nodes' processes are children of the monitor (the autoscaler launched them).
        spawned = []
        for info in self.head.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []):
            with contextlib.suppress(psutil.Error):
                spawned += psutil.Process(info.process.pid).children(recursive=True)
        self.head.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
        for proc in spawned:
            with contextlib.suppress(psutil.Error):
                if proc.is_running():
                    proc.terminate()
        _, alive = psutil.wait_procs(spawned, timeout=10)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        self.head = None
        self._auth.__exit__(None, None, None)

    def __enter__(self) -> "LocalAutoscalingCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self.shutdown()


def wait_for(predicate, timeout: float, interval: float = 0.5) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
