"""What a caller (a Tune trial) can plug into a defense without touching its recipe.

:class:`DefenseHooks` travels into :class:`kdshield.trainables.context.JobContext`; every recipe
gets it for free because the hooks act in the context methods every recipe calls (``stream``,
``teacher``, ``predict`` and ``train``, through which every stage of every recipe runs), never inside
a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from kdshield.trainables.stage_cache import StageCache


@dataclass
class DefenseHooks:
    cache: StageCache | None = None
    """Content-hashed shared work (stages, teacher outputs, logits, tokenised streams)."""
    callbacks: list | None = None
    """Ray Train callbacks for every stage's TorchTrainer (e.g. Tune reporting)."""
    on_report: Callable[[str, dict], None] | None = None
    """What a stage that trains in process calls with every epoch's report (run name, metrics),
    where a worker group's reports go to ``callbacks``."""
    eval_streams: dict[str, Any] = field(default_factory=dict)
    """Tokenised streams evaluated after every epoch (``Stage.evals``) of ``eval_stages``."""
    eval_stages: tuple[str, ...] = ()
    """Names of the stages that get ``eval_streams`` (those training the defended model)."""
    stage_runs: Any = None
    """A :class:`~kdshield.trainables.stage_runs.StageRuns`: stages run under fixed names outside
    the job's staging directory, so a job re-run after its process died resumes them from their
    checkpoints (a retried Tune trial). None: fresh runs in the staging directory."""
