"""Durable, named stage runs: a job re-run after its process died picks its stages up again.

By default every stage of a job is a Ray Train run with a fresh, timestamped name inside the
job's staging directory, so a job that dies starts over. A Tune trial that Tune retries after
its process was killed (``kdshield tune --trial-retries``) should not: :class:`StageRuns` runs
each stage under a fixed root with a name that is the same on every attempt of the job, and

- Ray Train V2 restores a run whose ``storage_path``/``name`` already hold a checkpoint-manager
  snapshot (``checkpoint_manager_snapshot.json``): the workers get its latest checkpoint from
  ``ray.train.get_checkpoint()`` and the engine resumes from that epoch (``start_epoch`` in the
  metrics of the epochs that follow); a stage that trains in process names its latest
  checkpoint in ``kdshield_latest.json`` instead, and is resumed from it the same way;
- a run that had already finished (its latest checkpoint is the engine's final export: a state
  file at the last epoch and no DeepSpeed state) is returned as it is, without training: the
  engine cannot resume from a final export, and there is nothing left to train;
- a snapshot that cannot be read (the process died while Ray wrote it) would fail every
  restore: that run starts over.

Names: with a stage cache, ``{stage}-{stage key}`` (the content hash of everything the stage
depends on, so two stages of one job never share a run, and a stage that the cache already
holds is never run at all); without one, ``{stage}-{n}``, counting the runs of that stage name
in this job (a job runs its stages in the same order on every attempt).

Every attempt is appended to ``log`` (JSON lines: run name, pid, the checkpoint it started
from or ``finished`` when it was reused), which is how tests and people see what resumed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kdshield.trainables.engine import (
    ADAPTER_DIR,
    DS_TAG,
    EXTRAS_FILE,
    HF_MODEL_DIR,
    STATE_FILE,
    StageResult,
    latest_in_process_checkpoint,
    run_stage,
    trains_in_process,
    verify_manifest,
)
from kdshield.outputs import say

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints


class StageRuns:
    """Runs stages as Ray Train runs named ``{stage}-{key}`` under ``root`` (see the module doc).

    ``checkpoint_interval_s`` (None: the stage's own) overrides how often a stage checkpoints;
    it changes nothing the stage computes, so it is not part of the stage's cache key.
    """

    def __init__(self, root: str | Path, *, cache=None, checkpoint_interval_s: float | None = None,
                 log: str | Path | None = None):
        self.root = Path(root).resolve()
        self.cache = cache
        self.checkpoint_interval_s = checkpoint_interval_s
        self.log = Path(log) if log is not None else self.root / "attempts.jsonl"
        self._count: Counter[str] = Counter()

    def name(self, stage, streams: dict[str, Any], scaling) -> str:
        if self.cache is not None:
            return f"{stage.name}-{self.cache.stage_key(stage, streams, scaling)[:16]}"
        self._count[stage.name] += 1
        return f"{stage.name}-{self._count[stage.name]}"

    def run(self, stage, streams: dict[str, Any], scaling, *, callbacks: list | None = None, on_report=None):
        """The :class:`~kdshield.trainables.engine.StageResult` of ``stage``: resumed, reused or new."""
        name = self.name(stage, streams, scaling)
        run_dir = self.root / name
        in_process = trains_in_process(scaling)
        if in_process:
            found = latest_in_process_checkpoint(run_dir)
            latest = found.name if found is not None else None
        else:
            latest = self._latest_checkpoint(run_dir)
        if latest is not None:
            # checked here, in the job's process, so a tampered checkpoint is one line and no
            # worker group is started (and retried) only to refuse it
            verify_manifest(run_dir / latest)
            finished = finished_result(run_dir / latest, stage)
            if finished is not None:
                self._record(name, "finished", latest)
                say(f"stage {stage.name}: its run {name} had finished; reusing it")
                return finished
            say(f"stage {stage.name}: resuming run {name} from {latest}")
        self._record(name, "start", latest)
        if self.checkpoint_interval_s is not None:
            stage = dataclasses.replace(stage, train=stage.train.model_copy(
                update={"checkpoint_interval_s": self.checkpoint_interval_s}))
        return run_stage(stage, streams, scaling, storage=self.root, run_name=name, callbacks=callbacks,
                         on_report=on_report, resume_from=run_dir / latest if in_process and latest else None)

    def _latest_checkpoint(self, run_dir: Path) -> str | None:
        """The directory name of the run's latest checkpoint (None: no usable snapshot)."""
        snapshot = run_dir / SNAPSHOT
        if not snapshot.is_file():
            return None
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
            name = latest["checkpoint_dir_name"] if latest else None
        except (ValueError, KeyError, TypeError):
            say(f"{snapshot}: unreadable (the process died while writing it); the run starts over")
            shutil.rmtree(run_dir, ignore_errors=True)
            return None
        if name is not None and not (run_dir / name).is_dir():
            say(f"{run_dir}: its latest checkpoint {name} is missing; the run starts over")
            shutil.rmtree(run_dir, ignore_errors=True)
            return None
        return name

    def _record(self, name: str, event: str, checkpoint: str | None) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as f:
            f.write(json.dumps({"run": name, "event": event, "checkpoint": checkpoint, "pid": os.getpid(),
                                "time": time.time()}) + "\n")


def finished_result(checkpoint: Path, stage):
    """The StageResult a finished run left in its final ``checkpoint`` (None: not a final export)."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if (checkpoint / DS_TAG).exists() or state.get("epoch") != stage.train.epochs:
        return None
    model_dir = checkpoint / HF_MODEL_DIR
    if stage.model is not None and not (model_dir / "config.json").is_file():
        return None
    history = state["history"]
    extras, adapter = checkpoint / EXTRAS_FILE, checkpoint / ADAPTER_DIR
    return StageResult(model_dir=model_dir if stage.model is not None else None, metrics=dict(history[-1]),
                       history=history, seconds=sum(float(h.get("epoch_seconds", 0.0)) for h in history),
                       checkpoint_path=checkpoint, extras_path=extras if extras.is_file() else None,
                       adapter_dir=adapter if adapter.is_dir() else None)


def read_attempts(path: str | Path) -> list[dict[str, Any]]:
    """The attempts recorded in a :class:`StageRuns` log, oldest first."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
