"""RobustKD's recipe (and ``feature-kd``, the same student and distillation without masks).

* ``robustkd``: the suspect model is the (frozen) teacher; its pooled per-layer features on the
  clean set are cached once; a model-less stage optimises the detoxification masks over them;
  then a smaller student (a reduced-depth copy of the teacher, or a preset sharing its
  tokenizer) learns the detoxified features through linear connectors, plus CE.
* ``feature-kd``: the same student and distillation without masks (the paper's FKD baseline).

``--teacher-outputs live`` does not apply: the cached teacher features are one pooled vector per
layer and sample (4 (N+1) H bytes: 10.8 KB for MiniLM), always cheaper to cache than to
recompute at every step of the mask and distillation stages.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from kdshield.datasets.subsets import sample_per_class
from kdshield.defenses.base import Context, Inputs
from kdshield.defenses.losses import seeded
from kdshield.defenses.robustkd.losses import (TEACHER_FEATURES, Connectors, Detox, DetoxLoss, FeatureKDLoss,
                                               detoxify, feature_variance)
from kdshield.defenses.stage import ModelSpec, Phase
from kdshield.errors import InputError
from kdshield.models import (check_keep_layers, count_parameters, hidden_size, load_classifier, load_config,
                             load_tokenizer, model_family, num_layers, resolve_model)
from kdshield.models.heads import classifier_head


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


def check_robustkd(config, inputs: Inputs, teacher_outputs: str) -> None:
    """Before Ray: the student plan is valid and the teacher's head can classify features."""
    plan_student(config, inputs.model_dir)
    model, _ = load_classifier(inputs.model_dir, inputs.num_labels)
    classifier_head(model)


def _mask_stage(ctx: Context, stream, plan: StudentPlan) -> tuple[torch.Tensor, dict[str, Any]]:
    """Optimise the detoxification masks ``p`` over the teacher's cached clean features (a stage
    with no model); returns ``p`` [K, H] and what the masks did to the features."""
    c, i = ctx.config, ctx.inputs
    cols = ctx.columns(stream, [TEACHER_FEATURES, "label"])
    feats = np.stack([np.asarray(r) for r in cols[TEACHER_FEATURES]]).astype(np.float32)
    chosen = torch.from_numpy(feats[:, plan.teacher_layers])  # [n, K, H]
    teacher_model, _ = load_classifier(i.model_dir, i.num_labels)
    head = classifier_head(teacher_model)
    detox = Detox(chosen.mean(0), c.m, c.detox, head)  # p initialised from the mean clean feature
    loss = DetoxLoss(detox, plan.teacher_layers, var_weight=c.var_weight, ce_weight=c.mask_ce_weight)
    result = ctx.train("mask", None, [Phase("clean", loss)], {"clean": stream}, epochs=c.mask_epochs, lr=c.mask_lr)
    p = result.extras()["clean.p"]
    with torch.no_grad():
        y = torch.from_numpy(cols["label"])
        after = detoxify(chosen, p, c.m, c.detox)
        info = {  # Var(F') of the raw features, at p's initial value, and after the mask stage
            "var_before": feature_variance(chosen).tolist(),
            "var_init": feature_variance(detoxify(chosen, chosen.mean(0), c.m, c.detox)).tolist(),
            "var_after": feature_variance(after).tolist(),
            "head_acc_before": float(100 * (head(chosen[:, -1]).argmax(-1) == y).float().mean()),
            "head_acc_after": float(100 * (head(after[:, -1]).argmax(-1) == y).float().mean())}
    ctx.say(f"mask: feature variance of the last layer {info['var_before'][-1]:.4f} (raw), "
            f"{info['var_init'][-1]:.4f} (p at its initial value) -> {info['var_after'][-1]:.4f} (trained); "
            f"teacher head on clean features {info['head_acc_before']:.1f}% -> {info['head_acc_after']:.1f}%")
    return p, info


def _feature_kd(ctx: Context, *, mask: bool) -> tuple[str, dict]:
    c, i = ctx.config, ctx.inputs
    plan = plan_student(c, i.model_dir)
    stream = ctx.teacher(ctx.stream(sample_per_class(i.clean, c.n_c, c.seed)), i.model_dir, ("hidden_states",))
    info: dict[str, Any] = {"teacher_layers": plan.teacher_layers, "student_feature_layers": plan.student_layers,
                            "student_keep_layers": list(plan.keep_layers) if plan.keep_layers else None}
    p, detox = None, {}
    if mask:
        p, info["mask"] = _mask_stage(ctx, stream, plan)
        detox = {"p": p, "m": c.m, "form": c.detox}
    with seeded(c.seed):  # connectors of unequal widths start the same in every run
        connectors = Connectors(len(plan.teacher_layers), plan.student_width, plan.teacher_width, **detox)
    loss = FeatureKDLoss(connectors, plan.teacher_layers, plan.student_layers, model_family(load_config(plan.source)),
                         feature_weight=c.feature_weight, ce_weight=c.ce_weight)
    student = ModelSpec(plan.source, i.num_labels, keep_layers=plan.keep_layers, init=plan.init)
    result = ctx.train("distill", student, [Phase("clean", loss)], {"clean": stream},
                       epochs=c.distill_epochs, lr=c.distill_lr)
    model_dir = str(result.model_dir)
    student_params = count_parameters(model_dir)
    info.update(student_params=student_params, teacher_params=plan.teacher_params,
                compression=student_params / plan.teacher_params)
    ctx.say(f"student: {student_params:,} parameters = {100 * info['compression']:.1f}% of the teacher's")
    return model_dir, info


def run_robustkd(ctx: Context) -> tuple[str, dict]:
    """Mask optimisation over the teacher's cached features -> feature distillation of the
    detoxified features into the smaller student."""
    return _feature_kd(ctx, mask=True)


def run_feature_kd(ctx: Context) -> tuple[str, dict]:
    """Plain feature distillation into the same student (no masks): RobustKD's FKD baseline."""
    return _feature_kd(ctx, mask=False)
