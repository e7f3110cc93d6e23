"""Memory per worker of a training stage, from the model's config alone (``kdshield plan``).

The arithmetic of ``docs/w2s_memory.md``, for one data-parallel worker of ``N``: ``P`` parameters
(counted on the meta device: nothing is loaded), ``T`` of them trained (all of them, or a LoRA
adapter of rank ``r`` on the target projections plus the classification head), ``b`` bytes per
value (2 in bf16, 4 in fp32), a micro-batch of ``B`` sequences of ``S`` tokens over ``L`` blocks:

=====================  ======================================  ==========================
part                   bytes                                   split over N from ZeRO
=====================  ======================================  ==========================
weights                ``P b``; ZeRO-3: ``P b / N`` plus up to  3
                       ``min(P, M) b`` gathered (``M``:
                       ``stage3_max_live_parameters``, 1e9)
                       and the prefetch bucket (5e7 values)
gradients              ``T b``                                 2
fp32 master copy       ``4 T`` (bf16, or any ZeRO >= 1)        1
AdamW moments          ``8 T``                                 1
activations            ``B S L a b`` x 1.3 (measured slack)    never
=====================  ======================================  ==========================

``a`` counts what autograd keeps per token and block: for a decoder (LLaMA, Qwen2)
``12 H + 3 H_kv + 4 I`` plus ``heads S`` where attention falls back to its math kernel (CPU with a
padding mask; fused GPU kernels keep no ``S x S`` probabilities); for an encoder (BERT)
``10 H + 2 I + 2 heads S`` (not calibrated). Gradient checkpointing keeps only each block's
input plus one block's full set. ``--offload optimizer`` moves the master copy and the moments
to CPU memory, ``optimizer+params`` (ZeRO-3) the weight partitions too. Gradient accumulation does
not change the peak (gradients accumulate in place). Teacher outputs a defense caches live in
Ray's object store once per job, not per worker.

Calibrated against ``benchmarks/results/w2s_memory.json`` (SmolLM2-135M, LoRA r 64, 2 workers,
fp32 on CPU, ZeRO 0 / 2 / 3): with :data:`CPU_PROCESS_MB` for the process itself (Python, torch,
DeepSpeed, a Ray worker) every estimate is within 15% of the measured training peak
(``tests/test_cluster.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdshield.errors import InputError

MAX_LIVE_PARAMETERS = 1e9  # DeepSpeed's stage3_max_live_parameters default: the most it keeps gathered
PREFETCH_BUCKET = 5e7  # DeepSpeed's stage3_prefetch_bucket_size default
ACTIVATION_SLACK = 1.3  # measured training peaks ran 31% above the activation formula (allocator, temporaries)
CPU_PROCESS_MB = 577.0  # a CPU training worker before any model: ZeRO-0's measured peak minus the formula
GIB = 2**30


@dataclass
class MemoryPlan:
    """Bytes per worker: ``device`` (the accelerator's memory, or RAM on CPU) part by part,
    ``host`` (CPU memory the job offloads to), ``job`` (once per job: cached teacher outputs)."""

    device: dict[str, float]
    host: dict[str, float] = field(default_factory=dict)
    job: dict[str, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def device_total(self) -> float:
        return sum(self.device.values())

    def rows(self) -> list[dict[str, Any]]:
        """The table ``kdshield plan`` prints (GiB)."""
        def row(where: str, part: str, value: float) -> dict[str, Any]:
            return {"where": where, "part": part, "GiB": f"{value / GIB:.3f}"}

        out = [row("per worker", k, v) for k, v in self.device.items()]
        out.append(row("per worker", "total", self.device_total))
        out += [row("per worker, CPU memory (offloaded)", k, v) for k, v in self.host.items()]
        out += [row("once per job (Ray object store)", k, v) for k, v in self.job.items()]
        return out


def _counts(config, num_labels: int, lora_r: int | None, lora_targets: tuple[str, ...]) -> tuple[int, int, int]:
    """(the classifier's parameters, the trained ones, the adapters' among those) for ``config``, counted
    on the meta device."""
    import torch
    from transformers import AutoModelForSequenceClassification

    config.num_labels = num_labels
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    if lora_r is None:
        return total, total, 0
    adapters = sum(lora_r * (m.in_features + m.out_features) for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora_targets)
    if not adapters:
        raise InputError(f"plan: no linear module named {' / '.join(lora_targets)} to put LoRA adapters on")
    head = sum(p.numel() for name, p in model.named_parameters() if name.split(".")[0] in ("score", "classifier"))
    return total + adapters, adapters + head, adapters


def _per_token_per_block(config, length: int, fused_attention: bool) -> int:
    h, i, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    probs = 0 if fused_attention else heads * length
    kv_heads = getattr(config, "num_key_value_heads", None)
    if kv_heads is not None:  # a decoder: LLaMA, Qwen2, SmolLM2
        return 12 * h + 3 * (h // heads * kv_heads) + 4 * i + probs
    return 10 * h + 2 * i + 2 * probs  # an encoder (BERT): attention probabilities and their dropout mask


def estimate_memory(config, *, num_labels: int = 2, workers: int = 1, zero: int = 0, bf16: bool = False,
                    lora_r: int | None = None, lora_targets: tuple[str, ...] = ("q_proj", "v_proj"),
                    batch_size: int = 32, max_length: int = 64, offload: str = "none",
                    gradient_checkpointing: bool = False, gpu: bool = False,
                    teacher_rows: int = 0, teacher_hidden: int = 0) -> MemoryPlan:
    """What one of ``workers`` data-parallel workers holds while it trains (see the module doc)."""
    b = 2 if bf16 else 4
    n = workers
    params, trained, adapters = _counts(config, num_labels, lora_r, lora_targets)
    frozen = params - trained
    gathered = (min(params, MAX_LIVE_PARAMETERS) + PREFETCH_BUCKET) * b  # ZeRO-3: at most this much whole at once
    weights = params * b / n + gathered if zero == 3 else params * b
    gradients = trained * b / (n if zero >= 2 else 1)
    master = 4 * trained / (n if zero >= 1 else 1) if (bf16 or zero >= 1) else 0.0
    moments = 8 * trained / (n if zero >= 1 else 1)
    blocks = config.num_hidden_layers
    per_token = _per_token_per_block(config, max_length, fused_attention=gpu)
    tokens = batch_size * max_length
    if gradient_checkpointing:  # each block's input, and one block recomputed in full
        acts = tokens * (blocks * config.hidden_size + per_token) * b
    else:
        acts = tokens * blocks * per_token * b
    device = {"weights": weights, "gradients": gradients, "fp32 master copy": master, "AdamW moments": moments,
              "activations": acts * ACTIVATION_SLACK}
    host: dict[str, float] = {}
    if offload in ("optimizer", "optimizer+params"):
        host.update({"fp32 master copy": device.pop("fp32 master copy"), "AdamW moments": device.pop("AdamW moments")})
    if offload == "optimizer+params":
        host["weight partitions"] = params * b / n
        device["weights"] = gathered
    if not gpu:
        device["process (Python, torch, DeepSpeed, Ray)"] = CPU_PROCESS_MB * 2**20
    job = {}
    if teacher_rows:
        job["cached teacher outputs"] = teacher_rows * (num_labels + teacher_hidden) * 4
    return MemoryPlan(device, host, job, {"parameters": params, "trained": trained, "adapters": adapters, "frozen": frozen,
                                          "bytes_per_value": b, "values_per_token_per_block": per_token})
