"""The ``kdshield`` command: parses flags, validates them into job settings, calls the library.

Bad input ends the command with one line ``kdshield: error: ...`` and exit status 2 before
any Ray work starts; any other failure exits 1 with its traceback.

Each ``cmd_*`` imports its job inside the function: the jobs import Ray, DeepSpeed and Optuna
(seconds to load), which ``--help``, ``--version`` and a refused flag should not wait for.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kdshield import __version__, defenses, list_defenses
from kdshield.config import ScalingSettings, load_yaml, parse_assignments, parse_settings
from kdshield.errors import InputError
from kdshield.search_spaces import space_path


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows every option's default, read from the command's settings
    model (``job_model``, "module:Class") only when help is printed: importing a job takes seconds
    that other uses of the command should not wait for."""

    job_model: str | None = None

    def format_help(self) -> str:
        if self.job_model:
            import importlib

            module, _, name = self.job_model.partition(":")
            fields = model_fields(getattr(importlib.import_module(module), name))
            for action in self._actions:
                if action.dest not in fields or action.help == argparse.SUPPRESS:
                    continue
                value, description = fields[action.dest]
                text = action.help or (description or "").replace("%", "%%")
                if not (value is None or action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction)
                        or "default" in text):
                    text = f"{text} (default {value})".replace("%", "%%") if text else f"(default {value})"
                action.help = text.strip() or None
        return super().format_help()


def model_fields(model) -> dict[str, tuple[Any, str | None]]:
    """A settings model's fields as name -> (default or None when required, description); nested
    settings (training, scaling) by their own field names, the outer model's winning a clash."""
    from pydantic import BaseModel

    top, nested = {}, {}
    for name, field in model.model_fields.items():
        value = None if field.is_required() else field.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            nested.update({k: (getattr(value, k), f.description) for k, f in type(value).model_fields.items()})
        elif not isinstance(value, (dict, list)):
            top[name] = (value, field.description)
    return {**nested, **top}


SCALING_FLAGS = ["workers", "cpus_per_worker", "gpus_per_worker", "zero", "bf16", "address", "in_process",
                 "grad_accum", "gradient_checkpointing", "offload"]


def _add_scaling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where it runs")
    g.add_argument("--workers", type=int, help="Ray Train workers per stage (default 1)")
    g.add_argument("--cpus-per-worker", type=float,
                   help="CPUs (training threads) per worker (default: every core for one CPU worker on a local "
                        "Ray, else 1)")
    g.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                   help="train in this process rather than a Ray Train worker group, which restarts a worker "
                        "that died (default: in process for one CPU worker on a local Ray)")
    g.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (default 0)")
    g.add_argument("--zero", type=int, help="DeepSpeed ZeRO stage 0-3 (default 0)")
    g.add_argument("--bf16", action="store_true", default=None, help="bf16 mixed precision")
    g.add_argument("--grad-accum", type=int, metavar="N", help="micro-batches per optimizer step (default 1)")
    g.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward pass (less memory, more compute)")
    g.add_argument("--offload", choices=["none", "optimizer", "optimizer+params"],
                   help="ZeRO-Offload of GPU memory to CPU: optimizer state (ZeRO 1-3), and parameters (ZeRO 3)")
    g.add_argument("--address", help="Ray cluster address (auto, ray://host:10001); default: start a local Ray")


def _add_training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--max-length", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any setting, e.g. training.weight_decay=0.01 (repeatable)")
    g.add_argument("--config", help="YAML file of settings (flags and --set override it)")


def _picked(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"training.lr": 1}`` -> ``{"training": {"lr": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def job_values(args: argparse.Namespace, top: list[str]) -> dict[str, Any]:
    """Settings from --config, then flags, then --set (later wins), nested for pydantic."""
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    flags = _picked(args, top)
    flags["training"] = _picked(args, ["epochs", "lr", "batch_size", "max_length", "seed"])
    flags["scaling"] = _picked(args, SCALING_FLAGS)
    if "seed" in flags["training"]:
        flags["seed"] = flags["training"]["seed"]
    values = _merge(values, {k: v for k, v in flags.items() if v != {}})
    return _merge(values, _nest(parse_assignments(getattr(args, "set", None))))


# -- commands -------------------------------------------------------------------------------

def cmd_data_build(args: argparse.Namespace) -> int:
    from kdshield.datasets import build_corpus

    stats = build_corpus(args.name, args.out, seed=args.seed, test_fraction=args.test_fraction)
    print(f"{args.name}: " + ", ".join(f"{k}={v}" for k, v in stats.items() if isinstance(v, (int, str))))
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from kdshield.evaluation import markdown_table
    from kdshield.trainables.attack import AttackJob, run_attack

    values = job_values(args, ["train", "test", "model", "out", "attack", "trigger_preset", "num_insertions", "position",
                               "target_label", "poison_rate", "clean_label", "dev_fraction", "num_labels",
                               "overwrite", "lora"])
    if args.trigger is not None:
        values["triggers"] = ([t.strip() for t in args.trigger.split(",")] if (args.attack or "badnet") == "badnet"
                              else [args.trigger])
    job = parse_settings(AttackJob, values, source="attack")
    metrics = run_attack(job)
    print(markdown_table([{"model": job.model, "attack": job.attack, "poison rate": job.poison_rate,
                           "CACC %": metrics["cacc"], "ASR %": metrics["asr"],
                           "no-trigger ASR %": metrics.get("asr_no_trigger"), "seconds": metrics["seconds"]}]))
    print(f"run written to {job.out}")
    return 0


def cmd_defend(args: argparse.Namespace) -> int:
    from kdshield.evaluation import markdown_table
    from kdshield.trainables.defend import DefendJob, run_defend

    top = ["method", "run", "model", "train", "clean", "test", "triggered_test", "target_label", "num_labels",
           "out", "overwrite", "teacher_outputs", "lora", "pad_to"]
    values = load_yaml(args.config) if args.config else {}
    params = dict(values.pop("params", {}) or {})
    if args.preset:  # the preset's settings first: the config's and --set win over them
        params = {**defenses.preset(args.method or values.get("method"), args.preset), **params}
    params.update({k: values.pop(k) for k in list(values) if k not in top and k != "scaling"})
    flags = _picked(args, top)
    scaling = _picked(args, SCALING_FLAGS)
    for key, value in parse_assignments(args.set).items():
        if key.startswith("scaling."):
            scaling[key.split(".", 1)[1]] = value
        else:
            params[key] = value
    values = _merge(values, flags)
    values["scaling"] = _merge(values.get("scaling", {}), scaling)
    values["params"] = params
    job = parse_settings(DefendJob, values, source="defend")
    metrics = run_defend(job)
    row = {"method": job.method, "CACC %": metrics["cacc"], "ASR %": metrics.get("asr"),
           "no-trigger ASR %": metrics.get("asr_no_trigger"), "FAR %": metrics.get("far"),
           "FRR %": metrics.get("frr"), "seconds": metrics["seconds"]}
    print(markdown_table([row]))
    print(f"defended model written to {job.out}/model")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from kdshield.trainables.tune import TuneJob, run_tune

    top = ["method", "run", "out", "num_samples", "space", "objective", "sampler", "scheduler", "asha_metric",
           "grace_period", "reduction_factor", "max_concurrent", "cpus_per_trial", "storage", "study_name", "resume",
           "seed", "val_fraction", "probe_n", "cache", "trial_retries", "checkpoint_interval_s", "canary_rate",
           "canary_epochs", "report_asr"]
    values = _merge(load_yaml(args.config) if args.config else {}, _picked(args, top))
    if args.no_shared_work:
        values["shared_work"] = False
    values["fixed"] = {**(values.get("fixed") or {}), **parse_assignments(args.set)}
    values["probe"] = {**(values.get("probe") or {}), **parse_assignments(args.probe_set)}
    values["scaling"] = _merge(values.get("scaling") or {}, _picked(args, SCALING_FLAGS))
    summary = run_tune(parse_settings(TuneJob, values, source="tune"))
    print(f"{summary['finished_trials']} finished trial(s) in {args.out}; "
          f"stage cache {summary['cache']['stage']['hits']} hit(s) / {summary['cache']['stage']['misses']} miss(es)")
    print(f"next: kdshield report {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from kdshield.evaluation.tune_report import write_report

    written = write_report(args.dirs, out=args.out)
    print(written["markdown_text"])
    print("written: " + ", ".join(str(p) for k, p in written.items() if k != "markdown_text"))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from kdshield.cluster.memory import GIB, estimate_memory
    from kdshield.evaluation import markdown_table
    from kdshield.models.loading import load_config
    from kdshield.models.lora import suspect_lora

    scaling = parse_settings(ScalingSettings, _picked(args, SCALING_FLAGS), source="plan")
    gpu = scaling.gpus_per_worker > 0
    targets = suspect_lora(args.model, args.lora, args.num_labels).target_modules if args.lora else ()
    plan = estimate_memory(load_config(args.model), num_labels=args.num_labels, workers=scaling.workers,
                           zero=scaling.zero, bf16=scaling.bf16, lora_r=args.lora, lora_targets=tuple(targets),
                           batch_size=args.batch_size, max_length=args.max_length, offload=scaling.offload,
                           gradient_checkpointing=scaling.gradient_checkpointing, gpu=gpu,
                           teacher_rows=args.teacher_rows, teacher_hidden=args.teacher_hidden)
    f = plan.facts
    print(f"{args.model}: {f['parameters'] / 1e6:,.1f}M parameters, {f['trained'] / 1e6:,.2f}M trained"
          + (f" (LoRA r {args.lora} on {'+'.join(targets)} and the head)" if args.lora else "")
          + f"; {scaling.workers} worker(s), ZeRO-{scaling.zero}, {'bf16' if scaling.bf16 else 'fp32'}, micro-batch "
          f"{args.batch_size} x {args.max_length} tokens" + (f", grad-accum {scaling.grad_accum}" if scaling.grad_accum > 1
                                                             else ""))
    print(markdown_table(plan.rows()))
    print(f"per worker: {plan.device_total / GIB:.2f} GiB of {'GPU' if gpu else 'CPU'} memory"
          + (" before the CUDA context (~0.5-1 GiB)" if gpu else " (the process itself included)")
          + "; the arithmetic and what it was checked against: kdshield/cluster/memory.py")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kdshield.demo import run_demo

    run_demo(out=args.out, overwrite=args.overwrite)
    return 0


def cmd_cluster_render(args: argparse.Namespace) -> int:
    from kdshield.cluster.render import render_to_file

    path = render_to_file(args.kind, args.out, parse_assignments(args.set))
    print(f"{args.kind} config written to {path}")
    return 0


def cmd_cluster_experiment(args: argparse.Namespace) -> int:
    from kdshield.experiment import ExperimentSettings, run_experiment

    values = _merge(load_yaml(args.config) if args.config else {},
                    _picked(args, ["trials", "trial_seconds", "cpus_per_trial", "node_cpus", "min_workers",
                                   "max_workers", "idle_timeout_minutes", "upscaling_speed", "compare_fixed"]))
    settings = parse_settings(ExperimentSettings, values, source="cluster experiment")
    record = run_experiment(settings, args.out)
    for name, cost in record.get("cost", {}).items():
        if isinstance(cost, dict):
            print(f"{name} cluster: {cost['node_seconds']:.0f} node-seconds, {cost['wall_s']:.0f} s wall")
    print(f"timeline written to {args.out}/timeline.json and timeline.png")
    return 0


def _add_cluster(sub) -> None:
    from kdshield.cluster.render import SETTINGS

    cluster = sub.add_parser("cluster", help="deployable cluster configs; autoscaling experiment")
    csub = cluster.add_subparsers(dest="cluster_command", required=True)
    lines = [f"{kind}: " + ", ".join(f"{k} (default {v[0]!r})" for k, v in settings.items())
             for kind, settings in SETTINGS.items()]
    render = csub.add_parser("render", help="write a cluster launcher / KubeRay config",
                             description="Settings per kind -- " + "; ".join(lines))
    render.add_argument("kind", choices=sorted(SETTINGS))
    render.add_argument("--out", required=True, help="file to write")
    render.add_argument("--set", action="append", metavar="KEY=VALUE", help="a template setting (repeatable)")
    render.set_defaults(func=cmd_cluster_render)

    exp = csub.add_parser("experiment", help="Ray's autoscaler (fake_multinode) under a search: timeline and "
                                             "cost against a fixed cluster")
    exp.add_argument("--out", required=True, help="directory for timeline.json and timeline.png")
    exp.add_argument("--config", help="EXPERIMENT.yaml: the cluster settings below and `search:` (kdshield tune "
                                      "settings: a real defense search as the load); flags override it")
    exp.add_argument("--trials", type=int, help="without search: sleep trials of the load (default 8)")
    exp.add_argument("--trial-seconds", type=float, help="without search: seconds each trial holds its CPUs "
                                                         "(default 20)")
    exp.add_argument("--cpus-per-trial", type=int, help="without search: CPUs each sleep trial holds (default 1)")
    exp.add_argument("--node-cpus", type=int, help="CPUs of each added node (default 2)")
    exp.add_argument("--min-workers", type=int, help="worker nodes to start with (default 0)")
    exp.add_argument("--max-workers", type=int, help="most worker nodes (default 3)")
    exp.add_argument("--idle-timeout-minutes", type=float, help="idle time before removal (default 0.1)")
    exp.add_argument("--upscaling-speed", type=float, help="nodes added at once per node there is (default 1)")
    exp.add_argument("--no-fixed", dest="compare_fixed", action="store_const", const=False,
                     help="skip the same load on a fixed cluster of max-workers nodes")
    exp.set_defaults(func=cmd_cluster_experiment)


def _verbose_flag() -> argparse.ArgumentParser:
    """``--verbose`` accepted after a command too (it only sets what the top-level flag sets)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show everything (Ray's and the libraries' logs, progress bars, Tune's tables)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdshield", description="Remove backdoors from language models by "
                                     "knowledge distillation, on Ray Train, Ray Tune and DeepSpeed.")
    parser.add_argument("--version", action="version", version=f"kdshield {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show everything: Ray's and the libraries' own logs and progress bars, Tune's status "
                             "tables (also accepted after the command)")
    sub = parser.add_subparsers(dest="command", required=True)
    loud = [_verbose_flag()]

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    build = data.add_parser("build", help="build a packaged real corpus into DIR/{train,test}.parquet")
    build.add_argument("name", help="rotten-tomatoes, cr, r8, ...")
    build.add_argument("--out", required=True)
    build.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default %(default)s)")
    build.add_argument("--test-fraction", type=float, default=0.2,
                       help="share of the corpus held out as test, for corpora without a given split "
                            "(default %(default)s)")
    build.set_defaults(func=cmd_data_build)

    attack = sub.add_parser("attack", help="implant a backdoor, write a RUN directory", parents=loud)
    attack.add_argument("--train", required=True)
    attack.add_argument("--test", required=True)
    attack.add_argument("--model", help="preset (minilm, smollm2-135m, tiny-bert, ...), local dir or hub id")
    attack.add_argument("--attack", choices=["badnet", "addsent"], help="default badnet")
    attack.add_argument("--trigger", help="trigger text; for badnet a comma-separated word list")
    attack.add_argument("--trigger-preset", choices=["w2s-word", "w2s-sentence"],
                        help="W2SDefense's triggers: w2s-word = badnet 'mn', w2s-sentence = addsent "
                             "'I watched this 3D movie' (sets --attack)")
    attack.add_argument("--num-insertions", type=int, help="badnet: trigger words inserted per sample")
    attack.add_argument("--position", choices=["random", "start", "end"])
    attack.add_argument("--target-label", type=int)
    attack.add_argument("--poison-rate", type=float)
    attack.add_argument("--clean-label", action="store_true", default=None)
    attack.add_argument("--dev-fraction", type=float)
    attack.add_argument("--num-labels", type=int)
    attack.add_argument("--out", required=True)
    attack.add_argument("--overwrite", action="store_true", default=None)
    attack.add_argument("--lora", type=int, metavar="R")
    _add_training(attack)
    _add_scaling(attack)
    attack.set_defaults(func=cmd_attack)
    attack.job_model = "kdshield.trainables.attack:AttackJob"

    defend = sub.add_parser("defend", help="remove a backdoor by distillation, write OUT", parents=loud)
    defend.add_argument("--method", choices=defenses.names(), metavar="METHOD",
                        help="the defense (or `method:` in --config): "
                             + "; ".join(f"{name}: {summary}" for name, summary in list_defenses().items()))
    defend.add_argument("--run", help="a RUN directory from `kdshield attack` (supplies model and data)")
    defend.add_argument("--model", help="the suspect model (local HF dir, safetensors) without --run")
    defend.add_argument("--train", help="the suspect training set")
    defend.add_argument("--clean", help="clean samples the defender trusts")
    defend.add_argument("--test", help="clean test set")
    defend.add_argument("--triggered-test", help="triggered test set, for ASR")
    defend.add_argument("--target-label", type=int, help="the attack's target label, for ASR")
    defend.add_argument("--num-labels", type=int)
    defend.add_argument("--teacher-outputs", choices=["cached", "live"],
                        help="cached (default): teachers evaluated once by batch inference")
    defend.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="a method setting, e.g. alpha=0.3, target_frr=0.05 (repeatable)")
    defend.add_argument("--config", help="YAML job file (method, params, scaling); flags override it")
    defend.add_argument("--preset", help="named settings packaged with the method, found by a search "
                                         "(robustkd, mbtsad: searched); --config params and --set override them")
    defend.add_argument("--out", required=True)
    defend.add_argument("--overwrite", action="store_true", default=None)
    defend.add_argument("--lora", type=int, metavar="R")
    defend.add_argument("--pad-to", type=int, metavar="N")
    _add_scaling(defend)
    defend.set_defaults(func=cmd_defend)
    defend.job_model = "kdshield.trainables.defend:DefendJob"

    _add_cluster(sub)

    tune = sub.add_parser("tune", help="search a defense's hyperparameters (Ray Tune + Optuna), write OUT",
                          parents=loud)
    tune.add_argument("--method", choices=[m for m in defenses.names() if space_path(m).is_file()],
                      help="the defense whose settings are searched (or `method:` in --config)")
    tune.add_argument("--run", help="a RUN directory from `kdshield attack` (or `run:` in --config)")
    tune.add_argument("--config", help="YAML file of TuneJob settings (method, run, num_samples, fixed, probe, "
                                       "scaling, ...); flags override it, --set adds to its `fixed`")
    tune.add_argument("--num-samples", type=int, help="trials in the whole search (default 16)")
    tune.add_argument("--space", help="search-space YAML (default: the packaged one of the method)")
    tune.add_argument("--set", action="append", metavar="KEY=VALUE",
                      help="fix a method setting for every trial, e.g. batch_size=8 (repeatable)")
    tune.add_argument("--objective", choices=["defender", "canary", "asr", "cacc", "asr+cacc"],
                      help="defender (default): trigger-free score; canary: plant a known backdoor and score its "
                           "removal; asr, cacc, asr+cacc: the truth, on benchmark RUNs")
    tune.add_argument("--sampler", choices=["tpe", "nsga2", "random"])
    tune.add_argument("--scheduler", choices=["asha", "none"], help="early stopping (default asha)")
    tune.add_argument("--asha-metric", choices=["defender_score", "canary_score", "asr", "cacc"])
    tune.add_argument("--canary-rate", type=float, help="canary: share of clean training rows given its trigger")
    tune.add_argument("--canary-epochs", type=int, help="canary: epochs of fine-tuning that plant it")
    tune.add_argument("--report-asr", action="store_true", default=None,
                      help="benchmark RUNs: estimate ASR at every epoch report too (never optimised)")
    tune.add_argument("--grace-period", type=int)
    tune.add_argument("--reduction-factor", type=float)
    tune.add_argument("--max-concurrent", type=int, help="trials at once (default: what fits)")
    tune.add_argument("--cpus-per-trial", type=float, help="CPUs for each trial's own driver (default 0)")
    tune.add_argument("--trial-retries", type=int, help="retries of a trial whose process died, each resuming "
                      "its stages from their checkpoints (default 2)")
    tune.add_argument("--checkpoint-interval-s", type=float, help="seconds between a trial stage's checkpoints "
                      "(0: every epoch; default 60)")
    tune.add_argument("--storage", help="SQLAlchemy URL of the Optuna study (default sqlite:///OUT/study.db)")
    tune.add_argument("--study-name")
    tune.add_argument("--resume", action="store_true", default=None, help="continue the search in OUT")
    tune.add_argument("--no-shared-work", action="store_true", help="no stage cache across trials")
    tune.add_argument("--cache", help="stage-cache directory (default OUT/cache); searches may share one")
    tune.add_argument("--seed", type=int)
    tune.add_argument("--val-fraction", type=float, help="clean share held out for the defender score")
    tune.add_argument("--probe-n", type=int, help="most suspicious samples flagged by the probe")
    tune.add_argument("--probe-set", action="append", metavar="KEY=VALUE", help="a BeDKD setting of the probe")
    tune.add_argument("--out", required=True)
    _add_scaling(tune)
    tune.set_defaults(func=cmd_tune)
    tune.job_model = "kdshield.trainables.tune:TuneJob"

    report = sub.add_parser("report", help="tables and plots of finished searches", parents=loud)
    report.add_argument("dirs", nargs="+", metavar="DIR", help="OUT directories of `kdshield tune`")
    report.add_argument("--out", help="where to write (default: report/ in the first DIR)")
    report.set_defaults(func=cmd_report)

    plan = sub.add_parser("plan", help="memory per worker of a training stage, from the model's config alone")
    plan.add_argument("--model", required=True, help="preset, local directory or hub id (only config.json is read)")
    plan.add_argument("--lora", type=int, metavar="R", help="a rank-R adapter on the attention projections (and the "
                                                            "head) instead of training every weight")
    plan.add_argument("--batch-size", type=int, default=32, help="micro-batch per worker (default %(default)s)")
    plan.add_argument("--max-length", type=int, default=64, help="tokens per sample (default %(default)s)")
    plan.add_argument("--num-labels", type=int, default=2, help="classes (default %(default)s)")
    plan.add_argument("--teacher-rows", type=int, default=0, help="rows whose teacher outputs a defense caches")
    plan.add_argument("--teacher-hidden", type=int, default=0, help="cached feature width per row (W2SDefense: the "
                                                                     "teacher's hidden size)")
    for flag, kw in (("--workers", {"type": int, "help": "data-parallel workers (default 1)"}),
                     ("--gpus-per-worker", {"type": float, "help": "GPU workers (fused attention, no CPU process "
                                                                   "counted); default 0: CPU workers"}),
                     ("--zero", {"type": int, "choices": [0, 1, 2, 3], "help": "DeepSpeed ZeRO stage (default 0)"}),
                     ("--bf16", {"action": "store_true", "default": None, "help": "bf16 (fp32 otherwise)"}),
                     ("--grad-accum", {"type": int, "metavar": "N", "help": "micro-batches per step (default 1)"}),
                     ("--gradient-checkpointing", {"action": "store_true", "default": None}),
                     ("--offload", {"choices": ["none", "optimizer", "optimizer+params"]})):
        plan.add_argument(flag, **kw)
    plan.set_defaults(func=cmd_plan)

    demo = sub.add_parser("demo", help="the whole story, small and local", parents=loud)
    demo.add_argument("--out", default="kdshield-demo", help="directory for everything (default %(default)s)")
    demo.add_argument("--overwrite", action="store_true", help="replace a demo directory kdshield wrote")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        import os

        from kdshield.outputs import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
    try:
        return args.func(args)
    except InputError as err:
        print(f"kdshield: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdshield: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
