"""LoRA adapters (peft) on sequence classifiers: settings, checks before Ray, wrapping, export.

A :class:`LoraSpec` travels in :class:`kdshield.defenses.stage.ModelSpec`; the engine wraps
the freshly loaded classifier with :func:`wrap_lora` *before* ``deepspeed.initialize``, so
DeepSpeed sees frozen base weights (``requires_grad=False``: partitioned under ZeRO-3, never in
the optimizer) and trainable LoRA matrices (plus, with ``train_head``, a trainable copy of the
classification head, peft's ``modules_to_save`` for ``SEQ_CLS``).

Exports (:func:`save_adapter`, :func:`merge_into`): the adapter in peft's own format
(``adapter_config.json`` + ``adapter_model.safetensors``), loadable with
``peft.PeftModel.from_pretrained(base, dir)``, and a merged plain Hugging Face directory
(``W + (alpha / r) B A`` folded into every adapted layer) that loads without peft.

Everything here is safetensors-only and never runs a model's own code.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kdshield.errors import InputError
from kdshield.models.loading import load_classifier, load_config, save_classifier


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter: rank ``r``, scale ``alpha / r``, ``dropout`` on the adapter's input,
    on every linear module whose name ends with one of ``target_modules`` (peft's matching).
    ``train_head``: also train (a copy of) the classification head."""

    r: int
    alpha: float
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    train_head: bool = True

    def __post_init__(self) -> None:
        if self.r < 1:
            raise InputError(f"LoRA rank must be >= 1, got r={self.r}")
        if self.alpha <= 0:
            raise InputError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise InputError("LoRA target_modules must name at least one module")

    def peft_config(self):
        from peft import LoraConfig, TaskType

        return LoraConfig(task_type=TaskType.SEQ_CLS if self.train_head else None, r=self.r,
                          lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none")


def default_rank(hidden: int) -> int:
    """The authors' r = 512 at hidden 4096 (r = hidden / 8), scaled to ``hidden``: the largest
    power of two <= hidden / 8, at least 4 (SmolLM2-135M, hidden 576: 64; hidden 64: 8)."""
    return max(4, 2 ** int(math.floor(math.log2(max(1, hidden // 8)))))


def _meta_model(model_dir: str, num_labels: int):
    """The classifier's module tree on the meta device: no weights read, no memory used."""
    from transformers import AutoModelForSequenceClassification

    config = load_config(model_dir)
    config.num_labels = num_labels
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


def linear_module_names(model_dir: str, num_labels: int = 2) -> set[str]:
    """Last name component of every ``nn.Linear`` in the classifier (``q_proj``, ``score`` ...)."""
    model = _meta_model(model_dir, num_labels)
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def check_lora(spec: LoraSpec, model_dir: str, num_labels: int = 2, *, what: str = "lora") -> None:
    """Before Ray: every target module exists as a linear layer of the model (InputError
    naming the unknown ones and the choices otherwise)."""
    names = linear_module_names(model_dir, num_labels)
    unknown = [t for t in spec.target_modules if t not in names]
    if unknown:
        raise InputError(f"{what}: target_modules {unknown} are not linear modules of {os.fspath(model_dir)!r}; "
                         f"it has {', '.join(sorted(names))}")


ATTENTION_TARGETS = (("q_proj", "v_proj"), ("query", "value"), ("q_lin", "v_lin"))  # LLaMA/Qwen, BERT, DistilBERT


def suspect_lora(model_dir: str, r: int, num_labels: int = 2, *, what: str = "--lora") -> LoraSpec:
    """``--lora R``: an adapter of rank ``r`` (alpha = r) on the attention query and value
    projections of ``model_dir``'s architecture, head trained too; InputError when it has neither
    naming."""
    names = linear_module_names(model_dir, num_labels)
    for targets in ATTENTION_TARGETS:
        if set(targets) <= names:
            return LoraSpec(r=r, alpha=float(r), dropout=0.0, target_modules=targets)
    raise InputError(f"{what}: no attention projections named {' / '.join('+'.join(t) for t in ATTENTION_TARGETS)} "
                     f"in {os.fspath(model_dir)!r} to put adapters on")


def wrap_lora(model, spec: LoraSpec):
    """``model`` wrapped in a peft LoRA model: base weights frozen, adapters (and head) trainable."""
    from peft import get_peft_model

    # adapters in the base's dtype (peft would upcast them to fp32): a bf16 base under ZeRO-3 needs
    # one dtype for every parameter it partitions; DeepSpeed keeps fp32 master weights itself
    return get_peft_model(model, spec.peft_config(), autocast_adapter_dtype=False)


def save_adapter(peft_model, out_dir: str | os.PathLike) -> Path:
    """peft's adapter directory (safetensors only) for ``peft_model``."""
    out = Path(out_dir)
    peft_model.save_pretrained(out, safe_serialization=True)
    if not (out / "adapter_model.safetensors").is_file():
        raise RuntimeError(f"peft wrote no adapter_model.safetensors into {out}")
    return out


def load_with_adapter(base_dir: str, adapter_dir: str | os.PathLike, num_labels: int, *, trainable: bool = False):
    """``(peft_model, tokenizer)``: the classifier from ``base_dir`` (safetensors) with the
    adapter of ``adapter_dir`` loaded (safetensors only)."""
    from peft import PeftModel

    adapter = Path(adapter_dir)
    if not (adapter / "adapter_model.safetensors").is_file():
        raise InputError(f"adapter directory {str(adapter)!r} holds no adapter_model.safetensors")
    model, tokenizer = load_classifier(base_dir, num_labels)
    return PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable, use_safetensors=True), tokenizer


def merge_into(peft_model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Fold the adapter into the base weights and save a plain HF directory (safetensors).
    ``peft_model`` is consumed (its modules are replaced by merged ones)."""
    merged = peft_model.merge_and_unload()
    return save_classifier(merged, tokenizer, out_dir)
