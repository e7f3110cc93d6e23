"""An in-process :class:`kdshield.defenses.base.Context`: recipes run top to bottom without Ray.

Streams are dicts of numpy columns; frozen models run in this process (the same per-batch code
as Ray Data batch inference, :class:`kdshield.trainables.inference.BatchPredictor`); a stage is
not trained for its epochs: :meth:`FakeContext.train` records it, runs one optimizer step of
every phase on its first batch (asserting a finite loss that reaches the trainable weights), and
exports the model the way the engine does, so the recipe's later steps get a real HF directory.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from kdshield.datasets import pad_collate
from kdshield.datasets.tokenize import tokenize_table
from kdshield.defenses.base import Inputs
from kdshield.defenses.stage import ModelSpec, Phase
from kdshield.evaluation.metrics import clean_and_attack_metrics
from kdshield.models import load_classifier, load_tokenizer, model_family, save_classifier
from kdshield.models.lora import merge_into, save_adapter, wrap_lora
from kdshield.models.outputs import model_outputs
from kdshield.trainables.engine import StageModule
from kdshield.trainables.inference import BatchPredictor


@dataclass
class FakeStage:
    """What a recipe asked to train, and what one step of it did."""

    name: str
    model: ModelSpec | None
    phases: list[Phase]
    streams: dict[str, dict]
    epochs: int
    lr: float
    live_teacher: ModelSpec | None
    losses: dict[str, float] = field(default_factory=dict)     # phase label -> loss of its first batch
    grad_norms: dict[str, float] = field(default_factory=dict)  # phase label -> gradient norm of that step


@dataclass
class FakeResult:
    model_dir: Path | None
    adapter_dir: Path | None
    extras_state: dict[str, torch.Tensor]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def extras(self) -> dict[str, torch.Tensor]:
        return self.extras_state


def _table_columns(table: pa.Table) -> dict[str, np.ndarray]:
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


class FakeContext:
    def __init__(self, inputs: Inputs, config, work: Path, *, live_teachers: bool = False, workers: int = 1,
                 lora: int | None = None):
        self.inputs, self.config, self.work = inputs, config, Path(work)
        self.live_teachers, self.workers, self.lora = live_teachers, workers, lora
        tok = load_tokenizer(inputs.model_dir)
        self.pad_ids = {"input_ids": tok.pad_token_id}
        self.padding_side = {"input_ids": getattr(config, "padding_side", tok.padding_side)}
        self.stages: list[FakeStage] = []
        self.teachers: list[tuple[str, tuple[str, ...]]] = []
        self.messages: list[str] = []
        self.seconds: dict[str, float] = {}

    # -- streams
    def _tokenizer(self, tokenizer: str, prefix: str) -> None:
        tok = load_tokenizer(tokenizer)
        self.pad_ids.setdefault(f"{prefix}input_ids", tok.pad_token_id)
        self.padding_side.setdefault(f"{prefix}input_ids", tok.padding_side)

    def stream(self, table: pa.Table, *, tokenizer: str | None = None, prefix: str = "") -> dict:
        tokenizer = tokenizer or self.inputs.model_dir
        self._tokenizer(tokenizer, prefix)
        blocks = tokenize_table(table, tokenizer, max_length=self.config.max_length, prefix=prefix)
        return _table_columns(pa.concat_tables(blocks))

    def retokenize(self, stream: dict, tokenizer: str, *, prefix: str) -> dict:
        self._tokenizer(tokenizer, prefix)
        table = pa.table({"text": stream["text"], "source_index": stream["source_index"]})
        ids = _table_columns(pa.concat_tables(tokenize_table(table, tokenizer, max_length=self.config.max_length,
                                                             prefix=prefix)))
        return {**stream, f"{prefix}input_ids": ids[f"{prefix}input_ids"]}

    def map(self, stream: dict, fn, **kwargs) -> dict:
        return fn(dict(stream), **kwargs)

    def columns(self, stream: dict, names: list[str]) -> dict[str, np.ndarray]:
        order = np.argsort(stream["source_index"], kind="stable")
        return {n: np.asarray(stream[n])[order] for n in names}

    # -- frozen models
    def _outputs(self, stream: dict, model_dir: str, outputs, prefix: str, input_prefix: str, attn=None) -> dict:
        key = f"{input_prefix}input_ids"
        predictor = BatchPredictor(model_dir, self.inputs.num_labels, outputs=tuple(outputs), prefix=prefix,
                                   input_key=key, pad_ids={key: self.pad_ids[key]},
                                   padding_side=self.padding_side[key], attn_implementation=attn)
        return predictor({k: np.asarray(v) for k, v in stream.items()})

    def teacher(self, stream: dict, model_dir: str, outputs, *, input_prefix: str = "",
                attn_implementation: str | None = None) -> dict:
        self.teachers.append((model_dir, tuple(outputs)))
        return self._outputs(stream, model_dir, outputs, "teacher_", input_prefix, attn_implementation)

    def predict(self, stream: dict, model_dir: str, outputs=("logits",), *, input_prefix: str = "") -> dict:
        out = self.columns(self._outputs(stream, model_dir, outputs, "", input_prefix), list(outputs))
        return {k: np.stack(list(v)) if v.dtype == object else v for k, v in out.items()}

    def evaluate(self, model_dir: str) -> dict[str, float]:
        i = self.inputs
        clean = self.stream(i.test)
        logits, labels = self.predict(clean, model_dir)["logits"], self.columns(clean, ["label"])["label"]
        triggered = None
        if i.triggered is not None and i.target_label is not None:
            t = self.stream(i.triggered)
            triggered = (self.predict(t, model_dir)["logits"], self.columns(t, ["label"])["label"])
        return clean_and_attack_metrics(logits, labels, triggered, i.target_label)

    # -- stages
    def train(self, name: str, model: ModelSpec | None, phases: list[Phase], streams: dict[str, dict], *,
              epochs: int, lr: float, batch_size: int | None = None, pad_ids: dict | None = None,
              padding_side: Any = None, live_teacher: ModelSpec | None = None,
              live_outputs: tuple[str, ...] = ("logits", "hidden_seq")) -> FakeResult:
        model = model.as_adapter(self.lora) if model is not None else None  # --lora R, as the job's context does
        stage = FakeStage(name, model, list(phases), streams, epochs, lr, live_teacher)
        self.stages.append(stage)
        hf, tokenizer = None, None
        if model is not None:
            hf, tokenizer = load_classifier(model.source, model.num_labels, attn_implementation=model.attn_implementation,
                                            keep_layers=model.keep_layers, init=model.init)
            if model.lora is not None:
                hf = wrap_lora(hf, model.lora)
        extras = {}
        for phase in phases:
            if phase.loss.module is not None:
                extras[phase.label.replace(".", "_")] = phase.loss.module
        module = StageModule(hf, extras).train()
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
        teacher = None
        if live_teacher is not None:
            teacher, _ = load_classifier(live_teacher.source, live_teacher.num_labels,
                                         attn_implementation=live_teacher.attn_implementation)
            teacher.eval()
        prefix = model.input_prefix if model is not None else ""
        for phase in phases:
            rows = streams[phase.stream]
            first = {k: np.asarray(v)[: batch_size or self.config.batch_size] for k, v in rows.items()}
            batch = pad_collate(first, pad_ids=pad_ids or self.pad_ids, padding_side=padding_side or self.padding_side)
            if teacher is not None:
                with torch.no_grad():
                    cols = model_outputs(teacher, batch["input_ids"], batch["attention_mask"], tuple(live_outputs),
                                         model_family(teacher.config))
                batch.update({f"teacher_{k}": v for k, v in cols.items()})
            optimizer.zero_grad()
            with phase.loss.capture(module.model, batch):
                outputs = None if module.model is None else module.model(
                    input_ids=batch[f"{prefix}input_ids"], attention_mask=batch[f"{prefix}attention_mask"],
                    output_hidden_states=phase.loss.needs_hidden_states)
            loss, _ = phase.loss(outputs, batch)
            loss.backward()
            grads = [p.grad.norm() for p in module.parameters() if p.grad is not None]
            stage.losses[phase.label] = float(loss.detach())
            stage.grad_norms[phase.label] = float(torch.stack(grads).norm()) if grads else 0.0
            assert math.isfinite(stage.losses[phase.label]), f"{name}/{phase.label}: loss {loss}"
            optimizer.step()
        out = self.work / "fake-stages" / f"{len(self.stages)}-{name}"
        model_dir = adapter_dir = None
        if hf is not None:
            if model.lora is not None:
                adapter_dir = save_adapter(hf, out / "adapter")
                model_dir = merge_into(hf, tokenizer, out / "hf_model")
            else:
                model_dir = save_classifier(hf, tokenizer, out / "hf_model")
        state = {f"{label}.{k}": v.detach().clone() for label, m in extras.items() for k, v in m.state_dict().items()}
        return FakeResult(Path(model_dir) if model_dir else None, Path(adapter_dir) if adapter_dir else None, state)

    # -- bookkeeping
    @contextlib.contextmanager
    def timed(self, name: str):
        yield
        self.seconds[name] = self.seconds.get(name, 0.0)

    def say(self, message: str) -> None:
        self.messages.append(message)
