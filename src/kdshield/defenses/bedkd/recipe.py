"""BeDKD's recipe, and its Table 2 baselines: stages on the one engine, read top to bottom.

``bedkd``: (1) the DMM, a copy of the suspect model distilled from it on clean data with
flipped labels; (2) identification, MEPD between suspect model and DMM on every suspect
training sample; (3) AKD, a copy of the suspect model trained by cycles of trust
distillation on clean data and punish distillation on the identified samples, the suspect
model the frozen teacher. ``ft`` fine-tunes the suspect model on the clean set; ``kd`` is AKD's
trust distillation alone.

OUT gets ``identification.json`` (MEPD of every sample, gamma, what was kept and, on
benchmarks, FAR/FRR/precision against the ground truth) and ``mepd.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from kdshield.datasets.subsets import sample_per_class, with_labels
from kdshield.defenses.base import Context
from kdshield.defenses.bedkd.identify import (backdoor_confidence, calibrate_gamma, flip_labels, identify,
                                              majority_label, mepd, plot_mepd_histogram, softmax,
                                              suspected_target)
from kdshield.defenses.bedkd.losses import TEACHER_OUTPUTS, DistillLoss, PunishLoss
from kdshield.defenses.losses import CrossEntropy
from kdshield.defenses.stage import ModelSpec, Phase
from kdshield.evaluation.metrics import far_frr


def _distilled(ctx: Context, name: str, phases: list[Phase], streams: dict, *, epochs: int, lr: float) -> str:
    """A copy of the suspect model trained by ``phases`` with the suspect model as frozen teacher
    (its outputs cached in ``streams``, or computed live with ``--teacher-outputs live``)."""
    suspect = ctx.inputs.model_dir
    live = ModelSpec(suspect, ctx.inputs.num_labels) if ctx.live_teachers else None
    result = ctx.train(name, ModelSpec(suspect, ctx.inputs.num_labels), phases, streams, epochs=epochs, lr=lr,
                       live_teacher=live, live_outputs=TEACHER_OUTPUTS)
    return str(result.model_dir)


def _with_teacher(ctx: Context, table: pa.Table):
    """The tokenised ``table`` with the suspect model's cached outputs (unless they run live)."""
    stream = ctx.stream(table)
    return stream if ctx.live_teachers else ctx.teacher(stream, ctx.inputs.model_dir, TEACHER_OUTPUTS)


# ----------------------------------------------------------------------------- baselines

def run_ft(ctx: Context) -> tuple[str, dict]:
    """Fine-tune the suspect model on ``n_c`` clean samples per class."""
    c = ctx.config
    clean = ctx.stream(sample_per_class(ctx.inputs.clean, c.n_c, c.seed))
    result = ctx.train("ft", ModelSpec(ctx.inputs.model_dir, ctx.inputs.num_labels), [Phase("clean", CrossEntropy())],
                       {"clean": clean}, epochs=c.epochs, lr=c.lr)
    return str(result.model_dir), {}


def run_kd(ctx: Context) -> tuple[str, dict]:
    """Distil the suspect model into a copy of itself on the clean set (no punishment)."""
    c = ctx.config
    clean = _with_teacher(ctx, sample_per_class(ctx.inputs.clean, c.n_c, c.seed))
    model = _distilled(ctx, "kd", [Phase("clean", DistillLoss(c.lam, c.temperature))], {"clean": clean},
                       epochs=c.epochs, lr=c.lr)
    return model, {}


# ----------------------------------------------------------------------------- BeDKD

@dataclass
class Identification:
    """What BeDKD's identification step found in the suspect training set."""

    rows: np.ndarray     # [k] int64: indices of the samples called poisoned (at most n_p)
    preds: np.ndarray    # [N]: the suspect model's predicted label of every training sample
    scores: np.ndarray   # [N]: MEPD between suspect model and DMM
    info: dict[str, Any]  # gamma, counts, and FAR/FRR/precisions where the ground truth exists


def clean_sets(ctx: Context) -> tuple[pa.Table, pa.Table]:
    """The AKD trust set (``n_c`` per class) and the DMM set (``n_c_dmm`` per class, drawn from it)."""
    c = ctx.config
    akd_clean = sample_per_class(ctx.inputs.clean, c.n_c, c.seed)
    return akd_clean, sample_per_class(akd_clean, c.n_c_dmm, c.seed + 1)


def train_dmm(ctx: Context, dmm_clean: pa.Table) -> str:
    """Step 1, the DMM: a copy of the suspect model distilled from it on clean data with flipped
    labels (alpha * CE(flipped) + (1 - alpha) * (KL_T + MSE)). Returns its model directory."""
    c = ctx.config
    flipped = with_labels(dmm_clean, flip_labels(dmm_clean.column("label").to_numpy(), ctx.inputs.num_labels))
    return _distilled(ctx, "dmm", [Phase("flipped", DistillLoss(c.alpha, c.dmm_temperature))],
                      {"flipped": _with_teacher(ctx, flipped)}, epochs=c.dmm_epochs, lr=c.dmm_lr)


def identify_poisoned(ctx: Context, dmm: str, *, calibration: pa.Table | None = None, n_p: int | None = None,
                      histogram: bool = False) -> Identification:
    """Step 2: MEPD between suspect model and DMM on every suspect training sample; candidates
    are below gamma (fixed, or calibrated on ``calibration`` for ``target_frr``) and predicted as
    the label the suspect model over-predicts (:func:`suspected_target`); at most ``n_p``
    (default: the config's) are kept by the config's ``selection``. FAR/FRR/precision are scored
    against ``poisoned`` when present (never used otherwise)."""
    c, i, suspect = ctx.config, ctx.inputs, ctx.inputs.model_dir
    with ctx.timed("identify"):
        train = ctx.stream(i.train)
        suspect_logits = ctx.predict(train, suspect)["logits"]
        p_suspect, p_dmm = softmax(suspect_logits), softmax(ctx.predict(train, dmm)["logits"])
        scores = mepd(p_suspect, p_dmm)
        preds = suspect_logits.argmax(-1)
        gamma = c.gamma
        if gamma is None:
            if calibration is None or not calibration.num_rows:
                raise ValueError("target_frr needs clean calibration samples")
            calib = ctx.stream(calibration)
            gamma = calibrate_gamma(mepd(softmax(ctx.predict(calib, suspect)["logits"]),
                                         softmax(ctx.predict(calib, dmm)["logits"])), c.target_frr)
        suspected = suspected_target(preds, i.clean.column("label").to_numpy())
        target = suspected if c.require_target_prediction else None
        n_p, confidence = c.n_p if n_p is None else n_p, backdoor_confidence(p_suspect, p_dmm)

        def keep(selection: str) -> np.ndarray:
            return identify(scores, preds, gamma=gamma, n_p=n_p, target_label=target, selection=selection,
                            seed=c.seed, confidence=confidence)

        rows = keep(c.selection)
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
                kept = keep(way)
                info[f"precision_{way}"] = float(100.0 * truth[kept].mean()) if len(kept) else float("nan")
        if histogram:
            plot_mepd_histogram(scores, truth, gamma, ctx.work / "mepd.png")
    ctx.say(f"identified {len(rows)} suspicious samples (gamma {gamma:.4f}"
            + (f", FAR {info['far']:.1f}%, FRR {info['frr']:.1f}%, precision {info['identified_precision']:.1f}%)"
               if truth is not None and len(rows) else ")"))
    return Identification(rows=rows, preds=preds, scores=scores, info=info)


def run_bedkd(ctx: Context) -> tuple[str, dict]:
    """DMM distillation -> MEPD identification -> adversarial KD (trust + punish cycles)."""
    c, i = ctx.config, ctx.inputs
    akd_clean, dmm_clean = clean_sets(ctx)
    dmm = train_dmm(ctx, dmm_clean)
    # gamma calibration (target_frr) on clean samples the DMM did not train on
    calibration = i.clean.filter(pa.array(~np.isin(i.clean.column("source_index").to_numpy(),
                                                   dmm_clean.column("source_index").to_numpy())))
    found = identify_poisoned(ctx, dmm, calibration=calibration if calibration.num_rows else akd_clean,
                              histogram=True)
    rows, preds = found.rows, found.preds

    # 3. AKD: trust distillation on clean data, punish distillation on the identified samples.
    phases = [Phase("clean", DistillLoss(c.lam, c.akd_temperature), name="trust")]
    streams = {"clean": _with_teacher(ctx, akd_clean)}
    if len(rows) >= ctx.workers:
        punished = with_labels(i.train.take(pa.array(rows)), preds[rows])
        streams["poison"] = _with_teacher(ctx, punished)
        punish = Phase("poison", PunishLoss(c.lam, c.akd_temperature, c.punish, c.punish_margin), name="punish")
        phases += [punish] * c.punish_passes
    else:
        ctx.say("too few samples identified to punish: AKD runs trust distillation only")
    model = _distilled(ctx, "akd", phases, streams, epochs=c.akd_cycles, lr=c.akd_lr)
    _write_identification(ctx, found)
    return model, found.info


def _write_identification(ctx: Context, found: Identification) -> None:
    source_index = ctx.inputs.train.column("source_index").to_numpy()
    record = {**found.info, "mepd": np.round(found.scores, 6).tolist(), "rows": [int(r) for r in found.rows],
              "source_index": source_index[found.rows].tolist()}
    (ctx.work / "identification.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
