"""Autoscaling timeline: Ray's real autoscaler (fake_multinode) under a Tune search.

Runs :func:`kdshield.experiment.run_experiment` (what `kdshield cluster experiment`
runs): a head with 0 CPUs and no worker nodes, worker nodes of 2 CPUs (at most 3), and a search of
8 one-CPU trials of 20 s each: more than the cluster holds at the start (nothing) and at full
scale (6). Reported: time to the first added node, time to full scale, time back to zero worker
nodes after the search, from the samples the experiment records every second.

    python benchmarks/autoscaling.py   # writes benchmarks/results/autoscaling.{json,md,png}
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--trial-seconds", type=float, default=20)
    ap.add_argument("--node-cpus", type=int, default=2)
    ap.add_argument("--max-workers", type=int, default=3)
    ap.add_argument("--idle-timeout-minutes", type=float, default=0.1)
    ap.add_argument("--work", default=str(HERE / "work" / "autoscaling"))
    args = ap.parse_args()

    from kdshield.experiment import ExperimentSettings, run_experiment
    from kdshield.evaluation import markdown_table

    settings = ExperimentSettings(trials=args.trials, trial_seconds=args.trial_seconds, node_cpus=args.node_cpus,
                                  max_workers=args.max_workers, idle_timeout_minutes=args.idle_timeout_minutes)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    record = run_experiment(settings, work)
    s = record["summary"]
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "autoscaling.json").write_text(json.dumps(record, indent=1))
    shutil.copy(work / "timeline.png", out / "autoscaling.png")
    row = {"time to first added node (s)": s["time_to_first_added_node_s"],
           "time to full scale (s)": s["time_to_full_scale_s"],
           "search (s)": s["search_seconds"],
           "time to scale back down after the search (s)": s["time_to_scale_down_after_search_s"],
           "peak nodes": s["peak_worker_nodes"], "peak running trials": s["peak_running_trials"]}
    md = (f"# Autoscaling (Ray autoscaler v1, fake_multinode provider, one machine)\n\n"
          f"{settings.trials} trials x {settings.cpus_per_trial} CPU x {settings.trial_seconds:g} s; "
          f"head 0 CPUs, worker nodes of {settings.node_cpus} CPUs, {settings.min_workers} to "
          f"{settings.max_workers}; idle timeout {settings.idle_timeout_minutes:g} min; autoscaler loop 1 s. "
          f"Times from the search's start (scale-down: from the search's end).\n\n"
          + markdown_table([row])
          + f"\n\nScaled up: {s['scaled_up']}, reached max nodes: {s['reached_max_workers']}, scaled down: "
          f"{s['scaled_down']}; {s['trials']} trials, {s['failed_trials']} failed. Timeline: `autoscaling.png`.\n"
          "A fake node is a raylet started on this machine (seconds); a cloud VM takes minutes, so only the "
          "autoscaler's decisions, not the provisioning times, carry over.\n")
    (out / "autoscaling.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
