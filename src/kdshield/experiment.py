"""The autoscaling experiment: Ray's real autoscaler under a search bigger than the cluster.

:func:`run_experiment` starts a :class:`~kdshield.cluster.local.LocalAutoscalingCluster`
(``fake_multinode`` provider: the autoscaler launches and removes raylets on this machine),
waits for its ``min_workers`` nodes, then runs the load:

- ``search``: a real defense search, ``kdshield tune`` with the settings given (method, RUN,
  trials, fixed settings, the trials' scaling); its probe, stages and trials ask the cluster for
  what they need, and the autoscaler adds nodes for it;
- without ``search``: ``trials`` function trials that each hold ``cpus_per_trial`` CPUs for
  ``trial_seconds`` (the autoscaler and Tune's scheduling alone, in seconds).

A sampler thread records, every ``sample_s``: live worker nodes, total and used CPUs, the
autoscaler's pending demand (resource requests it cannot place, nodes being launched) and
running trials. After the load it keeps sampling until the autoscaler has removed the idle
nodes again (``idle_timeout_minutes``). With ``compare_fixed`` the same load then runs again on
a fixed cluster of ``max_workers`` nodes (started before the clock starts, as a standing cluster
is), so the cost of each is measured in one run: node-seconds (worker nodes alive, integrated
from the load's start until the autoscaler has scaled back down, or the load's end on the
fixed cluster; the head is the same in both and not counted) and wall time. Written to ``OUT``:

- ``timeline.json``: settings, samples and a summary (time to first added node, time to full
  scale, time back down after the load, peaks) of each cluster, and ``cost``; times in
  seconds from the load's start;
- ``timeline.png``: nodes, running trials and pending CPU demand over time, one panel per cluster;
- ``autoscaling/``, ``fixed/``: each search's directory (trials, study, stage cache).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdshield.cluster.connect import connect
from kdshield.cluster.local import LocalAutoscalingCluster, wait_for
from kdshield.errors import InputError
from kdshield.outputs import check_replaceable, check_writable, staged

NODE_TYPE = "cpu_worker"


class ExperimentSettings(BaseModel):
    """One autoscaling experiment: the load, the cluster, and whether to compare a fixed one."""

    model_config = ConfigDict(extra="forbid")

    search: dict[str, Any] | None = Field(None, description=(
        "the load: a real defense search, as `kdshield tune` settings (method, run, num_samples, fixed, "
        "scaling, ...; out, cache and the cluster address are the experiment's); without it, sleep trials"))
    trials: int = Field(8, ge=1, description="sleep load: trials of the search")
    trial_seconds: float = Field(20.0, gt=0, le=3600, description="sleep load: how long each trial holds its CPUs")
    cpus_per_trial: int = Field(1, ge=1, description="sleep load: CPUs each trial holds")
    node_cpus: int = Field(2, ge=1, description="CPUs of each worker node the autoscaler adds")
    min_workers: int = Field(0, ge=0, description="worker nodes the cluster starts with (and keeps)")
    max_workers: int = Field(3, ge=1, description="most worker nodes the autoscaler may add")
    idle_timeout_minutes: float = Field(0.1, gt=0, description="idle time before a node is removed")
    upscaling_speed: float = Field(1.0, gt=0, description="nodes the autoscaler may add at once, per node it has")
    compare_fixed: bool = Field(True, description="run the same load on a fixed cluster of max_workers nodes too")
    sample_s: float = Field(1.0, gt=0, le=60)
    scale_down_timeout_s: float = Field(180.0, gt=0, description="how long to wait for the scale-down")

    @model_validator(mode="after")
    def _check(self) -> "ExperimentSettings":
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers={self.min_workers} is above max_workers={self.max_workers}")
        if self.search is not None:
            return self
        if self.cpus_per_trial > self.node_cpus:
            raise ValueError(f"cpus_per_trial={self.cpus_per_trial} is more than a node has "
                             f"(node_cpus={self.node_cpus}): no trial could ever run")
        if self.trials * self.cpus_per_trial <= self.min_workers * self.node_cpus:
            raise ValueError(f"{self.trials} trial(s) of {self.cpus_per_trial} CPU fit the starting "
                             f"{self.min_workers} node(s): nothing would scale up (raise trials)")
        return self

    def tune_job(self, out: Path, address: str | None = None):
        """The search load as a :class:`~kdshield.trainables.tune.TuneJob` writing to ``out`` (its stage
        cache inside it: each cluster's search computes every stage itself), on the cluster at ``address``.
        By default as many trials run at once as the full cluster holds."""
        from kdshield.config import parse_settings
        from kdshield.trainables.tune import TuneJob

        values = {**(self.search or {}), "out": str(out), "cache": str(out / "cache")}
        values["scaling"] = {**(values.get("scaling") or {}), "address": address or "auto"}
        job = parse_settings(TuneJob, values, source="cluster experiment: search")
        if job.scaling.cpus_per_worker > self.node_cpus:
            raise InputError(f"cluster experiment: search: a worker needs {job.scaling.cpus_per_worker:g} CPUs, "
                             f"more than a node has (node_cpus={self.node_cpus})")
        if job.max_concurrent is None:
            fits = (self.node_cpus // job.scaling.cpus_per_worker) * self.max_workers // job.scaling.workers
            job = job.model_copy(update={"max_concurrent": max(1, min(job.num_samples, int(fits)))})
        return job


def _sleep_trial(config: dict[str, Any]) -> None:
    """A trial that holds its resources for ``seconds`` and reports every second."""
    from ray import tune

    t0 = time.time()
    step = 0
    while time.time() - t0 < config["seconds"]:
        time.sleep(min(1.0, config["seconds"]))
        step += 1
        tune.report({"step": step, "x": config["x"]})


class _Sampler:
    """Samples the cluster (and the running-trial count kept by a Tune callback) in a thread."""

    def __init__(self, t0: float, sample_s: float):
        self.t0, self.sample_s = t0, sample_s
        self.samples: list[dict[str, Any]] = []
        self.phase = "idle"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def sample(self) -> dict[str, Any]:
        import ray
        from ray.experimental.internal_kv import _internal_kv_get

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        workers = [n for n in nodes if "node:__internal_head__" not in n.get("Resources", {})]
        total = ray.cluster_resources().get("CPU", 0.0)
        free = ray.available_resources().get("CPU", 0.0)
        pending_cpus, launching = 0.0, 0
        raw = _internal_kv_get("__autoscaling_status")
        if raw:
            status = json.loads(raw)
            load = status.get("load_metrics_report") or {}
            for demand in (load.get("resource_demand") or []):  # [[{"CPU": 1}, count], ...]
                bundle, count = demand
                pending_cpus += bundle.get("CPU", 0) * count
            for demand in (load.get("pg_demand") or []):  # [[{"bundles": [[{"CPU": 1}, n]], ...}, count]]
                group, count = demand
                for bundle, n in group.get("bundles", []):
                    pending_cpus += bundle.get("CPU", 0) * n * count
            report = status.get("autoscaler_report") or {}
            launching = sum((report.get("pending_launches") or {}).values()) + len(report.get("pending_nodes") or [])
        return {"t": round(time.time() - self.t0, 2), "phase": self.phase, "worker_nodes": len(workers),
                "cpus_total": total, "cpus_used": total - free, "pending_cpus": pending_cpus,
                "launching_nodes": launching, "running_trials": _TRIALS["running"],
                "finished_trials": _TRIALS["finished"]}

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.sample())
            except Exception as err:  # a sample lost to a node going away is not fatal
                self.samples.append({"t": round(time.time() - self.t0, 2), "error": str(err)[:200]})
            self._stop.wait(self.sample_s)


# Trial counts of the search running in this process, kept by the Tune callback below (which
# Tune pickles with its state: it holds no reference to the sampler and its thread).
_TRIALS = {"running": 0, "finished": 0}


def _trial_callback():
    from ray.tune import Callback

    class TrialCounter(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            _TRIALS["running"] += 1

        def on_trial_complete(self, iteration, trials, trial, **info):
            _TRIALS["running"] -= 1
            _TRIALS["finished"] += 1

        def on_trial_error(self, iteration, trials, trial, **info):
            _TRIALS["running"] -= 1

    return TrialCounter()


def node_seconds(samples: list[dict[str, Any]], until: float) -> float:
    """Worker nodes alive, integrated over the samples from the load's start (t=0) to ``until`` (each
    sample's count held until the next sample)."""
    good = [s for s in samples if "worker_nodes" in s]
    total = 0.0
    for here, after in zip(good, good[1:] + [{"t": until}]):
        a, b = max(here["t"], 0.0), min(after["t"], until)
        if b > a:
            total += here["worker_nodes"] * (b - a)
    return round(total, 1)


def summarise(samples: list[dict[str, Any]], start_nodes: int, max_workers: int,
              search_end: float) -> dict[str, Any]:
    """Scale-up and scale-down times from the samples (seconds from the load's start)."""
    good = [s for s in samples if "worker_nodes" in s]
    first_added = next((s["t"] for s in good if s["t"] >= 0 and s["worker_nodes"] > start_nodes), None)
    peak = max((s["worker_nodes"] for s in good), default=0)
    full = next((s["t"] for s in good if s["t"] >= 0 and s["worker_nodes"] >= max_workers), None)
    down = next((s["t"] for s in good if s["t"] >= search_end and s["worker_nodes"] <= start_nodes), None)
    return {
        "start_worker_nodes": start_nodes,
        "peak_worker_nodes": peak,
        "peak_running_trials": max((s["running_trials"] for s in good), default=0),
        "peak_pending_cpus": max((s["pending_cpus"] for s in good), default=0),
        "scaled_up": first_added is not None,
        "reached_max_workers": full is not None,
        "scaled_down": down is not None,
        "time_to_first_added_node_s": first_added,
        "time_to_full_scale_s": full,
        "search_seconds": round(search_end, 2),
        "time_to_scale_down_after_search_s": None if down is None else round(down - search_end, 2),
        # what the cluster costs: its worker nodes from the load's start until it is back to its start size
        # (not back within the timeout: until the last sample; the fixed cluster: until the load ends,
        # when it would be torn down)
        "node_seconds": node_seconds(good, search_end if start_nodes == max_workers else
                                     down if down is not None else max((s["t"] for s in good), default=search_end)),
    }


def plot_timeline(runs: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """One panel per cluster (``runs``: name -> {summary, samples}): nodes, running trials, pending CPUs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 3.2 * len(runs)), sharex=True, squeeze=False)
    for ax, (name, run) in zip(axes[:, 0], runs.items()):
        good = [s for s in run["samples"] if "worker_nodes" in s]
        summary = run["summary"]
        t = [s["t"] for s in good]
        ax.step(t, [s["worker_nodes"] for s in good], where="post", label="worker nodes", lw=2)
        ax.step(t, [s["running_trials"] for s in good], where="post", label="running trials")
        ax.step(t, [s["pending_cpus"] for s in good], where="post", label="pending CPU demand", ls="--")
        ax.axvline(0, color="grey", lw=0.8)
        ax.axvline(summary["search_seconds"], color="grey", lw=0.8, ls=":")
        top = max([1] + [max(s["worker_nodes"], s["running_trials"], s["pending_cpus"]) for s in good]) + 0.5
        ax.set_ylim(0, top)
        ax.text(0, top * 0.97, " load starts", fontsize=8, va="top")
        ax.text(summary["search_seconds"], top * 0.97, " load ends", fontsize=8, va="top")
        ax.set_ylabel("count")
        ax.set_title(f"{name}: {summary['node_seconds']:.0f} node-seconds, {summary['search_seconds']:.0f} s",
                     fontsize=9)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("seconds from the load's start")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_experiment(settings: ExperimentSettings, out: str | Path, *, log=print) -> dict[str, Any]:
    """Run the experiment; write ``OUT/timeline.{json,png}`` (``OUT`` built beside it and published
    whole when the experiment ends; it may replace only a directory kdshield wrote); return the record."""
    import ray

    out = Path(out).resolve()
    check_writable(out)
    check_replaceable(out, what="cluster experiment replaces", own=("timeline.*", "tune", "autoscaling", "fixed"))
    if settings.search is not None:  # every check that needs no cluster, before one starts
        from kdshield.trainables.tune import validate

        validate(settings.tune_job(out / "autoscaling"))
    if ray.is_initialized():
        raise RuntimeError("run_experiment starts its own cluster: call ray.shutdown() first")
    with staged(out) as work:
        runs = {"autoscaling": _one_cluster(settings, work / "autoscaling", settings.min_workers, log)}
        if settings.compare_fixed:
            runs["fixed"] = _one_cluster(settings, work / "fixed", settings.max_workers, log)
        load = f"{settings.search['method']} search" if settings.search is not None else "sleep-trial search"
        record = {"settings": settings.model_dump(), "load": load, **runs["autoscaling"]}
        if "fixed" in runs:
            record["fixed"] = runs["fixed"]
            record["cost"] = {name: {"node_seconds": run["summary"]["node_seconds"],
                                     "wall_s": run["summary"]["search_seconds"]} for name, run in runs.items()}
            record["cost"]["node_seconds_ratio"] = round(
                runs["autoscaling"]["summary"]["node_seconds"] / max(runs["fixed"]["summary"]["node_seconds"], 1e-9),
                3)
        (work / "timeline.json").write_text(json.dumps(record, indent=1))
        plot_timeline(runs, work / "timeline.png", f"Ray autoscaler (fake_multinode) under a {load}")
    return record


def _one_cluster(settings: ExperimentSettings, out: Path, start_workers: int, log) -> dict[str, Any]:
    """The load on one cluster that starts with ``start_workers`` nodes (``max_workers``: a fixed one);
    returns ``{summary, samples}``."""
    import ray

    kind = "fixed" if start_workers == settings.max_workers else "autoscaling"
    worker_types = {NODE_TYPE: {"resources": {"CPU": settings.node_cpus}, "min_workers": start_workers,
                                "max_workers": settings.max_workers}}
    t_setup = time.time()
    with LocalAutoscalingCluster(head_cpus=0, worker_types=worker_types, max_workers=settings.max_workers,
                                 idle_timeout_minutes=settings.idle_timeout_minutes,
                                 upscaling_speed=settings.upscaling_speed) as cluster:
        connect(cluster.address)
        log(f"{kind} cluster up at {cluster.address}; waiting for {start_workers} starting node(s)")

        def workers_alive() -> int:
            return sum(1 for n in ray.nodes() if n.get("Alive")
                       and "node:__internal_head__" not in n.get("Resources", {}))

        if not wait_for(lambda: workers_alive() >= start_workers, timeout=180):
            raise RuntimeError(f"the {start_workers} starting node(s) did not come up")
        t0 = time.time()
        _TRIALS.update(running=0, finished=0)
        sampler = _Sampler(t0, settings.sample_s)
        sampler.phase = "search"
        sampler.start()
        log(f"{kind}: load starts on {start_workers} node(s) of {settings.node_cpus} CPUs "
            f"(max {settings.max_workers})")
        trials, errors = (_search_load if settings.search is not None else _sleep_load)(settings, out, cluster.address)
        search_end = time.time() - t0
        sampler.phase = "idle"
        log(f"{kind}: load done in {search_end:.1f}s ({trials} trials, {errors} failed)"
            + ("; waiting for the scale-down" if start_workers < settings.max_workers else ""))
        if start_workers < settings.max_workers:
            wait_for(lambda: workers_alive() <= start_workers, timeout=settings.scale_down_timeout_s, interval=1)
        time.sleep(settings.sample_s * 2)  # a sample or two at the bottom
        sampler.stop()
        ray.shutdown()
    summary = summarise(sampler.samples, start_workers, settings.max_workers, search_end)
    summary.update(trials=trials, failed_trials=errors, setup_seconds=round(t0 - t_setup, 2))
    log(f"{kind}: " + "; ".join(f"{k}={v}" for k, v in summary.items()))
    return {"summary": summary, "samples": sampler.samples}


def _sleep_load(settings: ExperimentSettings, out: Path, address: str) -> tuple[int, int]:
    from ray import tune

    trainable = tune.with_resources(_sleep_trial, {"cpu": settings.cpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        param_space={"seconds": settings.trial_seconds, "x": tune.grid_search(list(range(settings.trials)))},
        tune_config=tune.TuneConfig(),
        # a trial placed on a node the autoscaler is just removing (short idle timeouts race)
        # dies with it; it is retried on another, as a real search's trials would be
        run_config=tune.RunConfig(name="autoscaling", storage_path=str(out / "tune"),
                                  failure_config=tune.FailureConfig(max_failures=2),
                                  callbacks=[_trial_callback()], verbose=0))
    results = tuner.fit()
    return len(results), sum(1 for r in results if r.error is not None)


def _search_load(settings: ExperimentSettings, out: Path, address: str) -> tuple[int, int]:
    """``kdshield tune`` on this cluster: its probe, stages and trials are the demand."""
    from kdshield.trainables.tune import run_tune

    job = settings.tune_job(out, address)
    summary = run_tune(job, callbacks=[_trial_callback()])
    return job.num_samples, summary["failed_trials"]
