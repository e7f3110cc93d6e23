"""``kdshield defend``: run a defense on a suspect model and measure the result.

A defender holds a suspect model, its (possibly poisoned) training set, a little clean data and
a test set; a RUN directory from ``kdshield attack`` bundles all of them plus the triggered test
set and the ground truth that benchmarks score against. Every method here is a list of stages on
the one engine (:func:`kdshield.trainables.engine.run_stage`); frozen teachers are evaluated
once by batch inference and their outputs streamed with the inputs.

Methods: ``bedkd`` (DMM -> identification -> AKD), and the baselines of BeDKD's Table 2:
``ft`` (fine-tune the suspect model on the clean few-shot data) and ``kd`` (distil the suspect
model into a copy of itself on the clean few-shot data, no punishment). All three read their
settings from :class:`kdshield.defenses.bedkd.BeDKDConfig` (``ft`` and ``kd`` use its AKD
fields: ``n_c``, ``akd_cycles`` as epochs, ``akd_lr``, ``lam``, ``akd_temperature``), so the
three rows of a comparison share one budget.

OUT holds ``model/`` (HF directory, safetensors), ``metrics.json`` (cacc, asr, far, frr,
seconds per stage, the resolved config), and for BeDKD ``identification.json`` and
``mepd.png``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from kdshield.config import ScalingSettings, TrainSettings, _Settings, parse_settings
from kdshield.errors import InputError
from kdshield.trainables import defend_feature, defend_w2s
from kdshield.trainables.runs import check_out_dir, say, staged, write_json

METHODS = ("bedkd", "ft", "kd", "ts-ft", "mbtsad", "robustkd", "feature-kd",  # ts-ft..feature-kd: defend_feature.py
           "w2s", "lora-ft")  # defend_w2s.py


class DefendJob(_Settings):
    """Settings of ``kdshield defend``; ``params`` are the method's own (validated separately)."""

    method: Literal["bedkd", "ft", "kd", "ts-ft", "mbtsad", "robustkd", "feature-kd", "w2s", "lora-ft"]
    run: str | None = Field(None, description="a RUN directory of `kdshield attack` (supplies all inputs)")
    model: str | None = Field(None, description="the suspect model: local HF dir (safetensors) or hub id")
    train: str | None = Field(None, description="the suspect (possibly poisoned) training set")
    clean: str | None = Field(None, description="clean samples the defender trusts")
    test: str | None = Field(None, description="clean test set")
    triggered_test: str | None = Field(None, description="triggered test set (for ASR), if known")
    target_label: int | None = Field(None, ge=0, description="the attack's target label (for ASR)")
    num_labels: int | None = Field(None, ge=2)
    out: str
    overwrite: bool = False
    teacher_outputs: Literal["cached", "live"] = Field(
        "cached", description="cached: teacher outputs precomputed once by batch inference; live: the "
                              "teacher runs at every step (only to measure what caching saves)")
    params: dict[str, Any] = Field(default_factory=dict)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)

    def record(self) -> dict:
        return self.model_dump(mode="json", exclude={"overwrite", "out"})


@dataclass
class Inputs:
    """Resolved, validated inputs of a defense."""

    model_dir: str
    train: pa.Table
    clean: pa.Table
    test: pa.Table
    triggered: pa.Table | None
    target_label: int | None
    num_labels: int


def method_config(job: DefendJob):
    from kdshield.defenses.bedkd import BeDKDConfig
    from kdshield.trainables.defend_feature import configs

    known = {**configs(), **defend_w2s.configs()}
    return parse_settings(known.get(job.method, BeDKDConfig), job.params, source=f"{job.method} settings")


def resolve_inputs(job: DefendJob) -> Inputs:
    """Read and validate every input (pyarrow only, no Ray); explicit flags override the RUN's."""
    from kdshield.datasets import num_labels_of, read_table
    from kdshield.models import check_safe_weights, resolve_model

    paths = {"model": job.model, "train": job.train, "clean": job.clean, "test": job.test,
             "triggered_test": job.triggered_test}
    target, num_labels = job.target_label, job.num_labels
    if job.run:
        run = Path(job.run)
        if not (run / "attack.json").is_file():
            raise InputError(f"--run {run}: not a RUN directory (no attack.json)")
        attack = json.loads((run / "attack.json").read_text())
        defaults = {"model": run / "model", "train": run / "data/train.parquet", "clean": run / "data/dev.parquet",
                    "test": run / "data/test.parquet", "triggered_test": run / "data/test_triggered.parquet"}
        paths = {k: v if v is not None else str(defaults[k]) for k, v in paths.items()}
        target = target if target is not None else attack["target_label"]
        num_labels = num_labels or attack["num_labels"]
    for key in ("model", "train", "clean", "test"):
        if paths[key] is None:
            raise InputError(f"defend: --{key} is required without --run")
    if paths["triggered_test"] and target is None:
        raise InputError("defend: --triggered-test needs --target-label to compute ASR")
    tables = {k: read_table(v) for k, v in paths.items() if k != "model" and v}
    num_labels = num_labels or max(num_labels_of(t) for t in tables.values())
    tables = {k: read_table(paths[k], num_labels=num_labels) for k in tables}
    if target is not None and not 0 <= target < num_labels:
        raise InputError(f"defend: target label {target} outside the label set 0..{num_labels - 1}")
    model_dir = resolve_model(paths["model"])
    if Path(model_dir).is_dir():
        check_safe_weights(model_dir)
    return Inputs(model_dir=model_dir, train=tables["train"], clean=tables["clean"],
                  test=tables["test"], triggered=tables.get("triggered_test"), target_label=target,
                  num_labels=num_labels)


def check_model_settings(job: DefendJob, inputs: Inputs) -> None:
    """The settings that depend on the suspect model (layer indices, student size, tokenizers,
    attention, LoRA targets), checked before any Ray work; InputError otherwise."""
    if job.method in defend_feature.RECIPES:
        defend_feature.check(job, inputs)
    elif job.method in defend_w2s.RECIPES:
        defend_w2s.check(job, inputs)


def warn_if_headless(inputs: Inputs) -> None:
    """A suspect model that is not a trained classifier for the data's labels (a base model given
    by mistake) is defended with a fresh head from a fixed seed: its before/after numbers measure
    that random head, so the person running the defense is told."""
    from kdshield.models import head_problem
    from kdshield.models.loading import HEAD_INIT_SEED

    problem = head_problem(inputs.model_dir, inputs.num_labels)
    if problem:
        say(f"warning: the suspect model {inputs.model_dir} has no trained classification head: {problem}; "
            f"it gets a fresh one drawn from seed {HEAD_INIT_SEED}, so its CACC and ASR measure a random head")


def sample_per_class(table: pa.Table, n: int, seed: int) -> pa.Table:
    """Up to ``n`` rows of every label, chosen by ``seed`` (all of a label's rows if fewer)."""
    labels = table.column("label").to_numpy()
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == y))[:n] for y in np.unique(labels)]
    return table.take(pa.array(np.sort(np.concatenate(keep))))


class Defense:
    """Shared machinery of one defend job: streams, cached teachers, stages, evaluation."""

    def __init__(self, job: DefendJob, inputs: Inputs, work: Path, hooks=None):
        from kdshield.models import load_tokenizer
        from kdshield.trainables.hooks import DefenseHooks

        self.job, self.inputs, self.work = job, inputs, work
        self.hooks = hooks or DefenseHooks()  # cache / callbacks / per-epoch evals (kdshield tune)
        self.config = method_config(job)
        tok = load_tokenizer(inputs.model_dir)
        self.pad = {"input_ids": tok.pad_token_id}
        self.padding_side = tok.padding_side
        self.stage_seconds: dict[str, float] = {}
        self.history: dict[str, list] = {}

    def stream(self, table):
        from kdshield.trainables.attack import tokenized_stream

        def build():
            return tokenized_stream(table, self.inputs.model_dir, self.config.max_length)

        # streams of Arrow tables are shared through the cache; a Ray Dataset (MBTSAD's token-split
        # transform) is tokenised as it streams, and stages fingerprint it by content
        cache = self.hooks.cache if isinstance(table, pa.Table) else None
        return cache.stream(table, self.inputs.model_dir, self.config.max_length, build) if cache else build()

    def with_teacher(self, stream, teacher_dir: str):
        """``stream`` plus the frozen teacher's ``teacher_logits`` and ``teacher_hidden_seq``."""
        if self.job.teacher_outputs == "live":
            return stream
        from kdshield.trainables.inference import predict

        t0 = time.perf_counter()

        def build():
            return predict(stream, teacher_dir, self.inputs.num_labels, outputs=("logits", "hidden_seq"),
                           prefix="teacher_", pad_ids=self.pad, padding_side=self.padding_side,
                           cpus_per_actor=self.job.scaling.cpus_per_worker).materialize()

        cache = self.hooks.cache
        spec = {"outputs": ["logits", "hidden_seq"], "pad": self.pad, "side": self.padding_side,
                "num_labels": self.inputs.num_labels}
        out = cache.teacher(stream, teacher_dir, spec, build) if cache else build()
        self.stage_seconds["teacher_cache"] = self.stage_seconds.get("teacher_cache", 0.0) + time.perf_counter() - t0
        return out

    def stage(self, name: str, model, phases, *, epochs: int, lr: float, batch_size: int | None = None,
              pad_ids: dict | None = None, padding_side=None, **fields):
        """A :class:`~kdshield.trainables.stage.Stage` of this job: its config's batch size,
        max length and seed, its tokenizer's padding, no warm-up; ``fields`` for the rest
        (``live_teacher``, ``live_teacher_outputs``)."""
        from kdshield.trainables.stage import Stage

        c = self.config
        return Stage(name=name, model=model, phases=tuple(phases), pad_ids=self.pad if pad_ids is None else pad_ids,
                     padding_side=self.padding_side if padding_side is None else padding_side,
                     train=TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size or c.batch_size,
                                         max_length=c.max_length, warmup_ratio=0.0, seed=c.seed), **fields)

    def run_stage(self, stage, streams: dict):
        """Every stage of every recipe runs here, on the one engine, so the caller's hooks apply
        to all of them: per-epoch evaluation of the stages that train the defended model, the
        shared stage cache, named resumable runs and Ray Train callbacks. Records the stage's
        seconds and history; returns its :class:`~kdshield.trainables.engine.StageResult`."""
        import dataclasses

        from kdshield.trainables.engine import run_stage
        from kdshield.trainables.stage import EpochEval

        hooks = self.hooks
        say(f"stage {stage.name}: {stage.train.epochs} epoch(s) over "
            f"{', '.join(f'{k} ({v.count()} rows)' for k, v in streams.items())}")
        if stage.name in hooks.eval_stages and hooks.eval_streams and stage.model is not None:
            stage = dataclasses.replace(stage, evals=tuple(EpochEval(s) for s in hooks.eval_streams))
            streams = {**streams, **hooks.eval_streams}

        def run():
            if hooks.stage_runs is not None:  # named, resumable runs (a retried Tune trial resumes them)
                return hooks.stage_runs.run(stage, streams, self.job.scaling, callbacks=hooks.callbacks)
            return run_stage(stage, streams, self.job.scaling, storage=self.work / "ray", callbacks=hooks.callbacks)

        result = hooks.cache.stage(stage, streams, self.job.scaling, run) if hooks.cache else run()
        self.stage_seconds[stage.name] = result.seconds
        self.history[stage.name] = result.history
        return result

    def train(self, name: str, source: str, phases, streams: dict, *, epochs: int, lr: float, teacher: str | None):
        """A copy of the model at ``source`` trained by ``phases`` (BeDKD's stages); with
        ``--teacher-outputs live``, the frozen ``teacher`` runs at every step. Its directory."""
        from kdshield.trainables.stage import ModelSpec

        live = ModelSpec(teacher, self.inputs.num_labels) if teacher and self.job.teacher_outputs == "live" else None
        model = ModelSpec(source=source, num_labels=self.inputs.num_labels)
        return str(self.run_stage(self.stage(name, model, phases, epochs=epochs, lr=lr, live_teacher=live),
                                  streams).model_dir)

    def logits(self, stream, model_dir: str) -> np.ndarray:
        from kdshield.trainables.inference import predict_logits

        def build():
            return predict_logits(stream, model_dir, self.inputs.num_labels, pad_ids=self.pad,
                                  padding_side=self.padding_side, cpus_per_actor=self.job.scaling.cpus_per_worker)

        cache = self.hooks.cache
        spec = {"pad": self.pad, "side": self.padding_side, "num_labels": self.inputs.num_labels}
        return cache.logits(stream, model_dir, spec, build) if cache else build()

    def evaluate(self, model_dir: str) -> dict[str, float]:
        from kdshield.trainables.inference import evaluate

        i = self.inputs
        triggered = self.stream(i.triggered) if i.triggered is not None and i.target_label is not None else None
        return evaluate(model_dir, i.num_labels, clean_test=self.stream(i.test), triggered_test=triggered,
                        target_label=i.target_label, pad_ids=self.pad, padding_side=self.padding_side,
                        cpus_per_actor=self.job.scaling.cpus_per_worker)


def _with_labels(table: pa.Table, labels: np.ndarray) -> pa.Table:
    return table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int64()))


def run_ft(d: Defense) -> tuple[str, dict]:
    from kdshield.defenses.losses import CrossEntropy
    from kdshield.trainables.stage import Phase

    c = d.config
    clean = d.stream(sample_per_class(d.inputs.clean, c.n_c, c.seed))
    model = d.train("ft", d.inputs.model_dir, [Phase("clean", CrossEntropy())], {"clean": clean},
                    epochs=c.akd_cycles, lr=c.akd_lr, teacher=None)
    return model, {}


def run_kd(d: Defense) -> tuple[str, dict]:
    from kdshield.defenses.bedkd import DistillLoss
    from kdshield.trainables.stage import Phase

    c, suspect = d.config, d.inputs.model_dir
    clean = d.with_teacher(d.stream(sample_per_class(d.inputs.clean, c.n_c, c.seed)), suspect)
    model = d.train("kd", suspect, [Phase("clean", DistillLoss(c.lam, c.akd_temperature))], {"clean": clean},
                    epochs=c.akd_cycles, lr=c.akd_lr, teacher=suspect)
    return model, {}


@dataclass
class Identification:
    """What BeDKD's identification step found in the suspect training set."""

    rows: np.ndarray     # [k] int64: indices of the samples called poisoned (at most n_p)
    preds: np.ndarray    # [N]: the suspect model's predicted label of every training sample
    scores: np.ndarray   # [N]: MEPD between suspect model and DMM
    info: dict[str, Any]  # gamma, counts, and FAR/FRR/precisions where the ground truth exists


def bedkd_clean_sets(d: Defense) -> tuple[pa.Table, pa.Table]:
    """The AKD trust set (``n_c`` per class) and the DMM set (``n_c_dmm`` per class, drawn from it)."""
    c = d.config
    akd_clean = sample_per_class(d.inputs.clean, c.n_c, c.seed)
    return akd_clean, sample_per_class(akd_clean, c.n_c_dmm, c.seed + 1)


def bedkd_dmm(d: Defense, dmm_clean: pa.Table) -> str:
    """Step 1, the DMM: a copy of the suspect model distilled from it on clean data with flipped
    labels (alpha * CE(flipped) + (1 - alpha) * (KL_T + MSE)). Returns its model directory."""
    from kdshield.defenses.bedkd import DistillLoss, flip_labels
    from kdshield.trainables.stage import Phase

    c, suspect = d.config, d.inputs.model_dir
    flipped = _with_labels(dmm_clean, flip_labels(dmm_clean.column("label").to_numpy(), d.inputs.num_labels))
    return d.train("dmm", suspect, [Phase("flipped", DistillLoss(c.alpha, c.dmm_temperature))],
                   {"flipped": d.with_teacher(d.stream(flipped), suspect)},
                   epochs=c.dmm_epochs, lr=c.dmm_lr, teacher=suspect)


def bedkd_identify(d: Defense, dmm: str, *, calibration: pa.Table | None = None,
                   n_p: int | None = None, histogram: Path | None = None) -> Identification:
    """Step 2: MEPD between suspect model and DMM on every suspect training sample; candidates
    are below gamma (fixed, or calibrated on ``calibration`` for ``target_frr``) and predicted as
    the label the suspect model over-predicts (:func:`suspected_target`); at most ``n_p``
    (default: the config's) are kept by the config's ``selection``. FAR/FRR/precision are scored
    against ``poisoned`` when present."""
    from kdshield.defenses.bedkd import (backdoor_confidence, calibrate_gamma, identify, majority_label, mepd,
                                         plot_mepd_histogram, softmax, suspected_target)
    from kdshield.evaluation import far_frr

    c, i, suspect = d.config, d.inputs, d.inputs.model_dir
    t0 = time.perf_counter()
    train_stream = d.stream(i.train)
    suspect_logits = d.logits(train_stream, suspect)
    p_suspect, p_dmm = softmax(suspect_logits), softmax(d.logits(train_stream, dmm))
    scores = mepd(p_suspect, p_dmm)
    preds = suspect_logits.argmax(-1)
    gamma = c.gamma
    if gamma is None:
        if calibration is None or not calibration.num_rows:
            raise ValueError("target_frr needs clean calibration samples")
        calib_stream = d.stream(calibration)
        gamma = calibrate_gamma(mepd(softmax(d.logits(calib_stream, suspect)), softmax(d.logits(calib_stream, dmm))),
                                c.target_frr)
    suspected = suspected_target(preds, i.clean.column("label").to_numpy())
    target = suspected if c.require_target_prediction else None
    n_p, confidence = c.n_p if n_p is None else n_p, backdoor_confidence(p_suspect, p_dmm)
    rows = identify(scores, preds, gamma=gamma, n_p=n_p, target_label=target, selection=c.selection, seed=c.seed,
                    confidence=confidence)
    info: dict[str, Any] = {"gamma": float(gamma), "n_identified": int(len(rows)),
                            "majority_label": int(majority_label(preds)), "suspected_target": suspected,
                            "selection": c.selection}
    truth = i.train.column("poisoned").to_numpy(zero_copy_only=False) if "poisoned" in i.train.column_names else None
    if truth is not None:  # ground truth: scored, never used
        below = scores < gamma  # the threshold's own verdict on every sample (FAR/FRR of Eq. 4)
        info["far"], info["frr"] = far_frr(below, truth)
        candidates = below & (preds == target) if target is not None else below
        info["n_candidates"] = int(candidates.sum())
        info["candidate_precision"] = float(100.0 * truth[candidates].mean()) if candidates.any() else float("nan")
        info["identified_precision"] = float(100.0 * truth[rows].mean()) if len(rows) else float("nan")
        for way in ("confident", "smallest", "random"):  # what each selection rule would have kept
            kept = identify(scores, preds, gamma=gamma, n_p=n_p, target_label=target, selection=way, seed=c.seed,
                            confidence=confidence)
            info[f"precision_{way}"] = float(100.0 * truth[kept].mean()) if len(kept) else float("nan")
    if histogram is not None:
        plot_mepd_histogram(scores, truth, gamma, histogram)
    d.stage_seconds["identify"] = d.stage_seconds.get("identify", 0.0) + time.perf_counter() - t0
    say(f"identified {len(rows)} suspicious samples (gamma {gamma:.4f}"
        + (f", FAR {info['far']:.1f}%, FRR {info['frr']:.1f}%, precision {info['identified_precision']:.1f}%)"
           if truth is not None and len(rows) else ")"))
    return Identification(rows=rows, preds=preds, scores=scores, info=info)


def run_bedkd(d: Defense) -> tuple[str, dict]:
    """DMM distillation -> MEPD identification -> adversarial KD (trust + punish cycles)."""
    from kdshield.defenses.bedkd import DistillLoss, PunishLoss
    from kdshield.trainables.stage import Phase

    c, i, suspect = d.config, d.inputs, d.inputs.model_dir
    akd_clean, dmm_clean = bedkd_clean_sets(d)
    dmm = bedkd_dmm(d, dmm_clean)
    # gamma calibration (target_frr) on clean samples the DMM did not train on
    calibration = i.clean.filter(pa.array(~np.isin(i.clean.column("source_index").to_numpy(),
                                                   dmm_clean.column("source_index").to_numpy())))
    found = bedkd_identify(d, dmm, calibration=calibration if calibration.num_rows else akd_clean,
                           histogram=d.work / "mepd.png")
    rows, preds = found.rows, found.preds

    # 3. AKD: trust distillation on clean data, punish distillation on the identified samples.
    phases = [Phase("clean", DistillLoss(c.lam, c.akd_temperature), name="trust")]
    streams = {"clean": d.with_teacher(d.stream(akd_clean), suspect)}
    if len(rows) >= d.job.scaling.workers:
        punished = _with_labels(i.train.take(pa.array(rows)), preds[rows])
        streams["poison"] = d.with_teacher(d.stream(punished), suspect)
        punish = Phase("poison", PunishLoss(c.lam, c.akd_temperature, c.punish, c.punish_margin), name="punish")
        phases += [punish] * c.punish_passes
    else:
        say("too few samples identified to punish: AKD runs trust distillation only")
    model = d.train("akd", suspect, phases, streams, epochs=c.akd_cycles, lr=c.akd_lr, teacher=suspect)
    write_json(d.work / "identification.json", {**found.info, "mepd": np.round(found.scores, 6).tolist(),
                                                "rows": [int(r) for r in rows],
                                                "source_index": i.train.column("source_index").to_numpy()[
                                                    rows].tolist()})
    return model, found.info


RECIPES = {"bedkd": run_bedkd, "ft": run_ft, "kd": run_kd}
RECIPES.update(defend_feature.RECIPES)  # ts-ft, mbtsad, robustkd, feature-kd
RECIPES.update(defend_w2s.RECIPES)  # w2s, lora-ft


def run_defend(job: DefendJob, hooks=None) -> dict:
    """Validate everything, run the method's stages, evaluate, write OUT; returns metrics.

    ``hooks`` (:class:`~kdshield.trainables.hooks.DefenseHooks`): a stage cache, Ray Train
    callbacks and per-epoch evaluation streams, for ``kdshield tune``'s trials."""
    from kdshield.cluster import connect
    from kdshield.trainables.engine import copy_model

    t0 = time.perf_counter()
    out = Path(job.out).resolve()
    method_config(job)  # bad settings fail here, before any Ray work
    if check_out_dir(out, record="metrics.json", config=job.record(), overwrite=job.overwrite):
        say(f"{out} already holds this exact result; nothing to do")
        return json.loads((out / "metrics.json").read_text())
    inputs = resolve_inputs(job)
    warn_if_headless(inputs)
    check_model_settings(job, inputs)
    connect(job.scaling.address)
    with staged(out) as work:
        defense = Defense(job, inputs, work, hooks)
        model_dir, info = RECIPES[job.method](defense)
        final = copy_model(Path(model_dir), work / "model")
        say("evaluating the defended model")
        metrics = defense.evaluate(str(final))
        metrics.update(info)
        metrics.update(method=job.method, seconds=time.perf_counter() - t0, stage_seconds=defense.stage_seconds,
                       history=defense.history, config=job.record(),
                       resolved=defense.config.model_dump(mode="json"))
        if defense.hooks.cache is not None:
            metrics["cache"] = defense.hooks.cache.summary()
        shutil.rmtree(work / "ray", ignore_errors=True)
        write_json(work / "metrics.json", metrics)
    return metrics
