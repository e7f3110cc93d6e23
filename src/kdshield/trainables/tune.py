"""``kdshield tune``: search a defense's hyperparameters with Ray Tune + Optuna, durably.

Shape of a search (OUT is ``--out``):

- **Search space**: :func:`kdshield.search_spaces.load_space` (packaged YAML or ``--space``),
  validated before anything runs; ``--set key=value`` fixes more settings for every trial.
- **Sampler**: ``OptunaSearch`` with TPE for one objective (``defender``: maximise the
  trigger-free :mod:`defender score <kdshield.trainables.objective>`; ``canary``: maximise the
  :mod:`canary score <kdshield.trainables.canary>`, every trial defending the suspect with the
  defender's own known backdoor planted in it; ``asr``: minimise;
  ``cacc``: maximise) or NSGA-II (or TPE) for ``asr+cacc`` (ASR down, CACC up together);
  ``random`` for baselines.
- **Early stopping**: ASHA on a scalar every trial reports after every epoch of the stage that
  trains the defended model (BeDKD: every AKD cycle). Those per-epoch values come from the
  engine's generic per-epoch evaluation hook (``Stage.evals``) on the probe's small held-out
  sets; only reports carrying them reach Tune, so ``training_iteration`` counts the defended
  model's epochs and increases monotonically across the stages of a trial, then once more for
  the trial's final result.
- **Trials**: each is a Tune function trainable that builds a :class:`DefendJob` and calls
  :func:`run_defend` (one TorchTrainer per stage, :class:`TuneReportCallback` in their
  RunConfig callbacks); no second training loop. Workers, CPUs/GPUs per worker, the trial
  driver's own CPUs and the number of concurrent trials are settable and checked against the
  cluster before the search starts (:func:`kdshield.cluster.plan_resources`).
- **Shared work**: one :class:`~kdshield.trainables.stage_cache.StageCache` in ``OUT/cache``
  for all trials (stages with identical inputs such as a shared BeDKD DMM, teacher outputs,
  logits).
- **Durability**: the Optuna study lives in ``--storage`` (default ``sqlite:///OUT/study.db``;
  any SQLAlchemy URL, e.g. PostgreSQL), Tune's experiment state in ``OUT/tune``. ``--resume``
  restores the Tuner (``Tuner.restore``); when Tune's state is gone but the study exists in the
  storage, a new Tuner continues the study (its sampler sees every finished trial) for the
  remaining samples. A trial writes ``OUT/trials/<id>/result.json`` when it finishes, and a
  trial that Tune re-launches after a crash finds it and reports it without training again.
- **Trial retries**: a trial whose process dies (a killed or OOM-killed Tune actor, its node
  lost) is retried by Tune up to ``--trial-retries`` times (``FailureConfig(max_failures)``);
  no other trial restarts. The retry resumes, not restarts: every stage of a trial is a Ray
  Train run under ``OUT/trials/<id>/ray`` with a name fixed per trial and stage
  (:class:`~kdshield.trainables.stage_runs.StageRuns`), so the retried trial re-attaches to
  it and Ray Train resumes it from its latest checkpoint (``--checkpoint-interval-s`` sets how
  often stages checkpoint); finished stages come from the stage cache. What a trial reported
  to Tune is kept in ``OUT/trials/<id>/reports.jsonl``: a retry does not report an epoch again
  and continues ``training_iteration`` where the trial was, so Tune's record of a trial has
  no duplicates and ASHA's clock does not restart (an epoch report still in flight when the
  process died may be missing from it). ``stage_runs.jsonl`` records every stage attempt and
  the checkpoint it started from.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from kdshield import cluster
from kdshield.cluster import NodeResources, ordered_data, plan_resources
from kdshield.config import ScalingSettings, _Settings, parse_settings, redact_url
from kdshield.defenses.bedkd.config import BeDKDConfig
from kdshield.errors import InputError
from kdshield.evaluation.objectives import OBJECTIVES, SCALAR_MODES
from kdshield.models import load_tokenizer, resolve_model
from kdshield.search_spaces import load_space
from kdshield.trainables.attack import tokenized_stream
from kdshield.trainables.defend import DefendJob, check_job, resolve_inputs, run_defend, warn_if_headless
from kdshield.trainables.durable_search import DurableOptunaSearch
from kdshield.trainables.engine import trains_in_process
from kdshield.trainables.hooks import DefenseHooks
from kdshield.trainables.objective import CANARY_DIR, build_probe, eval_tables, final_scores, from_eval_metrics
from kdshield.outputs import check_writable, say, verbose, write_json
from kdshield.trainables.stage_cache import StageCache, read_events
from kdshield.trainables.stage_runs import StageRuns

EXPERIMENT = "tune"


class TuneJob(_Settings):
    """Settings of ``kdshield tune``."""

    method: str = Field(description="the defense whose settings are searched")
    run: str = Field(description="a RUN directory of `kdshield attack` (model, data)")
    out: str = Field(description="the search directory (trials, Optuna study, stage cache)")
    num_samples: int = Field(16, ge=1, description="trials in the whole search")
    space: str | None = Field(None, description="search-space YAML; default: the packaged one of the method")
    fixed: dict[str, Any] = Field(default_factory=dict, description="settings fixed for every trial (--set)")
    objective: Literal["defender", "canary", "asr", "cacc", "asr+cacc"] = Field("defender", description=(
        "defender: the trigger-free defender score; canary: plant a known backdoor first and score its "
        "removal with clean accuracy; asr, cacc, asr+cacc: the truth (benchmark RUNs only)"))
    sampler: Literal["tpe", "nsga2", "random"] | None = Field(
        None, description="default: tpe for one objective, nsga2 for asr+cacc")
    trial_retries: int = Field(2, ge=0, description="times Tune retries a trial whose process died "
                                                     "(each retry resumes the trial's stages from their checkpoints)")
    checkpoint_interval_s: float | None = Field(
        None, ge=0, description="trials' stages checkpoint when this long has passed since the last checkpoint "
                                "(0: every epoch; default: the engine's 60 s)")
    scheduler: Literal["asha", "none"] = "asha"
    asha_metric: Literal["defender_score", "canary_score", "asr", "cacc"] | None = Field(
        None, description="the per-epoch value ASHA stops trials on (default: the objective's when it is one "
                          "scalar, else defender_score)")
    grace_period: int = Field(2, ge=1, description="ASHA: epochs before a trial can be stopped")
    reduction_factor: float = Field(3.0, gt=1, description="ASHA: 1/this of the trials go on at each rung")
    max_concurrent: int | None = Field(None, ge=1, description="default: as many trials as fit the cluster")
    cpus_per_trial: float = Field(0.0, ge=0, description="CPUs reserved by each trial's driver function")
    storage: str | None = Field(None, description="SQLAlchemy URL of the Optuna study (default sqlite in OUT)")
    study_name: str | None = Field(None, description="the Optuna study's name (default kdshield-METHOD)")
    resume: bool = False
    shared_work: bool = Field(True, description="content-hashed stage cache shared by all trials")
    cache: str | None = Field(None, description="stage-cache directory (default OUT/cache); several searches "
                                                "on the same RUN may share one")
    seed: int = 0
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of the clean data held out for the score")
    probe_n: int = Field(64, ge=1, description="at most this many flagged suspicious samples")
    probe: dict[str, Any] = Field(default_factory=dict, description="BeDKD settings of the probe's DMM")
    triggered_eval_rows: int = Field(200, ge=1, description="triggered test rows for per-epoch ASR (benchmarks)")
    report_asr: bool = Field(False, description=(
        "benchmark RUNs: every epoch report also estimates ASR on triggered_eval_rows triggered test rows, "
        "so a stopped trial's ASR is known too; reported, never optimised"))
    canary_rate: float = Field(0.2, gt=0, le=1, description="canary: share of the clean training rows that get "
                                                           "the canary trigger")
    canary_epochs: int = Field(2, ge=1, description="canary: epochs of fine-tuning that plant it")
    canary_lr: float = Field(5e-5, gt=0, le=1, description="canary: learning rate of that fine-tuning")
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)

    def identity(self, space) -> dict[str, Any]:
        """What makes two invocations the same search (resume must match it)."""
        return {"method": self.method, "run": str(Path(self.run).resolve()), "objective": self.objective,
                "sampler": self.sampler_name(), "params": {k: repr(v) for k, v in space.params.items()},
                "fixed": space.fixed, "seed": self.seed, "val_fraction": self.val_fraction,
                "probe_n": self.probe_n, "probe": self.probe,
                **({"canary": [self.canary_rate, self.canary_epochs, self.canary_lr]} if self.objective == "canary"
                   else {})}

    def measures_asr(self) -> bool:
        """Whether trials estimate ASR every epoch (the objective or ASHA needs it, or ``report_asr``)."""
        return self.report_asr or "asr" in OBJECTIVES[self.objective][0] or (
            self.scheduler == "asha" and self.scheduler_metric() == "asr")

    def scheduler_metric(self) -> str:
        """The metric ASHA stops trials on."""
        if self.asha_metric:
            return self.asha_metric
        metrics = OBJECTIVES[self.objective][0]
        return metrics[0] if len(metrics) == 1 and metrics[0] in ("defender_score", "canary_score") else \
            "defender_score"

    def canary(self, max_length: int, batch_size: int) -> dict[str, Any] | None:
        """The canary's planting settings (:func:`~kdshield.trainables.canary.plant_canary`), for
        ``--objective canary``."""
        if self.objective != "canary":
            return None
        return {"rate": self.canary_rate, "epochs": self.canary_epochs, "lr": self.canary_lr,
                "batch_size": batch_size, "max_length": max_length}

    def sampler_name(self) -> str:
        return self.sampler or ("nsga2" if self.objective == "asr+cacc" else "tpe")

    def storage_url(self) -> str:
        """``--storage``, else the URL in $KDSHIELD_STORAGE (how a password reaches the search without
        being written anywhere), else a SQLite file in OUT."""
        return self.storage or os.environ.get(STORAGE_ENV) or f"sqlite:///{Path(self.out).resolve() / 'study.db'}"

    def record(self) -> dict[str, Any]:
        """The job as written to ``OUT/tune.json``: the storage URL without its password."""
        return {**self.model_dump(mode="json"), "storage": redact_url(self.storage) if self.storage else None}


# ----------------------------------------------------------------------------- validation

STORAGE_ENV = "KDSHIELD_STORAGE"  # the study's URL, when it holds a password: never on a command line


def _check_storage(url: str) -> None:
    """The storage URL parses, its database driver is installed and (for a server) it answers:
    otherwise one InputError line, with the password hidden."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    shown = redact_url(url)
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError):
        raise InputError(f"--storage {shown}: not a SQLAlchemy URL with a known database (e.g. sqlite:///study.db, "
                         "postgresql+psycopg2://user@host:5432/db)") from None
    try:
        dialect.import_dbapi()
    except ImportError as err:
        driver = parsed.get_driver_name() or getattr(dialect, "driver", "")
        raise InputError(f"--storage {shown}: its database driver {driver!r} is not installed ({err}); install it "
                         "(psycopg2: pip install psycopg2-binary; psycopg: pip install 'psycopg[binary]') or name "
                         "the installed one in the URL, e.g. postgresql+psycopg2://") from None
    if parsed.get_backend_name() == "sqlite":
        return
    try:
        engine = create_engine(parsed, connect_args={"connect_timeout": 10} if parsed.get_backend_name() ==
                               "postgresql" else {})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except SQLAlchemyError as err:
        reason = str(getattr(err, "orig", err)).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"--storage {shown}: cannot reach the database ({_redact_text(reason, parsed)})") from None


def _redact_text(text: str, parsed) -> str:
    """``text`` with the URL's password, if any, replaced by ``***``."""
    return text.replace(parsed.password, "***") if parsed.password else text


def _local_plan(job: TuneJob, concurrent: int):
    """Resources of the local Ray that connect() will start, checked before it starts."""
    node = NodeResources("local", float(os.cpu_count() or 1), float(torch.cuda.device_count()), True)
    return plan_resources(job.scaling, concurrent, autoscaler=False, nodes=[node], trial_driver_cpus=job.cpus_per_trial)


def validate(job: TuneJob):
    """Everything that can be checked without Ray; returns (space, defend template, probe settings)."""
    space = load_space(job.method, job.space, fixed=job.fixed)
    probe = parse_settings(BeDKDConfig, {**_probe_defaults(space), **job.probe}, source="tune probe settings")
    template = DefendJob(method=job.method, run=job.run, out=str(Path(job.out) / "unused"), scaling=job.scaling)
    inputs = resolve_inputs(template)
    warn_if_headless(inputs)
    for name, p in space.params.items():  # the model-dependent checks, at every range end
        for value in p.values_to_check():
            sampled = {**{n: q.first() for n, q in space.params.items()}, name: value}
            check_job(template.model_copy(update={"params": space.settings(sampled)}), inputs)
    if job.measures_asr() and inputs.triggered is None:
        raise InputError(f"--objective {job.objective} / --asha-metric {job.scheduler_metric()}"
                         f"{' / --report-asr' if job.report_asr else ''}: the RUN has no triggered test set, so ASR "
                         "is unknown (use --objective defender or canary)")
    n_val = round(job.val_fraction * inputs.clean.num_rows)
    if n_val < job.scaling.workers or inputs.clean.num_rows - n_val < job.scaling.workers:
        raise InputError(f"--val-fraction {job.val_fraction}: the clean set ({inputs.clean.num_rows} rows) is too "
                         f"small to hold out a validation share for {job.scaling.workers} worker(s)")
    _check_storage(job.storage_url())
    return space, template, probe


def _probe_defaults(space) -> dict[str, Any]:
    """The probe runs BeDKD's DMM at the space's fixed settings where they are BeDKD's DMM fields
    (for bedkd; other methods' settings of the same name mean other things and leave it alone)."""
    if space.spec.config is not BeDKDConfig:
        return {}
    keep = set(BeDKDConfig.model_fields) - {"gamma", "target_frr", "n_p"}
    return {k: v for k, v in space.fixed.items() if k in keep}


def _check_out(job: TuneJob, identity: dict) -> str:
    """'new', 'restore' (Tune state present) or 'study' (only the study to continue)."""
    out = Path(job.out).resolve()
    record = out / "tune.json"
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    if record.is_file():
        previous = json.loads(record.read_text())
        if previous.get("identity") != json.loads(json.dumps(identity, default=str)):
            raise InputError(f"{out}: holds a different search (method, RUN, space, objective or seed differ); "
                             "choose another --out")
        if not job.resume:
            raise InputError(f"{out}: already holds this search; pass --resume to continue it")
        from ray.tune import Tuner

        return "restore" if Tuner.can_restore(str(out / EXPERIMENT)) else "study"
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f"{out}: not empty and not a search directory; choose another --out")
    if job.resume and not (job.storage or os.environ.get(STORAGE_ENV)):
        raise InputError(f"{out}: nothing to resume (no search was started there)")
    return "study" if job.resume else "new"


# ----------------------------------------------------------------------------- trials

REPORTS = "reports.jsonl"  # in a trial's directory: what it reported to Tune, over all its attempts


def _reports(trial_dir: Path) -> list[dict[str, Any]]:
    path = trial_dir / REPORTS
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short when the process died
            pass
    return rows


def _iteration(trial_dir: Path, key: str) -> tuple[int, bool]:
    """The ``training_iteration`` of the report ``key`` (``{run}/{epoch}`` or ``final``) and whether
    it is new; a new one is recorded. Iterations continue over every attempt of the trial."""
    rows = _reports(trial_dir)
    for row in rows:
        if row.get("key") == key:
            return int(row["iteration"]), False
    iteration = max((int(r["iteration"]) for r in rows), default=0) + 1
    path = trial_dir / REPORTS
    torn = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:
        f.write(("\n" if torn else "") + json.dumps({"key": key, "iteration": iteration, "time": time.time()}) + "\n")
    return iteration, True


def _trial_report(trial_dir: Path, run_name: str, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """What Tune gets for one epoch report of a stage: only reports that carry per-epoch
    evaluation metrics, turned into the search's metric names (``defender_score``, ``cacc``,
    ``asr``), each once per trial: an epoch an earlier attempt of the trial reported is not sent
    again, and ``training_iteration`` continues over attempts (see ``REPORTS``). None: nothing."""
    est = from_eval_metrics(metrics)
    if est is None:
        return None
    epoch = metrics.get("epoch")
    iteration, new = _iteration(trial_dir, f"{run_name}/{epoch}")
    return {**est, "epoch": epoch, "final": 0, "training_iteration": iteration} if new else None


def _reporter_class():
    from ray.tune.integration.ray_train import TuneReportCallback

    class TrialReporter(TuneReportCallback):
        """Forwards a worker group's epoch reports to Tune (:func:`_trial_report`). Runs in the
        Ray Train controller, on the trial's node."""

        def __init__(self, trial_dir: str):
            super().__init__()
            self._trial_dir = trial_dir

        def after_report(self, run_context, metrics, checkpoint):
            item = _trial_report(Path(self._trial_dir), run_context.run_config.name, metrics[0])
            if item is not None:
                self._training_actor_item_queue.put(item)

    return TrialReporter


def _in_process_reporter(trial_dir: Path):
    """The same forwarding for stages that train in the trial's own process."""
    import ray.tune

    def report(run_name: str, metrics: dict[str, Any]) -> None:
        item = _trial_report(trial_dir, run_name, metrics)
        if item is not None:
            ray.tune.report(item)

    return report


def _done_result(trial_dir: Path) -> dict | None:
    path = trial_dir / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One trial (runs in a Tune actor): the defense through run_defend, scored, recorded."""
    import ray.tune

    ordered_data()  # this trial's actor builds and reads its streams in the order a re-run will
    t0 = time.perf_counter()
    space, out = ctx["space"], Path(ctx["out"])
    trial_id = ray.tune.get_context().get_trial_id()
    trial_dir = out / "trials" / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    sampled = {k: v for k, v in config.items() if k in space.params}
    params = space.settings(sampled)
    write_json(trial_dir / "started.json", {"trial_id": trial_id, "sampled": sampled, "params": params})
    done = _done_result(trial_dir)
    if done is not None and done["params"] == params:
        _log_run(trial_dir, "reused")  # finished before a crash of the driver: report, do not re-train
        ray.tune.report({**done["report"], "reused": 1})
        return
    shared = out / "shared"
    canary = shared / CANARY_DIR  # --objective canary: the trial defends the canaried suspect
    job = DefendJob(method=space.method, run=ctx["run"], clean=str(shared / "clean_train.parquet"),
                    out=str(trial_dir / "defend"), params=params, scaling=ScalingSettings(**ctx["scaling"]),
                    **({"model": str(canary / "model"), "train": str(canary / "train.parquet")}
                       if (canary / "model").is_dir() else {}))
    config_obj = space.config(sampled)
    tables = eval_tables(shared)
    wanted = set(ctx["metrics"])
    if "asr" not in wanted:
        tables.pop("triggered", None)
    model_dir = resolve_model(str(Path(ctx["run"]) / "model"))
    cache = StageCache(ctx["cache"]) if ctx["cache"] else None
    streams = {name: tokenized_stream(t, model_dir, config_obj.max_length) for name, t in tables.items()
               if t.num_rows >= job.scaling.workers}
    # the stages run as Ray Train runs named per trial and stage under trial_dir/ray: a retry of
    # this trial (its process died) resumes them from their checkpoints
    runs = StageRuns(trial_dir / "ray", cache=cache, checkpoint_interval_s=ctx.get("checkpoint_interval_s"),
                     log=trial_dir / "stage_runs.jsonl")
    hooks = DefenseHooks(cache=cache, callbacks=[_reporter_class()(str(trial_dir))],
                         on_report=_in_process_reporter(trial_dir), eval_streams=streams,
                         eval_stages=tuple(ctx["final_stages"]), stage_runs=runs)
    for stale in [*trial_dir.glob(".defend.partial-*"), *trial_dir.glob(".defend.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # staging directories of attempts that died
    earlier = {"trained", "retried"} & set(_run_events(trial_dir))
    _log_run(trial_dir, "defend-reused" if (trial_dir / "defend" / "metrics.json").is_file()
             else "retried" if earlier else "trained")
    metrics = run_defend(job, hooks)
    last = {}
    for stage in ctx["final_stages"]:
        if metrics.get("history", {}).get(stage):
            last = from_eval_metrics(metrics["history"][stage][-1]) or {}
    if "defender_score" not in last:
        tok = load_tokenizer(model_dir)
        last = final_scores(str(Path(job.out) / "model"), tables, num_labels=_num_labels(ctx["run"]),
                            tokenizer_dir=model_dir, max_length=config_obj.max_length,
                            pad_ids={"input_ids": tok.pad_token_id}, padding_side=tok.padding_side,
                            cpus=job.scaling.cpus_per_worker, gpus=job.scaling.gpus_per_worker,
                            in_process=trains_in_process(job.scaling))
    report = {"cacc": metrics["cacc"], "defender_score": last.get("defender_score", float("nan")),
              "val_cacc": last.get("cacc", float("nan")), "final": 1,
              "trial_seconds": time.perf_counter() - t0, "training_iteration": _iteration(trial_dir, "final")[0]}
    if "asr" in metrics:
        report["asr"] = metrics["asr"]
    for key in ("far", "frr", "n_identified", "gamma"):
        if isinstance(metrics.get(key), (int, float)):
            report[key] = metrics[key]
    for key in ("flagged_agreement", "canary_score", "canary_asr"):
        if key in last:
            report[key] = last[key]
    if cache is not None:
        report["cache_stage_hits"] = cache.counts["stage"]["hits"]
        report["cache_saved_seconds"] = cache.saved_seconds
    write_json(trial_dir / "result.json.tmp", {"trial_id": trial_id, "sampled": sampled, "params": params,
                                               "report": report, "method": space.method,
                                               "cache": metrics.get("cache")})
    os.replace(trial_dir / "result.json.tmp", trial_dir / "result.json")
    shutil.rmtree(trial_dir / "ray", ignore_errors=True)  # the stages' Ray Train runs: no retry needs them now
    ray.tune.report({**report, "reused": 0})


def _num_labels(run: str) -> int:
    return int(json.loads((Path(run) / "attack.json").read_text())["num_labels"])


def _run_events(trial_dir: Path) -> list[str]:
    path = trial_dir / "runs.jsonl"
    events = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            events.append(json.loads(line)["event"])
        except (ValueError, KeyError):
            pass
    return events


def _log_run(trial_dir: Path, what: str) -> None:
    with open(trial_dir / "runs.jsonl", "a") as f:
        f.write(json.dumps({"event": what, "pid": os.getpid(), "time": time.time()}) + "\n")


# ----------------------------------------------------------------------------- the search

def _sampler(name: str, seed: int):
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4, multivariate=True)


def _max_t(space) -> int:
    """ASHA's horizon: the most epochs of the stage that trains the defended model (the setting the
    method registered as its epoch count), plus the final report."""
    name = space.spec.epoch_setting
    p = space.params.get(name)
    if p is not None:
        return int(max(p.values_to_check())) + 1
    return int(space.fixed.get(name, space.spec.config.model_fields[name].default)) + 1


def build_tuner(job: TuneJob, space, *, mode: str, concurrent: int, completed: int = 0, callbacks=()):
    """The Tuner of this search: new, restored from OUT/tune, or continuing the study."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    out = Path(job.out).resolve()
    metrics, modes = OBJECTIVES[job.objective]
    needed = sorted(set(metrics) | ({job.scheduler_metric()} if job.scheduler == "asha" else set())
                    | ({"asr"} if job.measures_asr() else set()))
    ctx = {"space": space, "out": str(out), "run": str(Path(job.run).resolve()),
           "scaling": job.scaling.model_dump(), "cache": _cache_dir(job) if job.shared_work else None,
           "final_stages": list(space.spec.final_stages), "metrics": needed,
           "checkpoint_interval_s": job.checkpoint_interval_s}
    # A trial's own driver needs next to nothing (Ray Train's controller reserves 0 CPUs); Tune
    # refuses an all-zero request, so a zero-CPU trial asks for 1 MiB of memory instead. A trial
    # whose stages train in its own process reserves no more: its Ray Data tasks (tokenising,
    # mapping streams) need the CPUs between stages, and the plan's concurrency already counts
    # the CPUs its training uses.
    request = {"CPU": job.cpus_per_trial} if job.cpus_per_trial > 0 else {"CPU": 0, "memory": 2 ** 20}
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), request)
    if mode == "restore":  # Tune keeps the experiment's own RunConfig (its FailureConfig included)
        return tune.Tuner.restore(str(out / EXPERIMENT), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    storage = optuna.storages.RDBStorage(job.storage_url())
    searcher = DurableOptunaSearch(space=space.distributions(), metric=metrics if len(metrics) > 1 else metrics[0],
                                   mode=modes if len(modes) > 1 else modes[0],
                                   # continuing a study: a sampler seeded as the first run's would replay its
                                   # first random points, the very configurations the study already holds
                                   sampler=_sampler(job.sampler_name(), job.seed + completed),
                                   study_name=job.study_name or f"kdshield-{job.method}", storage=storage)
    scheduler = (ASHAScheduler(time_attr="training_iteration", metric=job.scheduler_metric(),
                               mode=SCALAR_MODES[job.scheduler_metric()], max_t=max(_max_t(space), job.grace_period),
                               grace_period=job.grace_period, reduction_factor=job.reduction_factor)
                 if job.scheduler == "asha" else FIFOScheduler())
    import ray.tune

    if not verbose():  # Tune's new output prints its boxes even at verbose=0; the legacy one is silent
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=max(1, job.num_samples - completed),
                                    max_concurrent_trials=concurrent, reuse_actors=False),
        run_config=ray.tune.RunConfig(name=EXPERIMENT, storage_path=str(out), verbose=1 if verbose() else 0,
                                      callbacks=[*callbacks, *([] if verbose() else [_progress(job, completed)])],
                                      failure_config=ray.tune.FailureConfig(max_failures=job.trial_retries)))


def _progress(job: TuneJob, completed: int):
    """A Tune callback that prints one line per trial that ends (instead of Tune's status tables):
    its score, how far it got, and the search so far (done, running, best)."""
    from ray.tune import Callback

    metric = job.scheduler_metric()
    sign = 1 if SCALAR_MODES[metric] == "max" else -1

    class Progress(Callback):
        best: float | None = None
        done = completed

        def on_trial_start(self, iteration, trials, trial, **info):
            say(f"trial {trial.trial_id} started: " + ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items()))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            last = trial.last_result or {}
            value = last.get(metric)
            finished = last.get("final") == 1
            if finished and value is not None and (self.best is None or sign * value > sign * self.best):
                self.best = value
            running = sum(t.status == "RUNNING" for t in trials if t is not trial)
            how = "finished" if finished else f"stopped early after {last.get('training_iteration', '?')} epoch(s)"
            say(f"trial {trial.trial_id} {how}: {metric} {_short(value)} ({self.done}/{job.num_samples} done, "
                f"{running} running; best finished {_short(self.best)})")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            say(f"trial {trial.trial_id} failed ({self.done}/{job.num_samples} done); its error is in {trial.path}")

    return Progress()


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def study_trials(url: str, name: str) -> list:
    """The trials of a stored Optuna study (empty when it does not exist)."""
    import optuna
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).is_file():
        return []  # do not create an empty database just to look
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    except KeyError:
        return []


def run_tune(job: TuneJob, *, callbacks=()) -> dict[str, Any]:
    """Validate, plan, probe once, search; returns a summary (also ``OUT/summary.json``).
    ``callbacks``: more Tune callbacks (the autoscaling experiment counts running trials with one)."""
    check_writable(Path(job.out))  # first, as defend does: not after the probe's minutes of work
    space, template, probe = validate(job)
    identity = job.identity(space)
    mode = _check_out(job, identity)
    out = Path(job.out).resolve()
    study_name = job.study_name or f"kdshield-{job.method}"
    completed = 0
    if mode == "study":
        import optuna

        completed = sum(t.state == optuna.trial.TrialState.COMPLETE
                        for t in study_trials(job.storage_url(), study_name))
        if not completed and job.resume:
            say(f"no finished trial of study {study_name!r} in the storage: starting the search")
    if mode == "new" and study_trials(job.storage_url(), study_name):
        raise InputError(f"--storage {redact_url(job.storage_url())}: study {study_name!r} already has trials; "
                         "pass --resume to continue it or --study-name to start another")
    concurrent = job.max_concurrent or min(job.num_samples, max(1, int((os.cpu_count() or 1)
                                                                      // max(job.scaling.workers *
                                                                                 job.scaling.cpus_per_worker, 1))))
    plan = _local_plan(job, concurrent) if not job.scaling.address else None
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "tune.json", {"identity": identity, "job": job.record(),
                                   "study_name": study_name, "storage": redact_url(job.storage_url())})
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")  # Tune's experiment state, often
    cluster.connect(job.scaling.address)  # looked up now: the one place a job starts Ray
    if job.scaling.address:
        plan = plan_resources(job.scaling, concurrent, trial_driver_cpus=job.cpus_per_trial)
    if plan is not None:
        concurrent = plan.concurrent_trials
        say(f"resources: {plan.summary()}")
    cache = StageCache(_cache_dir(job)) if job.shared_work else None
    probe_scaling = job.scaling
    if not job.scaling.address and job.scaling.workers == 1 and not job.scaling.gpus_per_worker:
        # the probe trains alone, before any trial: on every core of this machine, not one trial's share
        probe_scaling = job.scaling.model_copy(update={"cpus_per_worker": float(os.cpu_count() or 1)})
    probe_job = DefendJob(method="bedkd", run=job.run, out=str(out / "unused"), scaling=probe_scaling,
                          params=probe.model_dump(mode="json"))
    build_probe(probe_job, out / "shared", cache=cache or StageCache(out / "shared" / "probe-cache"),
                val_fraction=job.val_fraction, probe_n=job.probe_n, seed=job.seed,
                triggered_rows=job.triggered_eval_rows if job.measures_asr() else 0,
                canary=job.canary(probe.max_length, probe.batch_size))
    errors: list = []
    if mode == "study" and completed >= job.num_samples:
        say(f"study {study_name!r} already has {completed} finished trial(s); nothing to do")
    else:
        tuner = build_tuner(job, space, mode=mode, concurrent=concurrent, completed=completed, callbacks=callbacks)
        say(f"searching {job.method}: {job.num_samples} trial(s), objective {job.objective} "
            f"({job.sampler_name()}{', ASHA on ' + job.scheduler_metric() if job.scheduler == 'asha' else ''}), "
            f"{concurrent} at a time; study {study_name!r} in {redact_url(job.storage_url())}")
        grid = tuner.fit()
        errors = [r.error for r in grid if r.error is not None]
        if errors:
            say(f"{len(errors)} trial(s) failed; first error: {str(errors[0]).splitlines()[0][:300]}")
    summary = {**summarize(out, Path(_cache_dir(job))), "failed_trials": len(errors)}
    write_json(out / "summary.json", summary)
    return summary


def _cache_dir(job: TuneJob) -> str:
    return str(Path(job.cache).resolve() if job.cache else Path(job.out).resolve() / "cache")


def trial_results(out: str | Path) -> list[dict[str, Any]]:
    """Every finished trial's ``result.json`` under ``OUT/trials`` (by trial id)."""
    root = Path(out) / "trials"
    rows = []
    for path in sorted(root.glob("*/result.json")):
        rows.append(json.loads(path.read_text()))
    return rows


def summarize(out: Path, cache: Path) -> dict[str, Any]:

    rows = trial_results(out)
    events = read_events(cache)
    stage_events = [e for e in events if e["kind"] == "stage"]
    return {"finished_trials": len(rows), "trial_ids": [r["trial_id"] for r in rows],
            "cache": {kind: {"hits": sum(e["hit"] for e in events if e["kind"] == kind),
                             "misses": sum(not e["hit"] for e in events if e["kind"] == kind)}
                      for kind in ("stage", "teacher", "logits")},
            "stage_seconds_saved": sum(float(e.get("seconds", 0)) for e in stage_events if e["hit"])}
