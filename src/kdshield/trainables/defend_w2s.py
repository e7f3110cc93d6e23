"""Recipes of the LoRA defenses: W2SDefense and its "LoRA" baseline, stages on the one engine.

* ``w2s``: stage ``teacher`` fully fine-tunes the weak teacher (default ``minilm``) on the clean
  data, with its projection ``g`` (joint) or followed by a ridge fit of ``g`` (fitted); the
  teacher's projected features and logits are then computed once by Ray Data batch inference;
  stage ``student`` trains a LoRA adapter on the frozen suspect decoder with
  :class:`kdshield.defenses.w2s.W2SLoss` (CE + T^2 KL + feature MSE).
* ``lora-ft``: the same adapter and budget, CE only (the papers' "LoRA" row: the backdoor stays).

Two tokenizers, one stream: the clean table is tokenised twice, row by row in one Ray Data
pipeline, into ``input_ids`` (the student's BPE) and ``teacher_input_ids`` (the teacher's
WordPiece); the teacher stage reads the second (``ModelSpec.input_prefix``), batch inference
too. The student stage's stream keeps only ``input_ids`` plus the cached ``teacher_feature``
and ``teacher_logits`` columns: the teacher is frozen in that stage, so its outputs depend on
the text alone, and caching them once spares a teacher forward (and a second token stream) at
every step of every epoch. ``--teacher-outputs live`` is therefore refused for ``w2s``.

OUT holds ``model/`` (the merged student, a plain HF directory), ``adapter/`` (the LoRA adapter,
peft format, safetensors) and for ``w2s`` ``teacher/`` (the teacher, its
``w2s_projection.safetensors`` and ``w2s_teacher.json``: pass it as ``teacher=OUT/teacher`` to
reuse it without training). Settings: :class:`kdshield.defenses.w2s.W2SConfig`; everything that
depends on the models is checked by :func:`check` before any Ray work.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdshield.errors import InputError
from kdshield.trainables.runs import say

if TYPE_CHECKING:
    from kdshield.models.lora import LoraSpec
    from kdshield.trainables.defend import Defense, DefendJob, Inputs
    from kdshield.trainables.engine import StageResult

PROJECTION_FILE = "w2s_projection.safetensors"
TEACHER_INFO = "w2s_teacher.json"


def configs() -> dict[str, type]:
    from kdshield.defenses.w2s import W2SConfig

    return {"w2s": W2SConfig, "lora-ft": W2SConfig}


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
    from safetensors import safe_open

    with safe_open(str(Path(teacher_dir, PROJECTION_FILE)), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def plan(config, inputs: Inputs, method: str, teacher_outputs: str = "cached") -> W2SPlan:
    """Every model-dependent check, before Ray (InputError, one line, on a bad setting)."""
    from kdshield.models import (check_safe_weights, hidden_size, load_config, load_tokenizer, model_family,
                                 resolve_model)
    from kdshield.models.lora import LoraSpec, check_lora, default_rank

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


def check(job: DefendJob, inputs: Inputs) -> None:
    from kdshield.config import parse_settings

    config = parse_settings(configs()[job.method], job.params, source=f"{job.method} settings")
    plan(config, inputs, job.method, job.teacher_outputs)


# ----------------------------------------------------------------------------- helpers

def _run(d: Defense, name: str, model, loss, stream, *, epochs: int, lr: float, batch_size: int,
         pad: dict, side) -> StageResult:
    from kdshield.trainables.stage import Phase

    stage = d.stage(name, model, (Phase("clean", loss),), epochs=epochs, lr=lr, batch_size=batch_size,
                    pad_ids=pad, padding_side=side)
    return d.run_stage(stage, {"clean": stream})


def _memory(result: StageResult) -> dict[str, Any]:
    """Peak memory of a stage per worker (MB): whole process, training only, after init."""
    out: dict[str, Any] = {}
    for key in ("peak_rss_mb_per_rank", "train_peak_rss_mb_per_rank", "rss_after_init_mb_per_rank"):
        rows = [h.get(key) for h in result.history if h.get(key)]
        if rows:
            out[key] = [max((r[i] for r in rows if r[i] is not None), default=None) for i in range(len(rows[0]))]
    return out


def _ordered(ds, columns: list[str]) -> dict[str, np.ndarray]:
    """Columns of a Ray Dataset as arrays in ``source_index`` order."""
    parts = list(ds.select_columns(["source_index", *columns]).iter_batches(batch_size=None, batch_format="numpy"))
    order = np.argsort(np.concatenate([p["source_index"] for p in parts]), kind="stable")
    return {c: np.concatenate([np.asarray(p[c]) for p in parts])[order] for c in ["source_index", *columns]}


def _project_batch(batch: dict[str, np.ndarray], *, weight, bias, cls_weight, cls_bias) -> dict[str, np.ndarray]:
    """Cached teacher columns -> ``teacher_feature`` = g(pooled) [d_s] and, for the joint
    projection, ``teacher_logits`` = c(g(pooled)); the teacher's own tokens and raw feature go."""
    from kdshield.defenses.w2s import TEACHER_FEATURE, TEACHER_LOGITS, project

    out = {k: v for k, v in batch.items() if k not in ("teacher_pooled", "teacher_input_ids")}
    feature = project(np.stack(list(batch["teacher_pooled"])), weight, bias)
    out[TEACHER_FEATURE] = feature
    if cls_weight is not None:
        out[TEACHER_LOGITS] = project(feature, cls_weight, cls_bias)
    return out


def _load_projection(teacher_dir: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(Path(teacher_dir, PROJECTION_FILE)))


def _teacher_predict(d: Defense, ds, teacher_dir: str, tpad: int):
    from kdshield.trainables.inference import predict

    return predict(ds, teacher_dir, d.inputs.num_labels, outputs=("pooled", "logits"), prefix="teacher_",
                   input_key="teacher_input_ids", pad_ids={"teacher_input_ids": tpad}, padding_side="right",
                   cpus_per_actor=d.job.scaling.cpus_per_worker)


def _teacher_scores(d: Defense, teacher_dir: str, tpad: int, proj: dict[str, np.ndarray]) -> dict[str, float]:
    """The teacher's CACC (and ASR) through the path the student is distilled from."""
    from kdshield.defenses.w2s import project
    from kdshield.trainables.attack import tokenized_stream
    from kdshield.trainables.inference import clean_and_attack_metrics

    i, c = d.inputs, d.config

    def logits(table):
        ds = _teacher_predict(d, tokenized_stream(table, teacher_dir, c.max_length, prefix="teacher_"),
                              teacher_dir, tpad)
        cols = _ordered(ds, ["label", "teacher_pooled", "teacher_logits"])
        z = cols["teacher_logits"]
        if "classifier.weight" in proj:
            z = project(project(np.stack(list(cols["teacher_pooled"])), proj["proj.weight"], proj["proj.bias"]),
                        proj["classifier.weight"], proj["classifier.bias"])
        return np.asarray(np.stack(list(z))), cols["label"]

    z, y = logits(i.test)
    triggered = logits(i.triggered) if i.triggered is not None and i.target_label is not None else None
    return clean_and_attack_metrics(z, y, triggered, i.target_label)


# ----------------------------------------------------------------------------- recipes

def _student(d: Defense, p: W2SPlan, stream, loss, name: str) -> tuple[str, dict]:
    from kdshield.trainables.stage import ModelSpec

    c, i = d.config, d.inputs
    model = ModelSpec(i.model_dir, i.num_labels, lora=p.lora)
    say(f"{name}: LoRA r={p.lora.r}, alpha={p.lora.alpha:g}, dropout={p.lora.dropout:g} on "
        f"{', '.join(p.lora.target_modules)}{' + head' if p.lora.train_head else ''}; {d.job.scaling.workers} "
        f"worker(s), ZeRO-{d.job.scaling.zero}")
    result = _run(d, name, model, loss, stream, epochs=c.epochs, lr=c.lr, batch_size=c.batch_size, pad=d.pad,
                  side=c.padding_side)
    if result.adapter_dir is None:
        raise RuntimeError(f"stage {name} exported no adapter")
    adapter = d.work / "adapter"
    shutil.copytree(result.adapter_dir, adapter, dirs_exist_ok=True)
    from kdshield.models import count_parameters

    lora_params = count_parameters(adapter)
    info = {"lora": {"r": p.lora.r, "alpha": p.lora.alpha, "dropout": p.lora.dropout,
                     "target_modules": list(p.lora.target_modules), "train_head": p.lora.train_head,
                     "trainable_params": lora_params},
            "stage_memory_mb": {name: _memory(result)}}
    say(f"{name}: adapter of {lora_params:,} parameters written to {adapter}")
    return str(result.model_dir), info


def run_lora_ft(d: Defense) -> tuple[str, dict]:
    """The "LoRA" baseline: the adapter trained with CE alone on the clean data."""
    from kdshield.defenses.w2s import W2SLoss
    from kdshield.trainables.defend_feature import _clean

    c = d.config
    p = plan(c, d.inputs, "lora-ft")
    d.padding_side = c.padding_side
    loss = W2SLoss(1.0, 0.0, 0.0, c.temperature, p.student_family)
    return _student(d, p, d.stream(_clean(d)), loss, "lora_ft")


def _train_teacher(d: Defense, p: W2SPlan, stream, tpad: int, spad: int) -> tuple[str, dict[str, np.ndarray]]:
    """Stage 1: the teacher (and, joint, its projection) on the clean stream's teacher tokens."""
    import torch

    from kdshield.defenses.losses import CrossEntropy
    from kdshield.defenses.w2s import ProjectedHead, TeacherLoss
    from kdshield.trainables.stage import ModelSpec

    c, i = d.config, d.inputs
    if c.projection == "joint":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            head = ProjectedHead(p.teacher_width, p.student_width, i.num_labels)
        loss = TeacherLoss(head, p.teacher_family)
    else:
        loss = CrossEntropy()
    model = ModelSpec(p.teacher, i.num_labels, input_prefix="teacher_")
    result = _run(d, "teacher", model, loss, stream, epochs=c.teacher_epochs, lr=c.teacher_lr,
                  batch_size=c.teacher_batch_size, pad={"input_ids": spad, "teacher_input_ids": tpad},
                  side={"input_ids": c.padding_side, "teacher_input_ids": "right"})
    proj = {k.split(".", 1)[1]: v.numpy() for k, v in result.extras().items()}  # "clean.proj.weight" -> "proj.weight"
    return str(result.model_dir), proj


def run_w2s(d: Defense) -> tuple[str, dict]:
    """Teacher (+ projection) -> cached projected features and logits -> LoRA student."""
    from kdshield.datasets import tokenize_dataset
    from kdshield.defenses.w2s import W2SLoss, fit_projection
    from kdshield.models import load_tokenizer
    from kdshield.trainables.defend_feature import _clean
    from kdshield.trainables.engine import copy_model
    from kdshield.trainables.inference import predict

    c, i = d.config, d.inputs
    p = plan(c, i, "w2s", d.job.teacher_outputs)
    d.padding_side = c.padding_side
    tpad, spad = load_tokenizer(p.teacher).pad_token_id, d.pad["input_ids"]
    clean_table = _clean(d)
    # one stream, both tokenisations of every row: input_ids (student), teacher_input_ids (teacher)
    both = tokenize_dataset(d.stream(clean_table), p.teacher, max_length=c.max_length,
                            prefix="teacher_").materialize()
    info: dict[str, Any] = {"projection": c.projection, "clean_rows": int(clean_table.num_rows)}
    teacher_out = d.work / "teacher"
    if p.teacher_ready:
        say(f"teacher {p.teacher}: a finished W2S teacher, used as it is")
        copy_model(Path(p.teacher), teacher_out)
        proj = _load_projection(p.teacher)
        info["teacher_reused"] = p.teacher
    else:
        trained, proj = _train_teacher(d, p, both, tpad, spad)
        copy_model(Path(trained), teacher_out)
    teacher = str(teacher_out)

    t0 = time.perf_counter()
    cached = _teacher_predict(d, both, teacher, tpad).materialize()
    if not p.teacher_ready and c.projection == "fitted":
        say("fitting the projection onto the suspect student's clean features (ridge)")
        student = predict(d.stream(clean_table), i.model_dir, i.num_labels, outputs=("pooled",), prefix="student_",
                          pad_ids=d.pad, padding_side=c.padding_side, cpus_per_actor=d.job.scaling.cpus_per_worker)
        xs = _ordered(cached, ["teacher_pooled"])
        ys = _ordered(student, ["student_pooled"])
        w, b = fit_projection(np.stack(list(xs["teacher_pooled"])), np.stack(list(ys["student_pooled"])), c.ridge)
        proj = {"proj.weight": w, "proj.bias": b}
    if not p.teacher_ready:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in proj.items()},
                  str(teacher_out / PROJECTION_FILE))
        (teacher_out / TEACHER_INFO).write_text(json.dumps({
            "projection": c.projection, "student": i.model_dir, "student_width": p.student_width,
            "teacher_source": p.teacher, "num_labels": i.num_labels}, indent=2) + "\n")
    joint = "classifier.weight" in proj
    stream = cached.map_batches(_project_batch, batch_format="numpy", fn_kwargs={
        "weight": proj["proj.weight"], "bias": proj["proj.bias"],
        "cls_weight": proj.get("classifier.weight") if joint else None,
        "cls_bias": proj.get("classifier.bias") if joint else None}).materialize()
    d.stage_seconds["teacher_cache"] = time.perf_counter() - t0
    if c.evaluate_teacher:
        say("evaluating the teacher")
        info["teacher"] = _teacher_scores(d, teacher, tpad, proj)
        say(f"teacher: CACC {info['teacher']['cacc']:.1f}%"
            + (f", ASR {info['teacher']['asr']:.1f}%" if "asr" in info["teacher"] else ""))
    alpha, beta, gamma = c.loss_weights
    info["loss_weights"] = {"alpha": alpha, "beta": beta, "gamma": gamma, "temperature": c.temperature}
    loss = W2SLoss(alpha, beta, gamma, c.temperature, p.student_family)
    model_dir, student_info = _student(d, p, stream, loss, "student")
    if "teacher" in d.history:
        student_info["stage_memory_mb"]["teacher"] = _memory_from(d.history["teacher"])
    info.update(student_info)
    return model_dir, info


def _memory_from(history: list[dict]) -> dict[str, Any]:
    from types import SimpleNamespace

    return _memory(SimpleNamespace(history=history))


RECIPES = {"w2s": run_w2s, "lora-ft": run_lora_ft}
