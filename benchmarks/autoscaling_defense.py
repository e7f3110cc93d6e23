"""Autoscaling with real defense jobs: a small defense search on Ray's autoscaler against a fixed cluster.

Runs ``kdshield cluster experiment --config EXPERIMENT.yaml`` (:func:`run_experiment`): Ray's real
autoscaler (``fake_multinode``: its nodes are raylets on this machine) starting from no worker
node, under a real ``kdshield tune`` search (default: NAD, 6 trials, on a tiny-bert RUN backdoored
here with BadNet on 600 Rotten Tomatoes rows), then the same search on a fixed cluster of the
maximum size, each with its own fresh stage cache. Nodes have 1 CPU and there are at most 2, so
the fake cluster at full size holds what this 2-core machine has; a trial's stages are Ray Train
runs of one 1-CPU worker, the demand the autoscaler sees.

Written: ``benchmarks/results/autoscaling_defense.{json,md,png}`` (the JSON's keys: ``method``,
``trials``, ``autoscaling`` and ``fixed``, each ``{node_seconds, wall_s}``, then the details) and
``autoscaling_defense.yaml``, the experiment file itself (its ``run`` is this machine's path).

    python benchmarks/autoscaling_defense.py [--method nad] [--model tiny-bert] [--trials 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Fixed for every trial: a small teacher/distillation budget, so a trial is a few Ray Train stages of
# seconds (the cost measured here is the cluster's, not the model's). The rest is the packaged space.
BUDGETS = {"nad": {"teacher_epochs": 2, "teacher_lr": 5e-5, "evaluate_teacher": False, "epochs": 4,
                   "batch_size": 16, "max_length": 48},
           "bedkd": {"n_c_dmm": 40, "n_c": 40, "dmm_epochs": 4, "akd_cycles": 3, "batch_size": 16,
                     "max_length": 48}}
PROBE = {"n_c_dmm": 40, "dmm_epochs": 4, "batch_size": 16, "max_length": 48}  # the defender score's DMM


def build_run(work: Path, model: str) -> tuple[Path, dict]:
    """A small backdoored RUN (BadNet 10%, target 1) of ``model`` on 600/200 Rotten Tomatoes rows."""
    from _cells import corpus_subset

    from kdshield.trainables.attack import AttackJob, run_attack

    data = corpus_subset(work, "rotten-tomatoes", 600, 200)
    run = data.parent / "badnet" / f"run-{model}"
    if (run / "metrics.json").is_file():
        return run, json.loads((run / "metrics.json").read_text())
    return run, run_attack(AttackJob(
        train=str(data / "train.parquet"), test=str(data / "test.parquet"), model=model, out=str(run),
        attack="badnet", poison_rate=0.1, target_label=1,
        training={"epochs": 3, "lr": 1e-4 if model == "minilm" else 1e-3, "batch_size": 16, "max_length": 48},
        scaling={"workers": 1, "cpus_per_worker": 2}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=sorted(BUDGETS), default="nad")
    ap.add_argument("--model", default="tiny-bert", help="tiny-bert or minilm")
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--node-cpus", type=int, default=1)
    ap.add_argument("--max-workers", type=int, default=2)
    ap.add_argument("--idle-timeout-minutes", type=float, default=0.2)
    ap.add_argument("--work", default=str(HERE / "work" / "autoscaling_defense"))
    args = ap.parse_args()

    from kdshield.experiment import ExperimentSettings, run_experiment
    from kdshield.evaluation import markdown_table

    work = Path(args.work)
    run, attack = build_run(work, args.model)
    import ray

    ray.shutdown()  # the attack's local Ray: the experiment starts clusters of its own
    config = {
        "search": {"method": args.method, "run": str(run), "num_samples": args.trials, "fixed": BUDGETS[args.method],
                   "probe": PROBE, "grace_period": 1, "scaling": {"workers": 1, "cpus_per_worker": 1}},
        "node_cpus": args.node_cpus, "min_workers": 0, "max_workers": args.max_workers,
        "idle_timeout_minutes": args.idle_timeout_minutes, "upscaling_speed": 1.0, "compare_fixed": True}
    out = HERE / "results"
    (out / "autoscaling_defense.yaml").write_text(
        "# kdshield cluster experiment --config benchmarks/results/autoscaling_defense.yaml --out DIR\n"
        "# (written by benchmarks/autoscaling_defense.py; `run` is the RUN it built)\n"
        + yaml.safe_dump(config, sort_keys=False))
    shutil.rmtree(work / "experiment", ignore_errors=True)
    record = run_experiment(ExperimentSettings(**config), work / "experiment")
    cost = record["cost"]
    result = {"method": args.method, "trials": args.trials,
              "autoscaling": cost["autoscaling"], "fixed": cost["fixed"],
              "node_seconds_ratio": cost["node_seconds_ratio"],
              "command": " ".join(["python", "benchmarks/autoscaling_defense.py", *sys.argv[1:]]),
              "model": args.model, "run": {"rows": "600 train / 200 test, Rotten Tomatoes, BadNet 10%",
                                           "cacc": attack.get("cacc"), "asr": attack.get("asr")},
              "experiment": config, "summaries": {"autoscaling": record["summary"],
                                                  "fixed": record["fixed"]["summary"]}}
    (out / "autoscaling_defense.json").write_text(json.dumps(result, indent=1) + "\n")
    shutil.copy(work / "experiment" / "timeline.png", out / "autoscaling_defense.png")
    rows = [{"cluster": name, "node-seconds": cost[name]["node_seconds"], "wall (s)": cost[name]["wall_s"],
             "peak nodes": s["peak_worker_nodes"], "peak running trials": s["peak_running_trials"],
             "first node added (s)": s["time_to_first_added_node_s"],
             "back down after the search (s)": s["time_to_scale_down_after_search_s"],
             "failed trials": s["failed_trials"]}
            for name, s in result["summaries"].items()]
    md = (f"# A real {args.method} search on Ray's autoscaler vs a fixed cluster\n\n`{result['command']}`\n\n"
          f"{args.trials} trials of `kdshield tune --method {args.method}` (budget `{json.dumps(BUDGETS[args.method])}`, "
          f"ASHA grace 1) on a {args.model} RUN ({result['run']['rows']}; CACC {attack.get('cacc')}, ASR "
          f"{attack.get('asr')}), each stage a Ray Train run of one 1-CPU worker. Clusters: a head of 0 CPUs and "
          f"worker nodes of {args.node_cpus} CPU; autoscaling from 0 to {args.max_workers} nodes (idle timeout "
          f"{args.idle_timeout_minutes:g} min, upscaling speed 1) against {args.max_workers} nodes standing from the "
          "start. Node-seconds: worker nodes alive from the search's start until the autoscaler has removed them "
          "again (fixed: until the search ends); the head is the same in both and not counted. Both ran in one "
          "script run, one after the other, each with a fresh stage cache.\n\n"
          + markdown_table(rows)
          + f"\n\nAutoscaling / fixed node-seconds: {cost['node_seconds_ratio']:.2f}. Timeline: "
          "`autoscaling_defense.png`. A fake node is a raylet started on this machine in seconds; a cloud VM "
          "takes minutes, which the autoscaling wall time would add at every scale-up. Repeat it on a cloud: "
          "README, Running on a cluster.\n")
    (out / "autoscaling_defense.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
