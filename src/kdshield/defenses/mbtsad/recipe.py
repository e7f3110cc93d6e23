"""MBTSAD's recipe (and ``ts-ft``, its first step alone): stages on the one engine.

* ``ts-ft``: a copy of the suspect model retrained on token-split clean data (cross-entropy).
* ``mbtsad``: TS-FT, then attention distillation into the suspect model with the TS-FT model
  as frozen teacher (its attention-enhancement maps and hidden states cached by batch
  inference, or computed live when caching them would cost more memory than
  ``teacher_cache_limit_mb``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdshield.datasets.augment import token_split_table
from kdshield.datasets.subsets import sample_per_class
from kdshield.defenses.base import Context, Inputs
from kdshield.defenses.losses import CrossEntropy
from kdshield.defenses.mbtsad.losses import MBTSADLoss
from kdshield.defenses.stage import ModelSpec, Phase
from kdshield.errors import InputError
from kdshield.models import hidden_size, load_classifier, load_config, num_layers
from kdshield.models.attention import tap_attentions
from kdshield.models.outputs import cache_bytes


def _token_split_stream(ctx: Context):
    """The clean set (``n_c`` per class), every row replaced by ``copies`` token-split rows, tokenised."""
    c = ctx.config
    clean = sample_per_class(ctx.inputs.clean, c.n_c, c.seed)
    return ctx.stream(token_split_table(clean, copies=c.copies, ratio=c.split_ratio, min_tokens=c.split_min_tokens,
                                        seed=c.seed))


def _ts_ft(ctx: Context, stream) -> str:
    c = ctx.config
    result = ctx.train("ts_ft", ModelSpec(ctx.inputs.model_dir, ctx.inputs.num_labels),
                       [Phase("augmented", CrossEntropy())], {"augmented": stream},
                       epochs=c.retrain_epochs, lr=c.retrain_lr)
    return str(result.model_dir)


def run_ts_ft(ctx: Context) -> tuple[str, dict]:
    """MBTSAD's first step alone: retrain a copy of the suspect model on token-split clean data."""
    return _ts_ft(ctx, _token_split_stream(ctx)), {}


def run_mbtsad(ctx: Context) -> tuple[str, dict]:
    """TS-FT -> attention distillation (teacher: the TS-FT model, student: the suspect model)."""
    c, i = ctx.config, ctx.inputs
    stream = _token_split_stream(ctx)
    teacher = _ts_ft(ctx, stream)
    lengths = np.array([len(x) for x in ctx.columns(stream, ["input_ids"])["input_ids"]], dtype=np.int64)
    info: dict[str, Any] = {"augmented_rows": int(len(lengths))}
    if c.evaluate_teacher:
        ctx.say("evaluating the TS-FT teacher")
        info["ts_ft"] = ctx.evaluate(teacher)

    outputs = tuple(o for o, on in (("ae_token_map", c.use_attention), ("layer_seq", c.hidden_weight > 0)) if on)
    config = load_config(i.model_dir)
    need = cache_bytes(lengths, outputs, layers=num_layers(config), hidden=hidden_size(config),
                       num_labels=i.num_labels)
    live = ctx.live_teachers
    if not live and need > c.teacher_cache_limit_mb * 2**20:
        ctx.say(f"caching the teacher's outputs would take {need / 2**20:.0f} MB > teacher_cache_limit_mb "
                f"{c.teacher_cache_limit_mb:.0f}: the teacher runs live at every step instead")
        live = True
    info.update(teacher_outputs=("live" if live else "cached") if outputs else "none",
                teacher_cache_mb=0.0 if live else need / 2**20, teacher_cache_needed_mb=need / 2**20)
    attn = "eager" if c.use_attention else None
    live_teacher = None
    if outputs and not live:
        stream = ctx.teacher(stream, teacher, outputs, attn_implementation=attn)
    elif outputs:
        live_teacher = ModelSpec(teacher, i.num_labels, attn_implementation=attn)
    loss = MBTSADLoss(c.alpha, c.hidden_weight, attention=c.use_attention,
                      eval_attention=c.student_attention == "eval")
    result = ctx.train("distill", ModelSpec(i.model_dir, i.num_labels, attn_implementation=attn),
                       [Phase("augmented", loss)], {"augmented": stream}, epochs=c.distill_epochs,
                       lr=c.distill_lr, live_teacher=live_teacher, live_outputs=outputs or ("logits",))
    return str(result.model_dir), info


def check_mbtsad(config, inputs: Inputs, teacher_outputs: str) -> None:
    """Before Ray: with the attention term, the suspect model must expose per-layer attention
    probabilities under eager attention (one per block)."""
    if not config.use_attention:
        return
    import torch

    model, _ = load_classifier(inputs.model_dir, inputs.num_labels, attn_implementation="eager")
    seen: list[int] = []
    try:
        with torch.no_grad(), tap_attentions(model.eval(), lambda layer, probs: seen.append(layer)):
            model(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    except (ValueError, RuntimeError) as err:
        raise InputError(f"mbtsad: cannot read the attention maps of {inputs.model_dir}: {err}") from None
    if len(seen) != num_layers(model.config):
        raise InputError(f"mbtsad: found {len(seen)} attention maps for {num_layers(model.config)} blocks")
