"""The autoscaling experiment: Ray's real autoscaler under a Tune search bigger than the cluster.

:func:`run_experiment` starts a :class:`~kdshield.cluster.local.LocalAutoscalingCluster`
(``fake_multinode`` provider: the autoscaler launches and removes raylets on this machine),
waits for its ``min_workers`` nodes, then runs a Ray Tune search of ``trials`` function trials
(each holds ``cpus_per_trial`` CPUs for ``trial_seconds`` and reports once a second), more than
the starting nodes hold. A sampler thread records, every ``sample_s``: live worker nodes, total
and used CPUs, the autoscaler's pending demand (resource requests it cannot place, nodes being
launched) and running trials. After the search it keeps sampling until the autoscaler has
removed the idle nodes again (``idle_timeout_minutes``). Written to ``OUT``:

- ``timeline.json``: settings, samples and a summary (time to first added node, time to full
  scale, time back down after the search, peaks), times in seconds from the search's start;
- ``timeline.png``: nodes, running trials and pending CPU demand over time.
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

NODE_TYPE = "cpu_worker"


class ExperimentSettings(BaseModel):
    """One autoscaling experiment."""

    model_config = ConfigDict(extra="forbid")

    trials: int = Field(8, ge=1, description="trials of the search")
    trial_seconds: float = Field(20.0, gt=0, le=3600, description="how long each trial holds its CPUs")
    cpus_per_trial: int = Field(1, ge=1)
    node_cpus: int = Field(2, ge=1, description="CPUs of each worker node the autoscaler adds")
    min_workers: int = Field(0, ge=0, description="worker nodes the cluster starts with (and keeps)")
    max_workers: int = Field(3, ge=1, description="most worker nodes the autoscaler may add")
    idle_timeout_minutes: float = Field(0.1, gt=0, description="idle time before a node is removed")
    sample_s: float = Field(1.0, gt=0, le=60)
    scale_down_timeout_s: float = Field(180.0, gt=0, description="how long to wait for the scale-down")

    @model_validator(mode="after")
    def _check(self) -> "ExperimentSettings":
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers={self.min_workers} is above max_workers={self.max_workers}")
        if self.cpus_per_trial > self.node_cpus:
            raise ValueError(f"cpus_per_trial={self.cpus_per_trial} is more than a node has "
                             f"(node_cpus={self.node_cpus}): no trial could ever run")
        if self.trials * self.cpus_per_trial <= self.min_workers * self.node_cpus:
            raise ValueError(f"{self.trials} trial(s) of {self.cpus_per_trial} CPU fit the starting "
                             f"{self.min_workers} node(s): nothing would scale up (raise trials)")
        return self


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


def summarise(samples: list[dict[str, Any]], settings: ExperimentSettings, search_end: float) -> dict[str, Any]:
    """Scale-up and scale-down times from the samples (seconds from the search's start)."""
    good = [s for s in samples if "worker_nodes" in s]
    start_nodes = settings.min_workers
    first_added = next((s["t"] for s in good if s["t"] >= 0 and s["worker_nodes"] > start_nodes), None)
    peak = max((s["worker_nodes"] for s in good), default=0)
    full = next((s["t"] for s in good if s["t"] >= 0 and s["worker_nodes"] >= settings.max_workers), None)
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
    }


def plot_timeline(samples: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [s for s in samples if "worker_nodes" in s]
    t = [s["t"] for s in good]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.step(t, [s["worker_nodes"] for s in good], where="post", label="worker nodes", lw=2)
    ax.step(t, [s["running_trials"] for s in good], where="post", label="running trials")
    ax.step(t, [s["pending_cpus"] for s in good], where="post", label="pending CPU demand", ls="--")
    ax.axvline(0, color="grey", lw=0.8)
    ax.axvline(summary["search_seconds"], color="grey", lw=0.8, ls=":")
    ax.text(0, ax.get_ylim()[1] * 0.95, " search starts", fontsize=8, va="top")
    ax.text(summary["search_seconds"], ax.get_ylim()[1] * 0.95, " search ends", fontsize=8, va="top")
    ax.set_xlabel("seconds from the search's start")
    ax.set_ylabel("count")
    ax.set_title("Ray autoscaler (fake_multinode) under a Tune search")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_experiment(settings: ExperimentSettings, out: str | Path, *, log=print) -> dict[str, Any]:
    """Run the experiment; write ``OUT/timeline.{json,png}``; return the JSON record."""
    import ray
    from ray import tune

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if ray.is_initialized():
        raise RuntimeError("run_experiment starts its own cluster: call ray.shutdown() first")
    worker_types = {NODE_TYPE: {"resources": {"CPU": settings.node_cpus}, "min_workers": settings.min_workers,
                                "max_workers": settings.max_workers}}
    t_setup = time.time()
    with LocalAutoscalingCluster(head_cpus=0, worker_types=worker_types, max_workers=settings.max_workers,
                                 idle_timeout_minutes=settings.idle_timeout_minutes) as cluster:
        connect(cluster.address)
        log(f"autoscaling cluster up at {cluster.address}; waiting for {settings.min_workers} starting node(s)")

        def workers_alive() -> int:
            return sum(1 for n in ray.nodes() if n.get("Alive")
                       and "node:__internal_head__" not in n.get("Resources", {}))

        if not wait_for(lambda: workers_alive() >= settings.min_workers, timeout=180):
            raise RuntimeError(f"the {settings.min_workers} starting node(s) did not come up")
        t0 = time.time()
        _TRIALS.update(running=0, finished=0)
        sampler = _Sampler(t0, settings.sample_s)
        sampler.phase = "search"
        sampler.start()
        log(f"search: {settings.trials} trials x {settings.cpus_per_trial} CPU x {settings.trial_seconds:g}s "
            f"on {settings.min_workers} node(s) of {settings.node_cpus} CPUs (max {settings.max_workers})")
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
        search_end = time.time() - t0
        sampler.phase = "idle"
        errors = sum(1 for r in results if r.error is not None)
        log(f"search done in {search_end:.1f}s ({len(results)} trials, {errors} failed); "
            f"waiting for the scale-down")
        wait_for(lambda: workers_alive() <= settings.min_workers, timeout=settings.scale_down_timeout_s, interval=1)
        time.sleep(settings.sample_s * 2)  # a sample or two at the bottom
        sampler.stop()
        ray.shutdown()
    summary = summarise(sampler.samples, settings, search_end)
    summary.update(trials=len(results), failed_trials=errors, setup_seconds=round(t0 - t_setup, 2))
    record = {"settings": settings.model_dump(), "summary": summary, "samples": sampler.samples}
    (out / "timeline.json").write_text(json.dumps(record, indent=1))
    plot_timeline(sampler.samples, summary, out / "timeline.png")
    log("; ".join(f"{k}={v}" for k, v in summary.items()))
    return record
