"""A defender-side search objective: no trigger, no ground truth, only what a defender holds.

A real defender cannot measure ASR: the trigger is unknown. What they do have: the suspect
model, its (possibly poisoned) training set and a little clean data. :func:`build_probe` turns
those into two small evaluation sets, once per search, shared by every trial of every defense:

- ``val``: a stratified share of the clean data, held out from what the defenses train on;
- ``flagged``: the training samples BeDKD-style identification calls poisoned (a DMM distilled
  with flipped labels, MEPD below ``gamma``, predicted as the label the suspect model over-predicts,
  at most ``probe_n`` of them, smallest MEPD first), labelled with the *suspect model's*
  prediction (for a backdoored model: the target label).

The score of a defended model is::

    defender_score = 100 * (accuracy on val - agreement with the suspect on flagged)

Higher is better: keep clean accuracy, stop answering the suspicious samples the way the
backdoored model did. It is computed after every epoch of the stage training the defended
model (``Stage.evals``, for ASHA) and for the final model. On a benchmark RUN its rank
correlation with the true ASR across trials says how far a defender can trust it
(``kdshield report`` prints it).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdshield.datasets import stratified_split, write_table
from kdshield.datasets.subsets import with_labels
from kdshield.defenses.bedkd.recipe import clean_sets, identify_poisoned, train_dmm
from kdshield.models import load_tokenizer
from kdshield.trainables.attack import tokenized_stream
from kdshield.trainables.canary import plant_canary
from kdshield.trainables.context import JobContext
from kdshield.trainables.defend import resolve_inputs
from kdshield.trainables.engine import trains_in_process
from kdshield.trainables.hooks import DefenseHooks
from kdshield.trainables.inference import LocalScorer, predict_logits
from kdshield.outputs import say, write_json

VAL, FLAGGED, TRIGGERED, CANARY = "val", "flagged", "triggered", "canary"
CANARY_DIR = "canary"  # in the probe's directory: the canaried model and its training set


def score(val_acc: float, flagged_acc: float | None) -> float:
    """The defender score from shares in [0, 1] (``flagged_acc`` None: no flagged samples)."""
    return 100.0 * (val_acc - (flagged_acc or 0.0))


def from_eval_metrics(metrics: dict[str, Any]) -> dict[str, float] | None:
    """Per-epoch estimates from a stage's ``eval/<stream>/acc`` metrics (None without them)."""
    val = metrics.get(f"eval/{VAL}/acc")
    if val is None:
        return None
    flagged = metrics.get(f"eval/{FLAGGED}/acc")
    out = {"defender_score": score(val, flagged), "cacc": 100.0 * val}
    if flagged is not None:
        out["flagged_agreement"] = 100.0 * flagged
    if f"eval/{CANARY}/acc" in metrics:
        canary = metrics[f"eval/{CANARY}/acc"]
        out["canary_asr"] = 100.0 * canary
        out["canary_score"] = 100.0 * (val - canary)
    if f"eval/{TRIGGERED}/acc" in metrics:
        out["asr"] = 100.0 * metrics[f"eval/{TRIGGERED}/acc"]
    return out


def build_probe(job, shared: Path, *, cache, val_fraction: float, probe_n: int, seed: int,
                triggered_rows: int = 0, canary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``shared/{clean_train,val,flagged}.parquet`` and ``probe.json`` (once; reused after).

    ``job`` is a :class:`~kdshield.trainables.defend.DefendJob` (method bedkd, its params are
    the probe's DMM/identification settings) whose ``clean`` is the defender's whole clean set.
    With ``triggered_rows`` > 0 (benchmarks only), a seeded subset of the triggered test set
    labelled with the target label is written too, for per-epoch ASR estimates. With ``canary``
    (keyword arguments of :func:`~kdshield.trainables.canary.plant_canary`: rate, epochs, lr,
    batch_size, max_length), the defender's canary is planted into ``shared/canary`` and its
    evaluation rows written to ``canary.parquet``.
    """
    done = shared / "probe.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    shared.mkdir(parents=True, exist_ok=True)
    inputs = resolve_inputs(job)
    labels = inputs.clean.column("label").to_numpy()
    rest, held = stratified_split(labels, test_fraction=val_fraction, seed=seed)
    clean_train, val = inputs.clean.take(pa.array(np.sort(rest))), inputs.clean.take(pa.array(np.sort(held)))
    write_table(clean_train, shared / "clean_train.parquet")
    write_table(val, shared / "val.parquet")
    inputs.clean = clean_train

    work = shared / "probe-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ctx = JobContext(job, inputs, job.spec.parse(job.params), work, DefenseHooks(cache=cache))
    c = ctx.config
    # The DMM and identification exactly as run_bedkd does them, so a BeDKD trial with these
    # settings reuses the cached DMM stage.
    _, dmm_clean = clean_sets(ctx)
    found = identify_poisoned(ctx, train_dmm(ctx, dmm_clean), calibration=val, n_p=probe_n)
    rows, preds, target = found.rows, found.preds, found.info["suspected_target"]
    flagged = with_labels(inputs.train.take(pa.array(rows, pa.int64())), preds[rows])
    write_table(flagged, shared / "flagged.parquet")
    info: dict[str, Any] = {"n_val": val.num_rows, "n_clean_train": clean_train.num_rows,
                            "n_flagged": int(len(rows)), "suspected_target": int(target),
                            "settings": c.model_dump(mode="json")}
    if canary is not None:
        planted, evaluation = plant_canary(
            inputs.model_dir, train=inputs.train, clean=clean_train, val=val, num_labels=inputs.num_labels,
            suspected_target=int(target), out=shared / CANARY_DIR, scaling=job.scaling, seed=seed, **canary)
        write_table(evaluation, shared / f"{CANARY}.parquet")
        info.update(planted)
        # how well it took, before any defense: a canary the suspect barely learned says nothing
        tok = load_tokenizer(inputs.model_dir)
        took = final_scores(str(shared / CANARY_DIR / "model"), {VAL: val, CANARY: evaluation},
                            num_labels=inputs.num_labels, tokenizer_dir=inputs.model_dir,
                            max_length=canary["max_length"], pad_ids={"input_ids": tok.pad_token_id},
                            padding_side=tok.padding_side, cpus=job.scaling.cpus_per_worker,
                            in_process=trains_in_process(job.scaling))
        info.update(canary_asr_planted=took.get("canary_asr"), canary_val_acc_planted=took.get("cacc"))
        say(f"canary planted: its ASR {took.get('canary_asr', float('nan')):.1f}% on the held-out rows, "
            f"their accuracy {took.get('cacc', float('nan')):.1f}%"
            + ("; it barely took: raise --canary-epochs or --canary-rate" if took.get("canary_asr", 0) < 80 else ""))
    if "poisoned" in inputs.train.column_names and len(rows):  # ground truth: reported, never used
        truth = inputs.train.column("poisoned").to_numpy(zero_copy_only=False)
        info["flagged_precision"] = float(100.0 * truth[rows].mean())
    if triggered_rows and inputs.triggered is not None and inputs.target_label is not None:
        t = inputs.triggered
        pick = np.sort(np.random.default_rng(seed).permutation(t.num_rows)[:triggered_rows])
        sub = t.take(pa.array(pick, pa.int64()))
        write_table(with_labels(sub, np.full(sub.num_rows, inputs.target_label)), shared / "triggered.parquet")
        info["n_triggered"] = sub.num_rows
    shutil.rmtree(work, ignore_errors=True)
    info["seconds"] = time.perf_counter() - t0
    write_json(done, info)
    say(f"defender probe: {val.num_rows} held-out clean samples, {len(rows)} flagged suspicious samples"
        + (f" ({info['flagged_precision']:.0f}% truly poisoned)" if "flagged_precision" in info else ""))
    return info


def eval_tables(shared: Path) -> dict[str, pa.Table]:
    """The probe's evaluation tables that are not empty: val, flagged, (triggered), (canary)."""
    out = {}
    for name in (VAL, FLAGGED, TRIGGERED, CANARY):
        path = shared / f"{name}.parquet"
        if path.is_file():
            table = pq.read_table(path)  # written by build_probe, already normalised
            if table.num_rows:
                out[name] = table
    return out


def final_scores(model_dir: str, tables: dict[str, pa.Table], *, num_labels: int, tokenizer_dir: str,
                 max_length: int, pad_ids, padding_side, cpus: float, gpus: float = 0.0,
                 in_process: bool = False) -> dict[str, float]:
    """The defender score of a finished model by batch inference (when no epoch reported it): in
    this process with ``in_process``, else by Ray Data actors."""
    accs = {}
    scorer = LocalScorer(num_labels, threads=int(cpus)) if in_process else None
    for name, table in tables.items():
        logits, labels = predict_logits(tokenized_stream(table, tokenizer_dir, max_length), model_dir, num_labels,
                                        with_labels=True, pad_ids=pad_ids, padding_side=padding_side,
                                        cpus_per_actor=cpus, gpus_per_actor=gpus, scorer=scorer)
        accs[f"eval/{name}/acc"] = float((logits.argmax(-1) == labels).mean())
    return from_eval_metrics(accs) or {}
