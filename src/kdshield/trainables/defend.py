"""``kdshield defend``: run a defense on a suspect model and measure the result.

A defender holds a suspect model, its (possibly poisoned) training set, a little clean data and
a test set; a RUN directory from ``kdshield attack`` bundles all of them plus the triggered test
set and the ground truth that benchmarks score against. The method comes from the registry
(:mod:`kdshield.defenses`): its settings are parsed once into its typed config, its checks run
before any Ray work, and its recipe runs in a :class:`~kdshield.trainables.context.JobContext`.

OUT holds ``model/`` (HF directory, safetensors), ``metrics.json`` (cacc, asr, far, frr, seconds,
time and memory per stage, the resolved config) and whatever the recipe writes (BeDKD:
``identification.json`` and ``mepd.png``; W2SDefense: ``adapter/`` and ``teacher/``).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from kdshield import cluster, defenses
from kdshield.config import ScalingSettings, _Settings
from kdshield.datasets import num_labels_of, read_table
from kdshield.defenses.base import Inputs
from kdshield.errors import InputError
from kdshield.models import check_safe_weights, head_problem, resolve_model
from kdshield.models.loading import HEAD_INIT_SEED
from kdshield.models.lora import suspect_lora
from kdshield.trainables.context import JobContext
from kdshield.trainables.engine import copy_model, trains_in_process
from kdshield.outputs import check_out_dir, say, staged, write_json


class DefendJob(_Settings):
    """Settings of ``kdshield defend``; ``params`` are the method's own (parsed by its config class)."""

    method: str = Field(description="a registered defense (kdshield.list_defenses())")
    run: str | None = Field(None, description="a RUN directory of `kdshield attack` (supplies all inputs)")
    model: str | None = Field(None, description="the suspect model: local HF dir (safetensors) or hub id")
    train: str | None = Field(None, description="the suspect (possibly poisoned) training set")
    clean: str | None = Field(None, description="clean samples the defender trusts")
    test: str | None = Field(None, description="clean test set")
    triggered_test: str | None = Field(None, description="triggered test set (for ASR), if known")
    target_label: int | None = Field(None, ge=0, description="the attack's target label (for ASR)")
    num_labels: int | None = Field(None, ge=2, description="classes (default: read from the model)")
    out: str = Field(description="the directory to write (defended model, metrics, stage records)")
    overwrite: bool = Field(False, description="replace a directory kdshield wrote")
    teacher_outputs: Literal["cached", "live"] = Field(
        "cached", description="cached: teacher outputs precomputed once by batch inference; live: the "
                              "teacher runs at every step (only to measure what caching saves)")
    params: dict[str, Any] = Field(default_factory=dict)
    pad_to: int | None = Field(None, ge=1, description=(
        "pad every training batch to this many tokens, as the papers' code does, instead of to its longest "
        "row (to measure what dynamic padding saves)"))
    lora: int | None = Field(None, ge=1, description=(
        "train every copy of the suspect (DMM, teacher, student) as a LoRA adapter of this rank on one "
        "frozen base instead of whole (large models)"))
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)

    @field_validator("method")
    @classmethod
    def _registered(cls, value: str) -> str:
        known = defenses.names()
        if value not in known:
            raise ValueError(f"unknown defense {value!r} (known: {', '.join(known)})")
        return value

    @property
    def spec(self):
        return defenses.get(self.method)

    def record(self) -> dict:
        late = {k for k in ("lora", "pad_to") if getattr(self, k) is None}  # unset: results from before them match
        return self.model_dump(mode="json", exclude={"overwrite", "out"} | late)


def resolve_inputs(job: DefendJob) -> Inputs:
    """Read and validate every input (pyarrow only, no Ray); explicit flags override the RUN's."""
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


def warn_if_headless(inputs: Inputs) -> None:
    """A suspect model that is not a trained classifier for the data's labels (a base model given
    by mistake) is defended with a fresh head from a fixed seed: its before/after numbers measure
    that random head, so the person running the defense is told."""
    problem = head_problem(inputs.model_dir, inputs.num_labels)
    if problem:
        say(f"warning: the suspect model {inputs.model_dir} has no trained classification head: {problem}; "
            f"it gets a fresh one drawn from seed {HEAD_INIT_SEED}, so its CACC and ASR measure a random head")


def check_job(job: DefendJob, inputs: Inputs, config=None):
    """The method's settings parsed into its config (unless given) and checked against the inputs
    (before Ray); returns the config."""
    spec = job.spec
    config = spec.parse(job.params) if config is None else config
    if job.lora is not None:
        if not spec.suspect_copies:
            raise InputError(f"--lora: {job.method} does not train copies of the suspect"
                             + (" (its own lora_r sets its adapter)" if "lora_r" in spec.config.model_fields
                                else " (its student is another, smaller network, trained whole)"))
        suspect_lora(inputs.model_dir, job.lora, inputs.num_labels)
    if spec.check is not None:
        spec.check(config, inputs, job.teacher_outputs)
    return config


def run_defend(job: DefendJob, hooks=None) -> dict:
    """Validate everything, run the method's recipe, evaluate, write OUT; returns metrics.

    ``hooks`` (:class:`~kdshield.trainables.hooks.DefenseHooks`): a stage cache, Ray Train
    callbacks and per-epoch evaluation streams, for ``kdshield tune``'s trials."""
    t0 = time.perf_counter()
    out = Path(job.out).resolve()
    config = job.spec.parse(job.params)  # the one parse of the settings; bad ones fail before any input is read
    if check_out_dir(out, record="metrics.json", config=job.record(), overwrite=job.overwrite):
        say(f"{out} already holds this exact result; nothing to do")
        return json.loads((out / "metrics.json").read_text())
    inputs = resolve_inputs(job)
    warn_if_headless(inputs)
    check_job(job, inputs, config)
    cluster.connect(job.scaling.address)  # looked up now: the one place a job starts Ray
    record = job.record()
    job = job.model_copy(update={"scaling": job.scaling.resolved()})
    say(job.scaling.describe(trains_in_process(job.scaling)))
    with staged(out) as work:
        ctx = JobContext(job, inputs, config, work, hooks)
        model_dir, info = job.spec.recipe(ctx)
        final = copy_model(Path(model_dir), work / "model")
        say("evaluating the defended model")
        metrics = ctx.evaluate(str(final))
        metrics.update(info)
        metrics.update(method=job.method, seconds=time.perf_counter() - t0, **ctx.record(), config=record,
                       resolved=config.model_dump(mode="json"))
        if ctx.hooks.cache is not None:
            metrics["cache"] = ctx.hooks.cache.summary()
        shutil.rmtree(work / "ray", ignore_errors=True)
        write_json(work / "metrics.json", metrics)
    return metrics
