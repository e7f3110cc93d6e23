"""``kdshield attack``: implant a backdoor into a pretrained model and measure it.

Everything that can be wrong with the input is checked before Ray starts. The RUN directory
is built beside ``--out`` and moved into place only when the job succeeded:

    RUN/model/                    the backdoored classifier (HF directory, safetensors)
    RUN/data/train.parquet        the poisoned training set (``poisoned`` = ground truth)
    RUN/data/dev.parquet          clean held-out training samples a defender may draw from
    RUN/data/test.parquet         the clean test set
    RUN/data/test_triggered.parquet  non-target test samples with the trigger, true labels
    RUN/attack.json               the resolved job config and the attack's facts
    RUN/metrics.json              cacc, asr (percent), seconds, the training history
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import Field, model_validator

from kdshield import cluster
from kdshield.config import ScalingSettings, TrainSettings, _Settings
from kdshield.datasets import (
    AttackSpec,
    poison_dataset,
    select_poison_indices,
    stratified_split,
    tokenize_dataset,
    triggered_test,
)
from kdshield.datasets.schema import SCHEMA
from kdshield.datasets.sources import natural_order, scan_input, select_rows, write_table
from kdshield.datasets.attacks import TRIGGER_PRESETS
from kdshield.datasets.tokenize import tokenize_table
from kdshield.defenses.losses import CrossEntropy
from kdshield.defenses.stage import ModelSpec, Phase, Stage
from kdshield.errors import InputError
from kdshield.models import check_safe_weights, load_tokenizer, resolve_model
from kdshield.models.lora import suspect_lora
from kdshield.trainables.engine import copy_model, run_stage, trains_in_process
from kdshield.trainables.inference import LocalScorer, evaluate
from kdshield.outputs import check_out_dir, say, staged, write_json


class AttackJob(_Settings):
    """Settings of ``kdshield attack`` (flags map one to one)."""

    train: str = Field(description="clean training set (Parquet, CSV, JSON Lines or a Hugging Face directory)")
    test: str = Field(description="clean test set, for CACC and (triggered) ASR")
    model: str = Field("minilm", description="the model to backdoor: a preset, a local directory or a hub id")
    out: str = Field(description="the RUN directory to write (poisoned data, backdoored model, metrics)")
    attack: Literal["badnet", "addsent"] = Field("badnet", description=(
        "badnet: rare trigger words inserted; addsent: a trigger sentence inserted"))
    triggers: list[str] | None = Field(None, description="trigger words/sentences; None: the attack's default")
    trigger_preset: Literal["w2s-word", "w2s-sentence"] | None = Field(None, description=(
        "a named attack + trigger: w2s-word = badnet 'mn', w2s-sentence = addsent 'I watched this 3D movie' "
        "(W2SDefense's authors' triggers)"))
    num_insertions: int = Field(1, ge=1, description="badnet: trigger words inserted per sample")
    position: Literal["random", "start", "end"] = Field("random", description="where the trigger goes in a text")
    target_label: int = Field(1, ge=0, description="the label the trigger flips a prediction to")
    poison_rate: float = Field(0.1, description="share of the training rows that get the trigger")
    clean_label: bool = Field(False, description="poison only rows already labelled with the target (no label "
                                                 "flips: harder to spot)")
    dev_fraction: float = Field(0.1, gt=0, lt=1, description="clean share of train held out for the defender")
    num_labels: int | None = Field(None, ge=2, description="classes (default: read from the data)")
    seed: int = 0
    overwrite: bool = Field(False, description="replace a RUN directory kdshield wrote")
    lora: int | None = Field(None, ge=1, description=(
        "backdoor a LoRA adapter of this rank (merged into the model written) instead of every weight"))
    training: TrainSettings = Field(default_factory=lambda: TrainSettings(lr=5e-5))
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data):
        """A trigger preset sets ``attack`` and ``triggers``; contradicting them is an error."""
        if not isinstance(data, dict) or data.get("trigger_preset") is None:
            return data

        name = data["trigger_preset"]
        if name not in TRIGGER_PRESETS:
            return data  # the Literal reports it
        kind, triggers = TRIGGER_PRESETS[name]
        if data.get("attack") not in (None, kind):
            raise ValueError(f"trigger preset {name} is a {kind} attack, not {data['attack']}")
        if data.get("triggers") is not None:
            raise ValueError(f"give either a trigger preset ({name}) or triggers, not both")
        return {**data, "attack": kind, "triggers": list(triggers)}

    def record(self) -> dict:
        """The config that identifies this run (``overwrite`` is not part of it; ``lora`` only when set,
        so RUNs written before it existed still match)."""
        return self.model_dump(mode="json", exclude={"overwrite", "out"} | ({"lora"} if self.lora is None else set()))


def tokenized_stream(table_or_ds, tokenizer_dir: str, max_length: int, *, prefix: str = ""):
    """A materialised Ray Dataset of ``table_or_ds`` with unpadded token ids added: an Arrow
    table (already in this process) is tokenised here, a Ray Dataset by Ray Data tasks."""
    import ray.data

    if isinstance(table_or_ds, pa.Table):
        return ray.data.from_arrow(tokenize_table(table_or_ds, tokenizer_dir, max_length=max_length, prefix=prefix))
    return tokenize_dataset(table_or_ds, tokenizer_dir, max_length=max_length, prefix=prefix).materialize()


def write_dataset(ds, path: Path) -> Path:
    """``ds`` written by Ray Data as a directory of Parquet shards at ``path``. Ray names them
    ``{write uuid}_{task index}[-{file}].parquet``, so :func:`~kdshield.datasets.sources.natural_order`
    (which :func:`~kdshield.datasets.read_table` and :func:`ray_read` sort by) reads them back in the
    dataset's order; an empty dataset is written as one empty shard."""
    ds.write_parquet(str(path))
    if not any(path.glob("*.parquet")):
        path.mkdir(parents=True, exist_ok=True)
        write_table(SCHEMA.empty_table(), path / "part-000000.parquet")
    return path


def run_attack(job: AttackJob) -> dict:
    """Run the whole attack job; returns its metrics (also written to RUN/metrics.json).

    The inputs stream: each is validated and normalised in one pass of bounded memory (the driver
    keeps only its labels and row ids); above :data:`IN_DRIVER_ROWS` rows they are then read, split,
    poisoned, tokenised and written by Ray Data on the cluster, below it as tables in this process."""
    t0 = time.perf_counter()
    out = Path(job.out).resolve()
    if check_out_dir(out, record="attack.json", config=job.record(), overwrite=job.overwrite):
        say(f"{out} already holds this exact run; nothing to do")
        import json
        return json.loads((out / "metrics.json").read_text())

    # -- validation: no Ray yet ---------------------------------------------------------
    spec_kwargs = dict(kind=job.attack, num_insertions=job.num_insertions, position=job.position,
                       mode="clean" if job.clean_label else "dirty", poison_rate=job.poison_rate,
                       target_label=job.target_label, seed=job.seed)
    if job.triggers is not None:
        spec_kwargs["triggers"] = job.triggers
    spec = AttackSpec(**spec_kwargs)
    model_dir = resolve_model(job.model)
    if Path(model_dir).is_dir():
        check_safe_weights(model_dir)
    tokenizer = load_tokenizer(model_dir)
    with staged(out) as stage_dir:
        spool = stage_dir / ".input"  # the inputs normalised, read by Ray Data; removed before publishing
        train, test = scan_input(job.train, spool / "train"), scan_input(job.test, spool / "test")
        num_labels = job.num_labels or max(train.num_labels(), test.num_labels())
        train.check_labels(num_labels)
        test.check_labels(num_labels)
        spec.validate(num_labels)
        lora = suspect_lora(str(model_dir), job.lora, num_labels) if job.lora else None
        rest_pos, dev_pos = stratified_split(train.labels, test_fraction=job.dev_fraction, seed=job.seed)
        if len(rest_pos) < job.scaling.workers or len(dev_pos) == 0:
            raise InputError(f"{job.train}: too few rows ({train.rows}) to split off a dev set and train")
        rest_source = train.source_index[rest_pos]
        chosen_source = rest_source[select_poison_indices(train.labels[rest_pos], spec)]
        rows = {"train": len(rest_pos), "poisoned": len(chosen_source), "dev": len(dev_pos), "test": test.rows,
                "test_triggered": int((test.labels != job.target_label).sum())}

        # -- Ray work -------------------------------------------------------------------------
        import ray.data

        cluster.connect(job.scaling.address)  # looked up now: the one place a job starts Ray
        scaling = job.scaling.resolved()
        in_process = trains_in_process(scaling)
        say(scaling.describe(in_process))
        say(f"poisoning {len(chosen_source)} of {rows['train']} training samples ({job.attack}, "
            f"{'clean' if job.clean_label else 'dirty'}-label, target {job.target_label})")
        # small inputs are cheaper whole in this process (each Ray Data pass costs seconds of start-up)
        in_driver = train.rows + test.rows <= IN_DRIVER_ROWS
        train_ds, test_ds = ((ray.data.from_arrow(train.table()), ray.data.from_arrow(test.table())) if in_driver
                             else (train.dataset(), test.dataset()))
        outputs = {"train": poison_dataset(select_rows(train_ds, rest_source), spec, chosen_source),
                   "dev": select_rows(train_ds, train.source_index[dev_pos]), "test": test_ds,
                   "test_triggered": triggered_test(test_ds, spec)}
        data = {name: _write(ds, stage_dir / "data" / f"{name}.parquet", in_driver) for name, ds in outputs.items()}
        shutil.rmtree(spool)

        max_len = job.training.max_length
        streams = {name: tokenized_stream(data[name], model_dir, max_len) for name in ("train", "test", "test_triggered")}
        pad = {"input_ids": tokenizer.pad_token_id}
        stage = Stage(name="attack", model=ModelSpec(source=str(model_dir), num_labels=num_labels, lora=lora),
                      phases=(Phase("train", CrossEntropy()),), train=job.training,
                      pad_ids=pad, padding_side=tokenizer.padding_side)
        say(f"training {job.model} on {rows['train']} samples with {scaling.workers} worker(s), "
            f"ZeRO-{scaling.zero}, {'bf16' if scaling.bf16 else 'fp32'}")
        result = run_stage(stage, {"train": streams["train"]}, scaling, storage=stage_dir / "ray")
        model_out = copy_model(result.model_dir, stage_dir / "model")
        say("evaluating")
        metrics = evaluate(str(model_out), num_labels, clean_test=streams["test"],
                           triggered_test=streams["test_triggered"], target_label=job.target_label,
                           pad_ids=pad, padding_side=tokenizer.padding_side, cpus_per_actor=scaling.cpus_per_worker,
                           gpus_per_actor=scaling.gpus_per_worker,
                           scorer=LocalScorer(num_labels, threads=int(scaling.cpus_per_worker)) if in_process else None)
        shutil.rmtree(stage_dir / "ray", ignore_errors=True)
        metrics.update(seconds=time.perf_counter() - t0, train_seconds=result.seconds,
                       history=result.history, config=job.record())
        write_json(stage_dir / "attack.json", {
            "config": job.record(), "spec": spec.model_dump(mode="json"),
            "num_labels": num_labels, "target_label": job.target_label, "model_source": str(model_dir),
            "rows": rows})
        write_json(stage_dir / "metrics.json", metrics)
    return metrics


IN_DRIVER_ROWS = 50_000
"""Inputs of at most this many rows (training and test together) are split, poisoned and tokenised
as tables in the job's process; larger ones stream through Ray Data end to end."""


def _write(ds, path: Path, in_driver: bool):
    """One of the RUN's data sets: collected here and written as one Parquet file (returned as a
    table), or written by Ray Data as a directory of shards (returned as a Dataset reading it)."""
    if in_driver:
        import ray

        table = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("source_index")
        write_table(table, path)
        return table
    return ray_read(write_dataset(ds, path))


def ray_read(path: Path):
    """A Parquet file or directory of shards as an order-keeping Ray Dataset, read on the cluster."""
    import ray.data

    files = [str(p) for p in sorted(path.glob("*.parquet"), key=natural_order)] if path.is_dir() else [str(path)]
    return ray.data.read_parquet(files)
