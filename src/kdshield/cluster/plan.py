"""Resource plans: how many workers, CPUs/GPUs each, and concurrent trials a cluster can hold.

A plan is checked against the resources of the connected cluster (``ray.nodes()``) before any
training starts; a job that can never be placed fails at once with one :class:`InputError`
line instead of hanging in Ray's scheduler waiting for resources that will never come.

Placement follows Ray's placement-group semantics, as Ray Train uses them (one bundle of
``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs per worker):

- ``PACK`` / ``SPREAD``: bundles may land on any nodes (the strategies are preferences);
- ``STRICT_PACK``: all of a trial's bundles on one node;
- ``STRICT_SPREAD``: each of a trial's bundles on a different node.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from kdshield.cluster.connect import started_local
from kdshield.config import ScalingSettings
from kdshield.errors import InputError

EPS = 1e-6


@dataclass(frozen=True)
class NodeResources:
    """What one Ray node (or one node type an autoscaler may add) offers."""

    node_id: str
    cpus: float
    gpus: float = 0.0
    is_head: bool = False


@dataclass(frozen=True)
class ResourcePlan:
    """A checked plan. ``concurrent_trials`` is what a search should use as its
    ``max_concurrent_trials``; ``fit_now`` how many trials the cluster holds at this moment."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    placement_strategy: str
    concurrent_trials: int
    requested_trials: int
    fit_now: int
    trial_driver_cpus: float
    autoscaler: bool | None  # None: could not tell (then nothing is refused)
    nodes: int
    cluster_cpus: float
    cluster_gpus: float
    notes: tuple[str, ...] = field(default=())

    def worker_bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker > 0:
            bundle["GPU"] = self.gpus_per_worker
        return bundle

    def trial_bundles(self) -> list[dict[str, float]]:
        """Placement-group bundles of one trial: its driver (if it reserves CPUs), then its workers."""
        driver = [{"CPU": self.trial_driver_cpus}] if self.trial_driver_cpus > 0 else []
        return driver + [self.worker_bundle() for _ in range(self.workers)]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["notes"] = list(self.notes)
        return out

    def summary(self) -> str:
        gpu = f", {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        text = (f"{self.concurrent_trials} trial(s) at once x {self.workers} worker(s) "
                f"({self.cpus_per_worker:g} CPU{gpu} each, {self.placement_strategy}) on {self.nodes} node(s)"
                + (" + autoscaler" if self.autoscaler else ""))
        return "; ".join([text, *self.notes])


def cluster_nodes() -> list[NodeResources]:
    """The connected cluster's live nodes and their total CPUs/GPUs (Ray must be initialised)."""
    import ray

    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        nodes.append(NodeResources(node_id=node["NodeID"], cpus=float(res.get("CPU", 0)),
                                   gpus=float(res.get("GPU", 0)),
                                   is_head="node:__internal_head__" in res))
    return nodes


def detect_autoscaler() -> bool | None:
    """Whether the connected cluster runs an autoscaler that can add nodes; ``None``: cannot tell.

    A local Ray that :func:`kdshield.cluster.connect` started has none. Otherwise Ray's
    autoscaler monitor publishes its status in the GCS key-value store every few seconds: the
    read-only monitor of a fixed cluster names its nodes' types ``node_<id>``, a real autoscaler
    (cluster launcher, KubeRay, ``fake_multinode``) names the node types of its config. With
    autoscaler v2 enabled, the cluster autoscales.
    """
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if started_local():
        return False
    if os.environ.get("RAY_enable_autoscaler_v2", "0") not in ("", "0"):
        return True
    if not _internal_kv_initialized():
        return None
    raw = _internal_kv_get("__autoscaling_status")
    try:
        report = json.loads(raw).get("autoscaler_report") if raw else None
    except ValueError:
        report = None
    if not report:
        return None
    types = set((report.get("node_type_mapping") or {}).values())
    types |= set(((report.get("node_availability_summary") or {}).get("node_availabilities") or {}))
    types |= set(report.get("pending_launches") or {})
    return any(not t.startswith("node_") for t in types)


def _fits(free: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + EPS >= v for k, v in bundle.items())


def _take(free: dict[str, float], bundle: dict[str, float]) -> None:
    for k, v in bundle.items():
        free[k] = free.get(k, 0.0) - v


def _place_trial(free: list[dict[str, float]], bundles: list[dict[str, float]], strategy: str,
                 n_driver: int) -> bool:
    """Place one trial's bundles into ``free`` (mutated on success); False if they do not fit."""
    trial = [dict(f) for f in free]
    drivers, workers = bundles[:n_driver], bundles[n_driver:]
    if strategy == "STRICT_PACK":
        for node in sorted(range(len(trial)), key=lambda i: (trial[i].get("CPU", 0))):
            total = {}
            for b in workers:
                for k, v in b.items():
                    total[k] = total.get(k, 0.0) + v
            if _fits(trial[node], total):
                _take(trial[node], total)
                break
        else:
            return False
    elif strategy == "STRICT_SPREAD":
        used: set[int] = set()
        for b in workers:
            choice = next((i for i in sorted(range(len(trial)), key=lambda i: -trial[i].get("CPU", 0))
                           if i not in used and _fits(trial[i], b)), None)
            if choice is None:
                return False
            used.add(choice)
            _take(trial[choice], b)
    else:  # PACK, SPREAD: soft preferences, any node will do
        for b in workers:
            choice = next((i for i in range(len(trial)) if _fits(trial[i], b)), None)
            if choice is None:
                return False
            _take(trial[choice], b)
    for b in drivers:
        choice = next((i for i in range(len(trial)) if _fits(trial[i], b)), None)
        if choice is None:
            return False
        _take(trial[choice], b)
    free[:] = trial
    return True


def _capacity(nodes: Iterable[NodeResources], bundles, strategy, n_driver, limit: int) -> int:
    free = [{"CPU": n.cpus, "GPU": n.gpus} for n in nodes]
    count = 0
    while count < limit and _place_trial(free, bundles, strategy, n_driver):
        count += 1
    return count


def plan_resources(scaling: ScalingSettings, concurrent_trials: int = 1, autoscaler: bool | None = None, *,
                   nodes: list[NodeResources] | None = None,
                   node_types: list[NodeResources] | None = None,
                   trial_driver_cpus: float = 0.0) -> ResourcePlan:
    """Plan ``concurrent_trials`` trials of ``scaling.workers`` workers each on the cluster.

    Args:
        scaling: workers per trial, ``cpus_per_worker``, ``gpus_per_worker`` and
            ``placement_strategy`` (what :func:`kdshield.trainables.engine.run_stage` asks Ray Train for).
        concurrent_trials: how many trials the caller would like to run at once (1 for a
            single ``attack``/``defend`` job; a search's ``max_concurrent_trials``).
        autoscaler: whether the cluster can add nodes. ``None``: detect it from the connected
            cluster (:func:`detect_autoscaler`); when that cannot tell either, nothing is
            refused. With an autoscaler, trials beyond what fits now are planned to run
            concurrently (the autoscaler adds nodes for them).
        nodes: the cluster's nodes; default: the connected cluster's live nodes
            (:func:`cluster_nodes`, Ray must be initialised). Pass them to plan offline.
        node_types: with an autoscaler, the shapes of the nodes it can add; when given, a
            worker must fit on one of them (or on an existing node).
        trial_driver_cpus: CPUs reserved by each trial's own driver process (a Tune function
            trainable), placed anywhere; 0 for jobs whose driver needs none (Ray Train's
            controller reserves 0 CPUs).

    Returns:
        a :class:`ResourcePlan`; ``concurrent_trials`` is the number of trials to run at once
        (capped by what fits when there is no autoscaler: the rest queue), ``fit_now`` how many
        fit the current nodes.

    Raises:
        InputError: one line, when not even one trial can ever be placed: a worker needs more
            CPUs/GPUs than any node (or node type) has, ``STRICT_SPREAD`` needs more nodes than
            there are, ``STRICT_PACK`` needs more than one node holds, or the trial needs more
            than the whole cluster has, and there is no autoscaler to add nodes.
    """
    if concurrent_trials < 1:
        raise InputError(f"concurrent trials={concurrent_trials}: must be at least 1")
    if nodes is None:
        nodes = cluster_nodes()
    if autoscaler is None:
        autoscaler = detect_autoscaler()
    plan = ResourcePlan(workers=scaling.workers, cpus_per_worker=scaling.cpus_per_worker,
                        gpus_per_worker=scaling.gpus_per_worker, placement_strategy=scaling.placement_strategy,
                        concurrent_trials=concurrent_trials, requested_trials=concurrent_trials, fit_now=0,
                        trial_driver_cpus=trial_driver_cpus, autoscaler=autoscaler, nodes=len(nodes),
                        cluster_cpus=sum(n.cpus for n in nodes), cluster_gpus=sum(n.gpus for n in nodes))
    bundles = plan.trial_bundles()
    n_driver = 1 if trial_driver_cpus > 0 else 0
    fit_now = _capacity(nodes, bundles, scaling.placement_strategy, n_driver, concurrent_trials)
    notes: list[str] = []
    worker = plan.worker_bundle()
    need = f"{scaling.cpus_per_worker:g} CPU(s)" + (f" and {scaling.gpus_per_worker:g} GPU(s)"
                                                     if scaling.gpus_per_worker else "")
    if autoscaler is None:
        notes.append("could not tell whether the cluster autoscales; nothing refused")
        return _replace(plan, fit_now=fit_now, notes=tuple(notes))
    if autoscaler:
        shapes = list(nodes) + list(node_types or [])
        if node_types is not None and not any(_fits({"CPU": n.cpus, "GPU": n.gpus}, worker) for n in shapes):
            raise InputError(f"scaling: a worker needs {need}, more than any node or node type the "
                             f"autoscaler can add ({_largest(shapes)})")
        if node_types is None:
            notes.append("autoscaler: node shapes unknown, assuming it can add nodes that fit")
        if fit_now < concurrent_trials:
            notes.append(f"{fit_now} of {concurrent_trials} trial(s) fit now; the autoscaler adds the rest")
        return _replace(plan, fit_now=fit_now, notes=tuple(notes))
    if fit_now == 0:
        raise InputError(_why_not(scaling, nodes, need, trial_driver_cpus))
    if fit_now < concurrent_trials:
        notes.append(f"only {fit_now} of {concurrent_trials} trial(s) fit at once; the rest queue")
    return _replace(plan, fit_now=fit_now, concurrent_trials=fit_now, notes=tuple(notes))


def _replace(plan: ResourcePlan, **changes) -> ResourcePlan:
    from dataclasses import replace

    return replace(plan, **changes)


def _largest(nodes: list[NodeResources]) -> str:
    if not nodes:
        return "the cluster has no nodes"
    cpus = max(n.cpus for n in nodes)
    gpus = max(n.gpus for n in nodes)
    return f"largest: {cpus:g} CPU(s), {gpus:g} GPU(s)"


def _why_not(scaling: ScalingSettings, nodes: list[NodeResources], need: str, driver_cpus: float) -> str:
    """The one line that says why no trial can ever be placed on these nodes (no autoscaler)."""
    worker = {"CPU": scaling.cpus_per_worker, "GPU": scaling.gpus_per_worker}
    fitting = [n for n in nodes if _fits({"CPU": n.cpus, "GPU": n.gpus}, worker)]
    where = f"{len(nodes)} node(s), {_largest(nodes)}, no autoscaler"
    if not fitting:
        return f"scaling: a worker needs {need} but no node has that much ({where})"
    if scaling.placement_strategy == "STRICT_SPREAD" and len(fitting) < scaling.workers:
        return (f"scaling: placement_strategy=STRICT_SPREAD puts {scaling.workers} workers on {scaling.workers} "
                f"different nodes, but only {len(fitting)} node(s) have {need} ({where})")
    if scaling.placement_strategy == "STRICT_PACK":
        return (f"scaling: placement_strategy=STRICT_PACK puts {scaling.workers} workers of {need} on one node, "
                f"but no node holds them all ({where})")
    total_cpus = scaling.workers * scaling.cpus_per_worker + driver_cpus
    return (f"scaling: {scaling.workers} worker(s) of {need}"
            + (f" plus a {driver_cpus:g}-CPU trial driver" if driver_cpus else "")
            + f" need {total_cpus:g} CPU(s) in all; the cluster has {sum(n.cpus for n in nodes):g} "
            f"in {len(nodes)} node(s) and no autoscaler")
