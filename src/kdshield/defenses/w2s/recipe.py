"""W2SDefense's recipe and its "LoRA" baseline ``lora-ft``: stages on the one engine.

* ``w2s``: stage ``teacher`` fully fine-tunes the weak teacher (default ``minilm``) on the clean
  data, with its projection ``g`` (joint) or followed by a ridge fit of ``g`` (fitted); the
  teacher's projected features and logits are then computed once by batch inference; stage
  ``student`` trains a LoRA adapter on the frozen suspect decoder with ``W2SLoss``
  (CE + T^2 KL + feature MSE).
* ``lora-ft``: the same adapter and budget, CE only (the papers' "LoRA" row: the backdoor stays).

Two tokenizers, one stream: the clean table is tokenised twice, row by row, into ``input_ids``
(the student's BPE) and ``teacher_input_ids`` (the teacher's WordPiece); the teacher stage
reads the second (``ModelSpec.input_prefix``), batch inference too. The student stage's stream
keeps only ``input_ids`` plus the cached ``teacher_feature`` and ``teacher_logits`` columns: the
teacher is frozen in that stage, so its outputs depend on the text alone, and caching them once
spares a teacher forward (and a second token stream) at every step of every epoch.
``--teacher-outputs live`` is therefore refused for ``w2s``.

OUT holds ``model/`` (the merged student), ``adapter/`` (the LoRA adapter, peft format,
safetensors) and for ``w2s`` ``teacher/`` (the teacher, its ``w2s_projection.safetensors`` and
``w2s_teacher.json``: pass it as ``teacher=OUT/teacher`` to reuse it without training).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from kdshield.datasets.subsets import sample_per_class
from kdshield.defenses.base import Context, Inputs
from kdshield.defenses.losses import CrossEntropy, seeded
from kdshield.defenses.stage import ModelSpec, Phase
from kdshield.defenses.w2s.losses import (TEACHER_FEATURE, TEACHER_LOGITS, TEACHER_PREFIX, ProjectedHead,
                                          TeacherLoss, W2SLoss, fit_projection, project)
from kdshield.errors import InputError
from kdshield.evaluation.metrics import clean_and_attack_metrics
from kdshield.models import (check_safe_weights, count_parameters, hidden_size, load_config, load_tokenizer,
                             model_family, resolve_model)
from kdshield.models.lora import LoraSpec, check_lora, default_rank

PROJECTION_FILE = "w2s_projection.safetensors"
TEACHER_INFO = "w2s_teacher.json"
TEACHER_OUTPUTS = ("pooled", "logits")


@dataclass(frozen=True)
class W2SPlan:
    """Resolved and validated models of a w2s / lora-ft job."""

    student_family: str
    student_width: int
    lora: LoraSpec
    teacher: str | None = None        # resolved teacher directory (w2s)
    teacher_ready: bool = False       # a finished W2S teacher (projection included): no stage 1
    teacher_width: int = 0
    teacher_family: str = "encoder"


def projection_shapes(teacher_dir: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes in a teacher's ``w2s_projection.safetensors`` (headers only)."""
    with safe_open(str(Path(teacher_dir, PROJECTION_FILE)), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def plan(config, inputs: Inputs, teacher_outputs: str = "cached") -> W2SPlan:
    """Every model-dependent check, before Ray (InputError, one line, on a bad setting); a
    :class:`~kdshield.defenses.w2s.config.W2SConfig` plans the teacher too."""
    method = "w2s" if hasattr(config, "teacher") else "lora-ft"
    scfg = load_config(inputs.model_dir)
    family, width = model_family(scfg), hidden_size(scfg)
    if method == "w2s" and family != "decoder":
        raise InputError(f"w2s: the student {inputs.model_dir!r} is an encoder ({scfg.model_type}); W2SDefense "
                         "tunes a decoder LLM (LLaMA, Qwen2 ...) with LoRA: give a decoder as --model")
    r = config.lora_r or default_rank(width)
    lora = LoraSpec(r=r, alpha=float(config.lora_alpha or r), dropout=config.lora_dropout,
                    target_modules=tuple(config.target_modules), train_head=config.train_head)
    check_lora(lora, inputs.model_dir, inputs.num_labels, what=f"{method}: lora")
    if method != "w2s":
        return W2SPlan(family, width, lora)
    if teacher_outputs == "live":
        raise InputError("w2s: the teacher's outputs are always cached (its own tokenizer, frozen in the student "
                         "stage); --teacher-outputs live is not supported")
    teacher = resolve_model(config.teacher)
    if Path(teacher).is_dir():
        check_safe_weights(teacher)
    tcfg = load_config(teacher)
    load_tokenizer(teacher)
    t_width = hidden_size(tcfg)
    ready = Path(teacher, PROJECTION_FILE).is_file()
    if ready:
        shapes = projection_shapes(teacher)
        shape = shapes.get("proj.weight")
        if shape is None or len(shape) != 2:
            raise InputError(f"w2s: {teacher}/{PROJECTION_FILE} holds no proj.weight matrix")
        if shape[0] != width:
            raise InputError(f"w2s: the teacher's projection maps to width {shape[0]} but the student "
                             f"{inputs.model_dir!r} has hidden size {width}; train a teacher for this student")
        if shape[1] != t_width:
            raise InputError(f"w2s: the teacher's projection reads width {shape[1]} but the teacher has hidden "
                             f"size {t_width}")
        cls = shapes.get("classifier.weight")
        if cls is not None and cls[0] != inputs.num_labels:
            raise InputError(f"w2s: the teacher's projected classifier has {cls[0]} labels, the data "
                             f"{inputs.num_labels}")
    return W2SPlan(family, width, lora, teacher=teacher, teacher_ready=ready, teacher_width=t_width,
                   teacher_family=model_family(tcfg))


def check_w2s(config, inputs: Inputs, teacher_outputs: str) -> None:
    plan(config, inputs, teacher_outputs)


# ----------------------------------------------------------------------------- the student (both methods)

def _student(ctx: Context, p: W2SPlan, stream, loss, name: str) -> tuple[str, dict]:
    c, i = ctx.config, ctx.inputs
    ctx.say(f"{name}: LoRA r={p.lora.r}, alpha={p.lora.alpha:g}, dropout={p.lora.dropout:g} on "
            f"{', '.join(p.lora.target_modules)}{' + head' if p.lora.train_head else ''}; {ctx.workers} worker(s)")
    result = ctx.train(name, ModelSpec(i.model_dir, i.num_labels, lora=p.lora), [Phase("clean", loss)],
                       {"clean": stream}, epochs=c.epochs, lr=c.lr)
    if result.adapter_dir is None:
        raise RuntimeError(f"stage {name} exported no adapter")
    adapter = ctx.work / "adapter"
    shutil.copytree(result.adapter_dir, adapter, dirs_exist_ok=True)
    lora_params = count_parameters(adapter)
    ctx.say(f"{name}: adapter of {lora_params:,} parameters written to {adapter}")
    return str(result.model_dir), {"lora": {"r": p.lora.r, "alpha": p.lora.alpha, "dropout": p.lora.dropout,
                                            "target_modules": list(p.lora.target_modules),
                                            "train_head": p.lora.train_head, "trainable_params": lora_params}}


def run_lora_ft(ctx: Context) -> tuple[str, dict]:
    """The "LoRA" baseline: the adapter trained with CE alone on the clean data."""
    c = ctx.config
    p = plan(c, ctx.inputs)
    return _student(ctx, p, ctx.stream(sample_per_class(ctx.inputs.clean, c.n_c, c.seed)), CrossEntropy(), "lora_ft")


# ----------------------------------------------------------------------------- W2SDefense

def _train_teacher(ctx: Context, p: W2SPlan, stream) -> tuple[str, dict[str, np.ndarray]]:
    """Stage 1: the teacher (and, joint, its projection) on the clean stream's teacher tokens."""
    c, i = ctx.config, ctx.inputs
    if c.projection == "joint":
        with seeded(c.seed):
            head = ProjectedHead(p.teacher_width, p.student_width, i.num_labels)
        loss = TeacherLoss(head, p.teacher_family)
    else:
        loss = CrossEntropy()
    result = ctx.train("teacher", ModelSpec(p.teacher, i.num_labels, input_prefix=TEACHER_PREFIX),
                       [Phase("clean", loss)], {"clean": stream}, epochs=c.teacher_epochs, lr=c.teacher_lr,
                       batch_size=c.teacher_batch_size)
    proj = {k.split(".", 1)[1]: v.numpy() for k, v in result.extras().items()}  # "clean.proj.weight" -> "proj.weight"
    return str(result.model_dir), proj


def _project_batch(batch: dict[str, np.ndarray], *, weight, bias, cls_weight, cls_bias) -> dict[str, np.ndarray]:
    """Cached teacher columns -> ``teacher_feature`` = g(pooled) [d_s] and, for the joint
    projection, ``teacher_logits`` = c(g(pooled)); the teacher's own tokens and raw feature go."""
    out = {k: v for k, v in batch.items() if k not in ("teacher_pooled", "teacher_input_ids")}
    feature = project(np.stack(list(batch["teacher_pooled"])), weight, bias)
    out[TEACHER_FEATURE] = feature
    if cls_weight is not None:
        out[TEACHER_LOGITS] = project(feature, cls_weight, cls_bias)
    return out


def _teacher_scores(ctx: Context, teacher_dir: str, proj: dict[str, np.ndarray]) -> dict[str, float]:
    """The teacher's CACC (and ASR) through the path the student is distilled from."""
    i = ctx.inputs

    def logits(table):
        stream = ctx.stream(table, tokenizer=teacher_dir, prefix=TEACHER_PREFIX)
        out = ctx.predict(stream, teacher_dir, TEACHER_OUTPUTS, input_prefix=TEACHER_PREFIX)
        z = out["logits"]
        if "classifier.weight" in proj:
            z = project(project(out["pooled"], proj["proj.weight"], proj["proj.bias"]),
                        proj["classifier.weight"], proj["classifier.bias"])
        return np.asarray(z), ctx.columns(stream, ["label"])["label"]

    z, y = logits(i.test)
    triggered = logits(i.triggered) if i.triggered is not None and i.target_label is not None else None
    return clean_and_attack_metrics(z, y, triggered, i.target_label)


def run_w2s(ctx: Context) -> tuple[str, dict]:
    """Teacher (+ projection) -> cached projected features and logits -> LoRA student."""
    c, i = ctx.config, ctx.inputs
    p = plan(c, i)
    clean_table = sample_per_class(i.clean, c.n_c, c.seed)
    # one stream, both tokenisations of every row: input_ids (student), teacher_input_ids (teacher)
    both = ctx.retokenize(ctx.stream(clean_table), p.teacher, prefix=TEACHER_PREFIX)
    info: dict[str, Any] = {"projection": c.projection, "clean_rows": int(clean_table.num_rows)}
    teacher = ctx.work / "teacher"
    if p.teacher_ready:
        ctx.say(f"teacher {p.teacher}: a finished W2S teacher, used as it is")
        shutil.copytree(p.teacher, teacher, dirs_exist_ok=True)
        proj = load_file(str(Path(p.teacher, PROJECTION_FILE)))
        info["teacher_reused"] = p.teacher
    else:
        trained, proj = _train_teacher(ctx, p, both)
        shutil.copytree(trained, teacher, dirs_exist_ok=True)

    with ctx.timed("teacher_cache"):
        cached = ctx.teacher(both, str(teacher), TEACHER_OUTPUTS, input_prefix=TEACHER_PREFIX)
        if not p.teacher_ready and c.projection == "fitted":
            ctx.say("fitting the projection onto the suspect student's clean features (ridge)")
            student = ctx.predict(ctx.stream(clean_table), i.model_dir, ("pooled",))["pooled"]
            xs = ctx.columns(cached, ["teacher_pooled"])["teacher_pooled"]
            w, b = fit_projection(np.stack(list(xs)), np.stack(list(student)), c.ridge)
            proj = {"proj.weight": w, "proj.bias": b}
        if not p.teacher_ready:
            save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in proj.items()},
                      str(teacher / PROJECTION_FILE))
            (teacher / TEACHER_INFO).write_text(json.dumps({
                "projection": c.projection, "student": i.model_dir, "student_width": p.student_width,
                "teacher_source": p.teacher, "num_labels": i.num_labels}, indent=2) + "\n")
        joint = "classifier.weight" in proj
        stream = ctx.map(cached, _project_batch, weight=proj["proj.weight"], bias=proj["proj.bias"],
                         cls_weight=proj.get("classifier.weight") if joint else None,
                         cls_bias=proj.get("classifier.bias") if joint else None)
    if c.evaluate_teacher:
        ctx.say("evaluating the teacher")
        info["teacher"] = _teacher_scores(ctx, str(teacher), proj)
        ctx.say(f"teacher: CACC {info['teacher']['cacc']:.1f}%"
                + (f", ASR {info['teacher']['asr']:.1f}%" if "asr" in info["teacher"] else ""))
    alpha, beta, gamma = c.loss_weights
    info["loss_weights"] = {"alpha": alpha, "beta": beta, "gamma": gamma, "temperature": c.temperature}
    model_dir, student_info = _student(ctx, p, stream, W2SLoss(alpha, beta, gamma, c.temperature, p.student_family),
                                       "student")
    info.update(student_info)
    return model_dir, info
