"""NAD's recipe: fine-tune a teacher, then distil its attention maps into the suspect model.

1. ``teacher``: a copy of the suspect model fine-tuned on the clean set (cross-entropy). Fine-tuning
   alone weakens the backdoor only partly (the ``ft`` baseline), but it moves the layers' attention
   away from the trigger.
2. ``distill``: the suspect model itself is the student; the frozen teacher's per-layer hidden
   states on the clean set are cached once by batch inference (or computed live with
   ``--teacher-outputs live``) and the student learns CE + beta * the attention-map distance.
"""

from __future__ import annotations

from kdshield.datasets.subsets import sample_per_class
from kdshield.defenses.base import Context, Inputs
from kdshield.defenses.losses import CrossEntropy
from kdshield.defenses.nad.losses import TEACHER_OUTPUTS, NADLoss
from kdshield.defenses.stage import ModelSpec, Phase
from kdshield.errors import InputError
from kdshield.models import load_config, num_layers


def distilled_layers(config, model_dir: str) -> list[int]:
    """The hidden-state indices NAD distils (validated against the model: InputError otherwise)."""
    n = num_layers(load_config(model_dir))
    layers = config.layers or list(range(1, n + 1))
    bad = [k for k in layers if not 1 <= k <= n]
    if bad:
        raise InputError(f"nad: layers {bad} do not exist; the suspect model has hidden states 1..{n}")
    return layers


def check_nad(config, inputs: Inputs, teacher_outputs: str) -> None:
    distilled_layers(config, inputs.model_dir)


def run_nad(ctx: Context) -> tuple[str, dict]:
    """Teacher fine-tuning -> attention distillation into the suspect model."""
    c, i = ctx.config, ctx.inputs
    layers = distilled_layers(c, i.model_dir)
    clean = ctx.stream(sample_per_class(i.clean, c.n_c, c.seed))
    suspect = ModelSpec(i.model_dir, i.num_labels)
    teacher = str(ctx.train("teacher", suspect, [Phase("clean", CrossEntropy())], {"clean": clean},
                            epochs=c.teacher_epochs, lr=c.teacher_lr).model_dir)
    info: dict = {"distilled_layers": layers}
    if c.evaluate_teacher:
        ctx.say("evaluating the fine-tuned teacher")
        info["teacher"] = ctx.evaluate(teacher)
    live = ModelSpec(teacher, i.num_labels) if ctx.live_teachers else None
    streams = {"clean": clean if live else ctx.teacher(clean, teacher, TEACHER_OUTPUTS)}
    result = ctx.train("distill", suspect, [Phase("clean", NADLoss(c.beta, layers, c.p))], streams,
                       epochs=c.epochs, lr=c.lr, live_teacher=live, live_outputs=TEACHER_OUTPUTS)
    return str(result.model_dir), info
