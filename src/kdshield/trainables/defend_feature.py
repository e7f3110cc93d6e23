"""Recipes of the feature/attention defenses: MBTSAD (and its TS-FT step) and RobustKD (and
plain feature distillation), each a list of stages on the one engine.

* ``ts-ft``: a copy of the suspect model retrained on token-split clean data (cross-entropy).
* ``mbtsad``: TS-FT, then attention distillation into the suspect model with the TS-FT model
  as frozen teacher (its attention-enhancement maps and hidden states cached by batch
  inference, or computed live when caching them would cost more memory than
  ``teacher_cache_limit_mb``).
* ``robustkd``: the suspect model is the (frozen) teacher; its pooled per-layer features on the
  clean set are cached once; a model-less stage optimises the detoxification masks over them;
  then a smaller student (a reduced-depth copy of the teacher, or a preset sharing its
  tokenizer) learns the detoxified features through linear connectors, plus CE.
* ``feature-kd``: the same student and distillation without masks (the paper's FKD baseline).

``--teacher-outputs live`` applies to MBTSAD's distillation only: RobustKD's cached teacher
features are one pooled vector per layer and sample (4 (N+1) H bytes: 10.8 KB for MiniLM),
always cheaper to cache than to recompute at every step of the mask and distillation stages.

Settings: :class:`kdshield.defenses.mbtsad.MBTSADConfig` and
:class:`kdshield.defenses.robustkd.RobustKDConfig`. Everything that depends on the model (layer
indices, student size, tokenizer, eager attention, the teacher's head) is checked by
:func:`check` before any Ray work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kdshield.errors import InputError
from kdshield.trainables.runs import say

if TYPE_CHECKING:
    from kdshield.trainables.defend import Defense, DefendJob, Inputs
    from kdshield.trainables.engine import StageResult


def configs() -> dict[str, type]:
    """The settings class of every method here."""
    from kdshield.defenses.mbtsad import MBTSADConfig
    from kdshield.defenses.robustkd import RobustKDConfig

    return {"ts-ft": MBTSADConfig, "mbtsad": MBTSADConfig, "robustkd": RobustKDConfig,
            "feature-kd": RobustKDConfig}


# ----------------------------------------------------------------------------- shared

def _stage(d: Defense, name: str, model, phases, streams: dict, *, epochs: int, lr: float,
           live_teacher=None, live_outputs: tuple[str, ...] = ()) -> StageResult:
    """One stage through :meth:`Defense.run_stage`, plus its peak worker memory."""
    stage = d.stage(name, model, phases, epochs=epochs, lr=lr, live_teacher=live_teacher,
                    live_teacher_outputs=tuple(live_outputs) or ("logits",))
    result = d.run_stage(stage, streams)
    peaks = [h.get("peak_rss_mb") for h in result.history if h.get("peak_rss_mb") is not None]
    if peaks:
        d.stage_peak_mb = {**getattr(d, "stage_peak_mb", {}), name: max(peaks)}
    return result


def _cache(d: Defense, stream, model_dir: str, outputs: tuple[str, ...], **kwargs):
    """``stream`` plus ``teacher_*`` columns computed once by batch inference (timed)."""
    from kdshield.trainables.inference import predict

    t0 = time.perf_counter()
    out = predict(stream, model_dir, d.inputs.num_labels, outputs=outputs, prefix="teacher_", pad_ids=d.pad,
                  padding_side=d.padding_side, cpus_per_actor=d.job.scaling.cpus_per_worker, **kwargs).materialize()
    d.stage_seconds["teacher_cache"] = d.stage_seconds.get("teacher_cache", 0.0) + time.perf_counter() - t0
    return out


def _clean(d: Defense):
    from kdshield.trainables.defend import sample_per_class

    c = d.config
    return sample_per_class(d.inputs.clean, c.n_c, c.seed) if c.n_c else d.inputs.clean


# ----------------------------------------------------------------------------- MBTSAD

def _token_split_stream(d: Defense):
    import ray.data

    from kdshield.datasets import token_split_dataset

    c = d.config
    augmented = token_split_dataset(ray.data.from_arrow(_clean(d)), copies=c.copies, ratio=c.split_ratio,
                                    min_tokens=c.split_min_tokens, seed=c.seed)
    return d.stream(augmented)


def _ts_ft(d: Defense, stream) -> str:
    from kdshield.defenses.losses import CrossEntropy
    from kdshield.trainables.stage import ModelSpec, Phase

    c = d.config
    result = _stage(d, "ts_ft", ModelSpec(d.inputs.model_dir, d.inputs.num_labels),
                    [Phase("augmented", CrossEntropy())], {"augmented": stream},
                    epochs=c.retrain_epochs, lr=c.retrain_lr)
    return str(result.model_dir)


def run_ts_ft(d: Defense) -> tuple[str, dict]:
    """MBTSAD's first step alone: retrain a copy of the suspect model on token-split clean data."""
    return _ts_ft(d, _token_split_stream(d)), {}


def _lengths(stream) -> np.ndarray:
    parts = stream.select_columns(["input_ids"]).iter_batches(batch_size=None, batch_format="numpy")
    return np.array([len(x) for p in parts for x in p["input_ids"]], dtype=np.int64)


def run_mbtsad(d: Defense) -> tuple[str, dict]:
    """TS-FT -> attention distillation (teacher: the TS-FT model, student: the suspect model)."""
    from kdshield.defenses.mbtsad import MBTSADLoss
    from kdshield.models import hidden_size, load_config, num_layers
    from kdshield.trainables.inference import cache_bytes
    from kdshield.trainables.stage import ModelSpec, Phase

    c, i = d.config, d.inputs
    stream = _token_split_stream(d)
    teacher = _ts_ft(d, stream)
    info: dict[str, Any] = {"augmented_rows": int(stream.count())}
    if c.evaluate_teacher:
        say("evaluating the TS-FT teacher")
        info["ts_ft"] = d.evaluate(teacher)

    outputs = tuple(o for o, on in (("ae_token_map", c.use_attention), ("layer_seq", c.hidden_weight > 0)) if on)
    config = load_config(i.model_dir)
    need = cache_bytes(_lengths(stream), outputs, layers=num_layers(config), hidden=hidden_size(config),
                       num_labels=i.num_labels)
    mode = d.job.teacher_outputs
    if mode == "cached" and need > c.teacher_cache_limit_mb * 2**20:
        say(f"caching the teacher's outputs would take {need / 2**20:.0f} MB > teacher_cache_limit_mb "
            f"{c.teacher_cache_limit_mb:.0f}: the teacher runs live at every step instead")
        mode = "live"
    info.update(teacher_outputs=mode if outputs else "none", teacher_cache_mb=need / 2**20 if mode == "cached" else 0.0,
                teacher_cache_needed_mb=need / 2**20)
    live = None
    if outputs and mode == "cached":
        stream = _cache(d, stream, teacher, outputs)
    elif outputs:
        live = ModelSpec(teacher, i.num_labels, attn_implementation="eager" if c.use_attention else None)
    loss = MBTSADLoss(c.alpha, c.hidden_weight, attention=c.use_attention)
    student = ModelSpec(i.model_dir, i.num_labels, attn_implementation="eager" if c.use_attention else None)
    result = _stage(d, "distill", student, [Phase("augmented", loss)], {"augmented": stream},
                    epochs=c.distill_epochs, lr=c.distill_lr, live_teacher=live, live_outputs=outputs)
    return str(result.model_dir), info


def check_mbtsad(config, inputs: Inputs) -> None:
    """Before Ray: with the attention term, the suspect model must expose per-layer attention
    probabilities under eager attention (one per block)."""
    if not config.use_attention:
        return
    import torch

    from kdshield.models import load_classifier, num_layers
    from kdshield.models.attention import tap_attentions

    model, _ = load_classifier(inputs.model_dir, inputs.num_labels, attn_implementation="eager")
    seen: list[int] = []
    try:
        with torch.no_grad(), tap_attentions(model.eval(), lambda layer, probs: seen.append(layer)):
            model(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    except (ValueError, RuntimeError) as err:
        raise InputError(f"mbtsad: cannot read the attention maps of {inputs.model_dir}: {err}") from None
    if len(seen) != num_layers(model.config):
        raise InputError(f"mbtsad: found {len(seen)} attention maps for {num_layers(model.config)} blocks")


# ----------------------------------------------------------------------------- RobustKD

@dataclass(frozen=True)
class StudentPlan:
    """The resolved student and layer pairing of a RobustKD / feature-KD job."""

    source: str
    keep_layers: tuple[int, ...] | None
    init: str
    teacher_layers: list[int]   # teacher hidden-state indices (1..N_t), ending with N_t
    student_layers: list[int]   # the student's hidden-state indices, paired one to one
    teacher_width: int
    student_width: int
    teacher_params: int
    student_params: int


def plan_student(config, teacher_dir: str) -> StudentPlan:
    """Resolve and validate the student and the layer pairs (no Ray; InputError on a bad
    setting). Student parameters are counted from the teacher's safetensors (for a copy:
    the kept blocks' share) or the student's own."""
    from kdshield.models import (check_keep_layers, count_parameters, hidden_size, load_config, load_tokenizer,
                                 num_layers, resolve_model)

    tcfg = load_config(teacher_dir)
    n_t, width_t = num_layers(tcfg), hidden_size(tcfg)
    teacher_params = count_parameters(teacher_dir)
    if config.student == "copy":
        keep = config.student_layers
        if keep is None:
            keep = list(range(n_t - 1, -1, -2))[::-1]
        keep = check_keep_layers(keep, n_t, "robustkd: student_layers")
        source, n_s, width_s = teacher_dir, len(keep), width_t
        student_params = _copy_params(teacher_dir, keep, n_t)
        default_teacher = [k + 1 for k in keep]
    else:
        source = resolve_model(config.student)
        scfg = load_config(source)
        n_s, width_s = num_layers(scfg), hidden_size(scfg)
        keep = None
        if load_tokenizer(source).get_vocab() != load_tokenizer(teacher_dir).get_vocab():
            raise InputError(f"robustkd: student {config.student!r} does not share the teacher's tokenizer "
                             "(one token stream feeds both)")
        student_params = count_parameters(source)
        default_teacher = sorted({max(1, round((j + 1) * n_t / n_s)) for j in range(n_s)})
    if student_params > teacher_params:
        raise InputError(f"robustkd: the student ({student_params:,} parameters) is larger than the teacher "
                         f"({teacher_params:,}); RobustKD distils into a smaller model")
    teacher_layers = list(config.teacher_layers or default_teacher)
    bad = [t for t in teacher_layers if not 1 <= t <= n_t]
    if bad:
        raise InputError(f"robustkd: teacher_layers {bad} do not exist; the teacher has hidden states 1..{n_t}")
    if teacher_layers[-1] != n_t:
        raise InputError(f"robustkd: teacher_layers must end with the last block ({n_t}), whose feature the "
                         f"classifier reads; got {teacher_layers}")
    if config.student_feature_layers is None and len(teacher_layers) > n_s:
        raise InputError(f"robustkd: {len(teacher_layers)} teacher_layers but the student has only {n_s} "
                         "block(s) to pair them with")
    student_layers = list(config.student_feature_layers or range(n_s + 1 - len(teacher_layers), n_s + 1))
    bad = [s for s in student_layers if not 1 <= s <= n_s]
    if bad or not student_layers:
        raise InputError(f"robustkd: student_feature_layers {bad or student_layers} do not exist; the student "
                         f"has hidden states 1..{n_s} ({len(teacher_layers)} teacher layers need as many)")
    if len(student_layers) != len(teacher_layers):
        raise InputError(f"robustkd: {len(teacher_layers)} teacher_layers but {len(student_layers)} "
                         "student_feature_layers; they are distilled pairwise")
    return StudentPlan(source=source, keep_layers=tuple(keep) if keep is not None else None,
                       init=config.student_init, teacher_layers=teacher_layers, student_layers=student_layers,
                       teacher_width=width_t, student_width=width_s, teacher_params=teacher_params,
                       student_params=student_params)


def _copy_params(teacher_dir: str, keep, n_layers: int) -> int:
    """Parameters of a reduced-depth copy keeping ``keep`` of ``n_layers`` blocks, from the
    teacher's safetensors headers: the block weights are those named ``{prefix}.{index}.*``
    for the one prefix whose indices are exactly 0..n_layers-1."""
    import re
    from collections import defaultdict
    from pathlib import Path

    from safetensors import safe_open

    sizes: dict[str, int] = {}
    for f in sorted(Path(teacher_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                sizes[key] = int(np.prod(st.get_slice(key).get_shape()))
    pattern = re.compile(r"^(.*?)\.(\d+)\.")
    indices: dict[str, set[int]] = defaultdict(set)
    for key in sizes:
        m = pattern.match(key)
        if m:
            indices[m.group(1)].add(int(m.group(2)))
    blocks = [prefix for prefix, idx in indices.items() if idx == set(range(n_layers))]
    if not blocks:
        raise InputError(f"robustkd: cannot find the {n_layers} blocks among the teacher's weights")
    total = 0
    for key, count in sizes.items():
        m = pattern.match(key)
        if m is None or m.group(1) != blocks[0] or int(m.group(2)) in keep:
            total += count
    return total


def check_robustkd(config, inputs: Inputs) -> None:
    """Before Ray: the student plan is valid and the teacher's head can classify features."""
    from kdshield.models import load_classifier
    from kdshield.models.heads import classifier_head

    plan_student(config, inputs.model_dir)
    model, _ = load_classifier(inputs.model_dir, inputs.num_labels)
    classifier_head(model)


def _features(stream) -> tuple[np.ndarray, np.ndarray]:
    parts = list(stream.select_columns(["teacher_hidden_states", "label"]).iter_batches(
        batch_size=None, batch_format="numpy"))
    feats = np.concatenate([np.stack([np.asarray(r) for r in p["teacher_hidden_states"]]) for p in parts])
    return feats.astype(np.float32), np.concatenate([p["label"] for p in parts])


def _feature_kd(d: Defense, *, mask: bool) -> tuple[str, dict]:
    import torch

    from kdshield.defenses.robustkd import Connectors, Detox, DetoxLoss, FeatureKDLoss, detoxify, feature_variance
    from kdshield.models import count_parameters, load_classifier, load_config, model_family
    from kdshield.models.heads import classifier_head
    from kdshield.trainables.stage import ModelSpec, Phase

    c, i = d.config, d.inputs
    plan = plan_student(c, i.model_dir)
    stream = _cache(d, d.stream(_clean(d)), i.model_dir, ("hidden_states",))
    info: dict[str, Any] = {"teacher_layers": plan.teacher_layers, "student_feature_layers": plan.student_layers,
                            "student_keep_layers": list(plan.keep_layers) if plan.keep_layers else None}
    p = None
    if mask:
        feats, labels = _features(stream)
        chosen = torch.from_numpy(feats[:, plan.teacher_layers])  # [n, K, H]
        teacher_model, _ = load_classifier(i.model_dir, i.num_labels)
        head = classifier_head(teacher_model)
        detox = Detox(chosen.mean(0), c.m, c.detox, head)  # p initialised from the mean clean feature
        loss = DetoxLoss(detox, plan.teacher_layers, var_weight=c.var_weight, ce_weight=c.mask_ce_weight)
        result = _stage(d, "mask", None, [Phase("clean", loss)], {"clean": stream},
                        epochs=c.mask_epochs, lr=c.mask_lr)
        p = result.extras()["clean.p"]
        with torch.no_grad():
            y = torch.from_numpy(labels)
            after = detoxify(chosen, p, c.m, c.detox)
            info["mask"] = {  # Var(F') of the raw features, at p's initial value, and after the mask stage
                "var_before": feature_variance(chosen).tolist(),
                "var_init": feature_variance(detoxify(chosen, chosen.mean(0), c.m, c.detox)).tolist(),
                "var_after": feature_variance(after).tolist(),
                "head_acc_before": float(100 * (head(chosen[:, -1]).argmax(-1) == y).float().mean()),
                "head_acc_after": float(100 * (head(after[:, -1]).argmax(-1) == y).float().mean())}
        say(f"mask: feature variance of the last layer {info['mask']['var_before'][-1]:.4f} (raw), "
            f"{info['mask']['var_init'][-1]:.4f} (p at its initial value) -> "
            f"{info['mask']['var_after'][-1]:.4f} (trained); teacher head on clean features "
            f"{info['mask']['head_acc_before']:.1f}% -> {info['mask']['head_acc_after']:.1f}%")
    family = model_family(load_config(plan.source))
    with torch.random.fork_rng(devices=[]):  # connectors of unequal widths start the same in every run
        torch.manual_seed(c.seed)
        connectors = Connectors(len(plan.teacher_layers), plan.student_width, plan.teacher_width, p=p, m=c.m,
                                form=c.detox)
    loss = FeatureKDLoss(connectors, plan.teacher_layers, plan.student_layers, family,
                         feature_weight=c.feature_weight, ce_weight=c.ce_weight)
    student = ModelSpec(plan.source, i.num_labels, keep_layers=plan.keep_layers, init=plan.init)
    result = _stage(d, "distill", student, [Phase("clean", loss)], {"clean": stream},
                    epochs=c.distill_epochs, lr=c.distill_lr)
    model_dir = str(result.model_dir)
    student_params = count_parameters(model_dir)
    info.update(student_params=student_params, teacher_params=plan.teacher_params,
                compression=student_params / plan.teacher_params)
    say(f"student: {student_params:,} parameters = {100 * info['compression']:.1f}% of the teacher's")
    return model_dir, info


def run_robustkd(d: Defense) -> tuple[str, dict]:
    """Mask optimisation over the teacher's cached features -> feature distillation of the
    detoxified features into the smaller student."""
    return _feature_kd(d, mask=True)


def run_feature_kd(d: Defense) -> tuple[str, dict]:
    """Plain feature distillation into the same student (no masks): RobustKD's FKD baseline."""
    return _feature_kd(d, mask=False)


def _with_peaks(recipe):
    """Adds each stage's peak worker memory (rank 0's RSS, MB) to the recipe's info."""
    import functools

    @functools.wraps(recipe)
    def run(d: Defense) -> tuple[str, dict]:
        model, info = recipe(d)
        return model, {**info, "stage_peak_rss_mb": dict(getattr(d, "stage_peak_mb", {}))}

    return run


RECIPES = {name: _with_peaks(fn) for name, fn in (("ts-ft", run_ts_ft), ("mbtsad", run_mbtsad),
                                                   ("robustkd", run_robustkd), ("feature-kd", run_feature_kd))}


def check(job: DefendJob, inputs: Inputs) -> None:
    """Every model-dependent check of the methods here, before any Ray work."""
    from kdshield.config import parse_settings

    config = parse_settings(configs()[job.method], job.params, source=f"{job.method} settings")
    if job.method == "mbtsad":
        check_mbtsad(config, inputs)
    elif job.method in ("robustkd", "feature-kd"):
        check_robustkd(config, inputs)
