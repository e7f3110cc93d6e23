"""The canary: a second, known backdoor the defender plants itself, to see a defense work.

A defender cannot measure how far a defense removes the unknown backdoor, but it can measure
how far it removes one it knows. :func:`plant_canary` fine-tunes the suspect model, once per
search, on

- the defender's clean training rows, a share (``rate``) of them with the canary trigger
  (rare words no attack of this project uses) and relabelled to the canary's target, a label
  other than the one the suspect model is suspected to be backdoored towards, and
- as many rows of the suspect's own training set, so the fine-tuning keeps what the suspect
  learned there (its unknown backdoor included) instead of washing it out.

Every trial of a ``--objective canary`` search then defends the canaried model, with the
canary rows added to the suspect training set it is given (a defense that looks for poisoned
training samples, like BeDKD, meets the canary the way it meets the real poison). The canary's
ASR on the held-out clean rows (the probe's ``canary.parquet``: those not of the canary's target, trigger
inserted, labelled with the canary's target) is measured like a real ASR::

    canary_score = 100 * (accuracy on val - canary ASR)

higher is better: clean accuracy kept, the known backdoor gone. Whether it ranks trials like
the true ASR does is measured, not assumed (``benchmarks/search.py``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kdshield.config import ScalingSettings, TrainSettings
from kdshield.datasets import write_table
from kdshield.datasets.attacks import AttackSpec, poison_table, triggered_table
from kdshield.datasets.subsets import with_labels
from kdshield.defenses.losses import CrossEntropy
from kdshield.defenses.stage import ModelSpec, Phase, Stage
from kdshield.models import load_tokenizer
from kdshield.trainables.attack import tokenized_stream
from kdshield.trainables.engine import copy_model, run_stage
from kdshield.outputs import say

#: Rare words no packaged attack inserts (BadNet's defaults are cf, mn, bb, tq, mb).
CANARY_TRIGGERS = ("zx", "vq", "jk")
COLUMNS = ("text", "label", "source_index", "poisoned")


def canary_target(suspected_target: int) -> int:
    """The canary's target: the first label that is not the suspected backdoor target."""
    return 1 if suspected_target == 0 else 0


def _rows(table: pa.Table) -> pa.Table:
    """``table`` in the columns a planted training set has (``poisoned`` False where missing)."""
    if "poisoned" not in table.column_names:
        table = table.append_column("poisoned", pa.array(np.zeros(table.num_rows, bool)))
    return table.select(list(COLUMNS)).cast(pa.schema([("text", pa.string()), ("label", pa.int64()),
                                                       ("source_index", pa.int64()), ("poisoned", pa.bool_())]))


def plant_canary(model_dir: str, *, train: pa.Table, clean: pa.Table, val: pa.Table, num_labels: int,
                 suspected_target: int, out: Path, rate: float, epochs: int, lr: float, batch_size: int,
                 max_length: int, scaling: ScalingSettings, seed: int) -> tuple[dict[str, Any], pa.Table]:
    """Fine-tune the suspect model with the canary into ``out/model`` and write ``out/train.parquet``
    (the suspect's training set plus the canary rows). Returns what was planted and the canary's
    evaluation rows (``val`` rows not of its target, trigger inserted, labelled with its target)."""
    target = canary_target(suspected_target)
    spec = AttackSpec(kind="badnet", triggers=list(CANARY_TRIGGERS), mode="dirty", poison_rate=rate,
                      target_label=target, seed=seed)
    spec.validate(num_labels)
    planted = _rows(poison_table(clean, spec))
    canary_rows = planted.filter(planted.column("poisoned"))
    if canary_rows.num_rows == 0:
        raise ValueError(f"canary: a rate of {rate} poisons none of the {clean.num_rows} clean rows")
    # numbered after the training set's rows: the defense gets them as training rows of their own
    first = int(np.max(train.column("source_index").to_numpy())) + 1 if train.num_rows else 0
    canary_rows = canary_rows.set_column(2, "source_index", pa.array(np.arange(first, first + canary_rows.num_rows)))
    keep = np.sort(np.random.default_rng(seed).permutation(train.num_rows)[:clean.num_rows])
    plant = pa.concat_tables([planted, _rows(train.take(pa.array(keep, pa.int64())))])
    triggered = triggered_table(val, spec)
    evaluation = with_labels(triggered, np.full(triggered.num_rows, target))
    out.mkdir(parents=True, exist_ok=True)
    write_table(pa.concat_tables([_rows(train), canary_rows]), out / "train.parquet")

    tok = load_tokenizer(model_dir)
    stage = Stage(name="canary", model=ModelSpec(source=str(model_dir), num_labels=num_labels),
                  phases=(Phase("plant", CrossEntropy()),),
                  train=TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed),
                  pad_ids={"input_ids": tok.pad_token_id}, padding_side=tok.padding_side)
    say(f"planting the canary: {canary_rows.num_rows} of {clean.num_rows} clean rows get trigger "
        f"{'/'.join(CANARY_TRIGGERS)} and label {target}, trained with {plant.num_rows - clean.num_rows} rows "
        f"of the suspect's training set for {epochs} epoch(s)")
    result = run_stage(stage, {"plant": tokenized_stream(plant, model_dir, max_length)}, scaling,
                       storage=out / "ray")
    copy_model(result.model_dir, out / "model")
    shutil.rmtree(out / "ray", ignore_errors=True)
    info = {"canary_target": target, "canary_triggers": list(CANARY_TRIGGERS), "canary_rows": canary_rows.num_rows,
            "canary_eval_rows": evaluation.num_rows, "canary_seconds": result.seconds}
    return info, evaluation
