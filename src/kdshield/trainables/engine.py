"""The one training engine: any :class:`Stage` on Ray Train workers driving a DeepSpeed engine.

The driver side (:func:`run_stage`) builds a ``TorchTrainer`` whose workers each run
:func:`_train_worker`; a job of one CPU worker on a Ray it started itself runs that same
function in its own process instead (:func:`trains_in_process`: no worker group to start per
stage, the libraries and data already loaded; the fixed cost of a stage drops from 15-42 s to a
few). Either way the worker (each rank):

1. loads the stage's model (safetensors only) and wrap it in ``deepspeed.initialize`` with the
   chosen ZeRO stage and precision, a torch AdamW and a linear warm-up/decay schedule;
2. resumes from ``ray.train.get_checkpoint()`` when Ray restarts it after a failure (or from
   ``resume_from``, an earlier run's checkpoint);
3. for every epoch runs the stage's phases in order, each phase one pass over the worker's shard
   of its Ray Dataset stream (padded per batch by :func:`kdshield.datasets.pad_collate`);
4. reports every epoch's metrics (``worker_nodes``: the Ray node id of each rank, in rank order);
   save a DeepSpeed checkpoint on every rank with the report when
   ``checkpoint_interval_s`` has passed since the last one (rank 0 decides for all); after the
   last epoch rank 0 writes the trained model as a Hugging Face directory (``hf_model/``,
   safetensors) into the final checkpoint.

A stage whose model has a ``lora`` spec trains a peft LoRA adapter on frozen base weights
(wrapped before ``deepspeed.initialize``, so ZeRO-3 partitions the frozen weights and only the
adapter reaches the optimizer); its checkpoints hold the adapter and optimizer state only
(``exclude_frozen_parameters``: the base weights come back from ``source`` on resume), and
rank 0 exports both the adapter (``adapter/``, peft format, safetensors) and the merged model
(``hf_model/``) built from the weights the engine actually holds.

A loss may own extra trainable parameters (:attr:`StageLoss.module`: connectors, masks ...):
they are wrapped with the model in one :class:`StageModule`, so DeepSpeed optimises,
shards and checkpoints them with it, and rank 0 exports them as ``extras.safetensors`` next to
``hf_model/``. A stage without a model (``Stage.model is None``) trains only such modules.

Nothing here knows about attacks or defenses: they differ only in their stages.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdshield.cluster import ordered_data, plan_resources
from kdshield.config import ScalingSettings, TrainSettings
from kdshield.datasets import PadCollate
from kdshield.defenses.stage import Stage
from kdshield.errors import InputError
from kdshield.models import load_classifier, load_classifier_partitioned, model_family, resolve_model, save_classifier
from kdshield.models.lora import merge_into, save_adapter, wrap_lora
from kdshield.models.outputs import model_outputs

HF_MODEL_DIR = "hf_model"
ADAPTER_DIR = "adapter"
EXTRAS_FILE = "extras.safetensors"
DS_TAG = "ds"
STATE_FILE = "kdshield_state.json"
LATEST_FILE = "kdshield_latest.json"  # an in-process run's latest checkpoint
MANIFEST_PREFIX = "kdshield_manifest"  # kdshield_manifest.rankN.json: SHA-256 of each file rank N wrote


class CheckpointRefused(InputError):
    """A checkpoint whose files do not match the manifests written when it was saved."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, rank: int) -> None:
    """Record the SHA-256 of every file ``rank`` wrote into ``directory`` (each rank writes its own
    files, and its own manifest, before Ray Train merges the ranks' directories)."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): _sha256(p) for p in sorted(directory.rglob("*"))
             if p.is_file() and not p.name.startswith(MANIFEST_PREFIX)}
    (directory / f"{MANIFEST_PREFIX}.rank{rank}.json").write_text(json.dumps({"files": files}, indent=1))


def verify_manifest(directory: Path) -> None:
    """Refuse (:class:`CheckpointRefused`, one line) a checkpoint with no manifest, a file no
    manifest lists, a listed file missing, or one whose bytes changed since it was saved: resuming
    loads optimizer state with ``torch.load`` (pickle), so only the files kdshield wrote may be read."""
    directory = Path(directory)
    listed: dict[str, str] = {}
    manifests = sorted(directory.glob(f"{MANIFEST_PREFIX}.rank*.json"))
    if not manifests:
        raise CheckpointRefused(f"{directory}: checkpoint has no kdshield manifest; refusing to resume from it")
    for manifest in manifests:
        try:
            listed.update(json.loads(manifest.read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointRefused(f"{manifest}: unreadable checkpoint manifest; refusing to resume") from None
    present = {str(p.relative_to(directory)) for p in directory.rglob("*")
               if p.is_file() and not p.name.startswith(MANIFEST_PREFIX)}
    foreign = sorted(present - set(listed))
    if foreign:
        raise CheckpointRefused(f"{directory / foreign[0]}: a file no manifest lists (not written by kdshield); "
                                "refusing to resume from this checkpoint")
    for name, digest in sorted(listed.items()):
        if name not in present:
            raise CheckpointRefused(f"{directory / name}: listed in the manifest but missing; refusing to resume")
        if _sha256(directory / name) != digest:
            raise CheckpointRefused(f"{directory / name}: changed since the checkpoint was saved (SHA-256 "
                                    "differs); refusing to resume from it")


@dataclass
class StageResult:
    """What a finished stage leaves behind."""

    model_dir: Path | None   # Hugging Face directory of the trained model (None: no model)
    metrics: dict[str, Any]  # the last epoch's metrics as reported by rank 0
    history: list[dict[str, Any]]  # every epoch's metrics, in order
    seconds: float
    checkpoint_path: Path
    extras_path: Path | None = None  # the losses' own modules' state (safetensors), if any
    adapter_dir: Path | None = None  # a LoRA stage's adapter (peft format), if any

    def extras(self) -> dict[str, torch.Tensor]:
        """The losses' trained modules' state dict, keyed ``{phase label}.{state key}``."""
        if self.extras_path is None:
            return {}
        from safetensors.torch import load_file

        return load_file(str(self.extras_path))


class StageModule(torch.nn.Module):
    """What DeepSpeed wraps: the stage's model (or None) and its losses' own modules."""

    def __init__(self, model: torch.nn.Module | None, extras: dict[str, torch.nn.Module]):
        super().__init__()
        self.model = model
        self.extras = torch.nn.ModuleDict(extras)

    def forward(self, **kwargs):
        return None if self.model is None else self.model(**kwargs)


def deepspeed_config(train: TrainSettings, scaling: ScalingSettings) -> dict[str, Any]:
    """The DeepSpeed config dict for one stage (the optimizer is a client torch AdamW)."""
    zero: dict[str, Any] = {"stage": scaling.zero}
    if scaling.offload != "none":  # ZeRO-Offload; the client torch AdamW steps on CPU
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if scaling.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": scaling.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": scaling.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _linear_schedule(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _export(engine, tokenizer, out: Path, *, rank: int, zero: int, spec=None, dtype=torch.float32) -> None:
    """From rank 0: the model as a HF directory ``out/hf_model`` (sharded safetensors; under
    ZeRO-3 gathered layer by layer onto rank 0 only, never whole on every rank) and the losses'
    modules as ``out/extras.safetensors``. A LoRA model (``spec.lora``) is
    written as its adapter ``out/adapter`` and the merged model ``out/hf_model``, both rebuilt
    on CPU in the training ``dtype`` from the source's frozen base and the parameters that trained
    (adapter, head): under ZeRO-3 only those are gathered, never the base."""
    import contextlib

    import deepspeed
    from safetensors.torch import save_file

    module: StageModule = engine.module
    lora = spec is not None and spec.lora is not None and module.model is not None
    if zero == 3 and not lora:
        # gathered layer by layer onto rank 0 alone (every rank takes part; only rank 0 holds it)
        full = engine._zero3_consolidated_16bit_state_dict()
        if rank != 0:
            return
        part = {name: {k.removeprefix(f"{name}."): v for k, v in full.items() if k.startswith(f"{name}.")}
                for name in ("model", "extras")}
        del full
        if module.model is not None:
            save_classifier(module.model, tokenizer, out / HF_MODEL_DIR, state_dict=part["model"])
        if part["extras"]:
            save_file({k: v.float().contiguous() for k, v in part["extras"].items()}, str(out / EXTRAS_FILE))
        return
    # Under ZeRO-3 only a LoRA model gets here, and only what trained (adapter, head) and the
    # losses' modules are gathered: its frozen base is read again from the source on rank 0.
    trained = [p for p in module.model.parameters() if p.requires_grad] if lora else []
    gather = (deepspeed.zero.GatheredParameters([*trained, *module.extras.parameters()], modifier_rank=None)
              if zero == 3 else contextlib.nullcontext())
    state = None
    with gather:
        if rank != 0:
            return
        if lora:
            state = {k: v.detach().cpu().clone() for k, v in module.model.named_parameters() if v.requires_grad}
        elif module.model is not None:
            save_classifier(module.model, tokenizer, out / HF_MODEL_DIR)
        if len(module.extras):
            extras = {k: v.detach().float().cpu().contiguous().clone()
                      for k, v in module.extras.state_dict().items()}
            save_file(extras, str(out / EXTRAS_FILE))
    if state is not None:
        fresh, _ = load_classifier(spec.source, spec.num_labels, attn_implementation=spec.attn_implementation,
                                   tokenizer=tokenizer, dtype=dtype)
        fresh = wrap_lora(fresh, spec.lora)
        frozen = set(fresh.state_dict()) - {k for k, v in fresh.named_parameters() if v.requires_grad}
        loaded = fresh.load_state_dict({k: v.to(fresh.state_dict()[k].dtype) for k, v in state.items()},
                                       strict=False)
        if loaded.unexpected_keys or set(loaded.missing_keys) - frozen:
            raise RuntimeError(f"the adapter's state does not fit a fresh copy of {spec.source}: unexpected "
                               f"{loaded.unexpected_keys[:3]}, missing {sorted(set(loaded.missing_keys) - frozen)[:3]}")
        del state
        save_adapter(fresh, out / ADAPTER_DIR)
        merge_into(fresh, tokenizer, out / HF_MODEL_DIR)


def _rss_mb(field: str = "VmRSS") -> float | None:
    """This process's resident memory (``VmRSS``) or its high-water mark (``VmHWM``), MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux ``clear_refs`` 5), so
    ``VmHWM`` afterwards is the peak of what follows (training), not of model loading."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _quiet_report_log() -> None:
    """Ray Train V2 logs every ``ray.train.report`` at INFO, metrics and all (a logger named by its
    source file); the engine prints its own one-line epoch summaries instead."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its log stays as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _skip_shm_comm_build() -> None:
    """On DeepSpeed's CPU accelerator, its communication backend JIT-compiles a shared-memory
    all-reduce op with g++ when it starts (tens of seconds on a fresh machine, again whenever
    another environment rebuilt the shared cache). Only DeepSpeed's tensor-parallel inference
    calls that op; training reduces through torch.distributed (gloo), so the build is skipped by
    marking the op incompatible, which ``deepspeed.comm.torch.build_shm_op`` checks first."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}


class _RayTrainRuntime:
    """The engine's view of where it runs: a Ray Train worker (rank, shards, reports)."""

    def __init__(self):
        import ray
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.node_id = ray.get_runtime_context().get_node_id()

    def checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def shard(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict[str, Any], write=None) -> None:
        """Report an epoch; ``write(directory)`` fills the checkpoint that goes with it, if any."""
        import ray.train

        if write is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="kdshield-ckpt-") as tmp:
            write(Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


class _InProcessRuntime:
    """The same view inside the calling process (one rank, no Ray Train run): shards are the
    streams themselves, checkpoints are directories ``RUN/checkpoint_NNNNNN`` (the newest two
    kept, the latest named in ``RUN/{LATEST_FILE}``), reports go to ``on_report``."""

    rank, world = 0, 1

    def __init__(self, streams: dict[str, Any], run_dir: Path, on_report=None, keep: int = 2):
        import ray

        self.streams, self.run_dir, self.on_report, self.keep = streams, run_dir, on_report, keep
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        self.last_checkpoint: Path | None = None
        self.last_metrics: dict[str, Any] = {}

    def checkpoint(self):
        return None  # an earlier run's checkpoint comes in as ``resume_from``

    def shard(self, name: str):
        return self.streams[name]

    def report(self, metrics: dict[str, Any], write=None) -> None:
        if write is not None:
            final = self.run_dir / f"checkpoint_{metrics['epoch']:06d}"
            partial = final.with_name(final.name + ".partial")
            for stale in (partial, final):
                shutil.rmtree(stale, ignore_errors=True)
            partial.mkdir(parents=True)
            write(partial)
            os.replace(partial, final)
            latest = self.run_dir / (LATEST_FILE + ".partial")
            latest.write_text(json.dumps({"checkpoint": final.name}))
            os.replace(latest, self.run_dir / LATEST_FILE)
            for old in sorted(self.run_dir.glob("checkpoint_*[0-9]"))[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            self.last_checkpoint = final
        self.last_metrics = metrics
        if self.on_report is not None:
            self.on_report(self.run_dir.name, metrics)


def latest_in_process_checkpoint(run_dir: Path) -> Path | None:
    """The latest checkpoint an in-process run of ``run_dir`` left (None: none, or unreadable)."""
    try:
        name = json.loads((Path(run_dir) / LATEST_FILE).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = Path(run_dir) / name
    return path if path.is_dir() else None


def trains_in_process(scaling: ScalingSettings) -> bool:
    """Whether a stage trains in the calling process: ``scaling.in_process``, or by default when
    the job is one CPU worker on a Ray it started itself (no worker group to start, no second
    copy of torch and the model in memory; a worker that dies is the job dying)."""
    if scaling.in_process is not None:
        return scaling.in_process
    return scaling.workers == 1 and scaling.gpus_per_worker == 0 and scaling.address is None


@dataclass
class _Worker:
    """One Ray Train worker's state for a stage: the DeepSpeed engine and what the steps share."""

    stage: Stage
    scaling: ScalingSettings
    runtime: Any  # _RayTrainRuntime or _InProcessRuntime
    engine: Any
    module: StageModule
    scheduler: Any
    tokenizer: Any
    rank: int
    world: int
    lora: bool
    prefix: str
    node_id: str
    worker_nodes: list
    load_peak_mb: float
    rss_after_init_mb: float | None
    peak_reset: bool


def _single_process_group() -> None:
    """A one-rank gloo process group for DeepSpeed in this process (once per process)."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:  # a free port for the (one-member) rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    for key, value in env.items():  # DeepSpeed reads them too (else it tries MPI discovery)
        os.environ[key] = value
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")


def _set_up(stage: Stage, scaling: ScalingSettings, steps_per_epoch: int, runtime) -> _Worker:
    """Load the stage's model (safetensors only; LoRA-wrapped before DeepSpeed sees it), wrap it
    with the losses' own modules in a DeepSpeed engine (AdamW, linear schedule), and note the
    memory it took."""
    import gc
    import resource

    import deepspeed
    import torch.distributed as dist

    _quiet_report_log()
    _skip_shm_comm_build()
    train = stage.train
    rank, world = runtime.rank, runtime.world
    torch.set_num_threads(max(1, int(scaling.cpus_per_worker)))
    torch.manual_seed(train.seed)
    spec, model, tokenizer, partitioned = stage.model, None, None, False
    ds_config = deepspeed_config(train, scaling)
    dtype = torch.bfloat16 if scaling.bf16 else torch.float32
    if spec is not None:
        partitioned = scaling.zero == 3 and spec.keep_layers is None and spec.init == "pretrained" \
                and os.path.isdir(resolve_model(spec.source))  # (a hub id loads whole, downloaded)
        if partitioned:
            # each rank reads only its partitions (transformers' zero.Init loading reads and gathers
            # every weight through rank 0: benchmarks/results/zero3_memory.md)
            model, tokenizer = load_classifier_partitioned(spec.source, spec.num_labels, ds_config=ds_config,
                                                           dtype=dtype, attn_implementation=spec.attn_implementation)
        else:  # whole, in the training dtype
            model, tokenizer = load_classifier(spec.source, spec.num_labels, attn_implementation=spec.attn_implementation,
                                               keep_layers=spec.keep_layers, init=spec.init, dtype=dtype)
        if scaling.gradient_checkpointing:
            # non-reentrant: works with a frozen base (LoRA), whose inputs need no grad
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec.lora is not None:
            model = wrap_lora(model, spec.lora)  # base frozen before DeepSpeed sees it
    module = StageModule(model, stage.loss_modules())
    if partitioned:  # DeepSpeed casts only a module not built under zero.Init: the losses' modules
        # and any parameter added after loading (adapters) take the training dtype here
        for t in (*module.extras.parameters(), *module.extras.buffers(), *model.parameters()):
            if not hasattr(t, "ds_id") and t.is_floating_point() and t.dtype != dtype:
                t.data = t.data.to(dtype)
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"stage {stage.name!r} has nothing to train")
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    total_steps = -(-steps_per_epoch // scaling.grad_accum) * train.epochs  # optimizer steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _linear_schedule(total_steps, int(train.warmup_ratio * total_steps)))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    if world == 1 and scaling.zero == 0:
        engine.enable_backward_allreduce = False  # an all-reduce over one rank only copies gradients
    gc.collect()
    load_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # loading + initialize
    rss_after_init_mb = _rss_mb()
    peak_reset = _reset_peak_rss()
    node_id = runtime.node_id
    worker_nodes = [node_id]
    if world > 1:  # which Ray node each rank runs on, reported with every epoch (rank order)
        worker_nodes = [None] * world
        dist.all_gather_object(worker_nodes, node_id)
    return _Worker(stage, scaling, runtime, engine, module, scheduler, tokenizer, rank, world,
                   lora=spec is not None and spec.lora is not None, prefix=spec.input_prefix if spec else "",
                   node_id=node_id, worker_nodes=worker_nodes, load_peak_mb=load_peak_mb,
                   rss_after_init_mb=rss_after_init_mb, peak_reset=peak_reset)


def _resume(w: _Worker, resume_from: str | None) -> tuple[int, list[dict[str, Any]]]:
    """The epoch to start from and the history so far: from the checkpoint Ray Train hands a
    restarted worker group, else from ``resume_from`` (an earlier run's checkpoint), else 0."""
    import ray.train

    checkpoint = w.runtime.checkpoint()
    if checkpoint is None and resume_from:  # an earlier run's checkpoint (Ray Train V2 way)
        checkpoint = ray.train.Checkpoint.from_directory(resume_from)
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as ckpt_dir:
        verify_manifest(Path(ckpt_dir))  # before anything is unpickled (also a checkpoint Ray Train restores)
        w.engine.load_checkpoint(ckpt_dir, tag=DS_TAG, load_module_strict=not w.lora)
        state = json.loads(Path(ckpt_dir, STATE_FILE).read_text())
    if w.rank == 0:
        print(f"[{w.stage.name}] resumed from the checkpoint of epoch {state['epoch']}", flush=True)
    return state["epoch"], state["history"]


def _live_teacher(stage: Stage, device):
    """The frozen teacher a stage runs inside its loop (``Stage.live_teacher``), on the worker's
    ``device`` (its inputs' device), and its family."""
    if stage.live_teacher is None:
        return None, None
    teacher, _ = load_classifier(stage.live_teacher.source, stage.live_teacher.num_labels,
                                 attn_implementation=stage.live_teacher.attn_implementation)
    teacher.to(device).eval().requires_grad_(False)
    return teacher, model_family(teacher.config)


LENGTH_BAND = 8
"""Tokens per length band of :func:`grouped_batches`. Rows are grouped by band, not by exact
length: where length and label go together (a trigger word, a sentiment cue one token long)
batches sorted by exact length would each hold one label; a band of 8 mixes them and still pads a
batch by at most 7 tokens per row."""


def grouped_batches(shard, *, batch_size: int, window: int, seed: int, length_key: str):
    """A worker's shard as length-grouped numpy batches (see :attr:`Stage.group_window`): each
    window of ``window * batch_size`` rows is permuted, stably sorted by the :data:`LENGTH_BAND`
    of the length of ``length_key`` (rows without it count as one length), cut into batches of
    ``batch_size`` and the batches permuted, all with one RNG seeded by ``seed``. Only one batch (in the shard's last
    window) can be short, so an epoch takes as many steps as plain batching would. ``window`` 0:
    stream order."""
    if window <= 0:
        yield from shard.iter_batches(batch_size=batch_size, batch_format="numpy")
        return
    rng = np.random.default_rng(seed)
    for chunk in shard.iter_batches(batch_size=batch_size * window, batch_format="numpy"):
        n = len(next(iter(chunk.values())))
        lengths = (np.fromiter((len(x) for x in chunk[length_key]), dtype=np.int64, count=n)
                   if length_key in chunk else np.zeros(n, dtype=np.int64))
        order = rng.permutation(n)  # random within a band: the stable sort keeps this order
        order = order[np.argsort(lengths[order] // LENGTH_BAND, kind="stable")]
        groups = [order[i:i + batch_size] for i in range(0, n, batch_size)]
        for j in rng.permutation(len(groups)):
            yield {k: v[groups[j]] for k, v in chunk.items()}


def _run_epoch(w: _Worker, epoch: int, teacher, family, collate, progress_s: float) -> dict[str, torch.Tensor]:
    """Every phase of the stage once, in order, each one pass over this worker's shard of its
    stream; returns the per-key sums ``[value * n, n]`` of the losses' logs (and the epoch's
    evaluations)."""
    stage, train, engine = w.stage, w.stage.train, w.engine
    device = engine.device
    t0 = last_print = time.perf_counter()
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(2, dtype=torch.float64))
    samples = steps = 0
    for phase in stage.phases:
        shard = w.runtime.shard(phase.stream)
        if stage.group_window:
            batches = map(collate, grouped_batches(shard, batch_size=train.batch_size, window=stage.group_window,
                                                   seed=train.seed * 1000 + epoch, length_key=f"{w.prefix}input_ids"))
        else:
            batches = shard.iter_torch_batches(
                batch_size=train.batch_size, collate_fn=collate,
                local_shuffle_buffer_size=stage.shuffle_buffer or None,
                local_shuffle_seed=train.seed * 1000 + epoch if stage.shuffle_buffer else None)
        if train.max_steps_per_epoch:
            batches = itertools.islice(batches, train.max_steps_per_epoch)
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            mask = batch.get(f"{w.prefix}attention_mask")
            if mask is not None:  # padding efficiency: real tokens / padded tokens
                sums[f"{phase.label}/tokens"] += torch.tensor([float(mask.sum()), 1.0], dtype=torch.float64)
                sums[f"{phase.label}/padded_tokens"] += torch.tensor([float(mask.numel()), 1.0], dtype=torch.float64)
            if teacher is not None:
                with torch.no_grad():
                    cols = model_outputs(teacher, batch["input_ids"], batch["attention_mask"],
                                         stage.live_teacher_outputs, family)
                batch.update({f"teacher_{k}": v for k, v in cols.items()})
            with phase.loss.capture(w.module.model, batch):
                if w.module.model is None:
                    outputs = engine()
                else:
                    outputs = engine(input_ids=batch[f"{w.prefix}input_ids"],
                                     attention_mask=batch[f"{w.prefix}attention_mask"],
                                     output_hidden_states=phase.loss.needs_hidden_states,
                                     output_attentions=phase.loss.needs_attentions)
            loss, logs = phase.loss(outputs, batch)
            engine.backward(loss)
            engine.step()
            steps += 1
            n = len(batch["label"]) if "label" in batch else next(iter(batch.values())).shape[0]
            samples += n
            for key, value in {"loss": loss.item(), **logs}.items():
                sums[f"{phase.label}/{key}"] += torch.tensor([value * n, n], dtype=torch.float64)
            if w.rank == 0 and time.perf_counter() - last_print > progress_s:
                last_print = time.perf_counter()
                print(f"[{stage.name}] epoch {epoch + 1}/{train.epochs} {phase.label}: "
                      f"loss {loss.item():.4f}, {samples * w.world / (last_print - t0):.1f} samples/s", flush=True)
    for ev in stage.evals:  # per-epoch evaluation hook: accuracy on the eval streams
        sums.update(_epoch_eval(engine, w.runtime.shard(ev.stream), ev.label, train.batch_size, collate, device))
    sums["_samples"] = torch.tensor([samples, 1], dtype=torch.float64)
    sums["_steps"] = torch.tensor([steps, 1], dtype=torch.float64)
    return sums


def _epoch_metrics(w: _Worker, sums: dict[str, torch.Tensor], epoch: int, start_epoch: int,
                   seconds: float) -> dict[str, Any]:
    """The epoch's metrics as every rank reports them: log means over all ranks' samples, each
    rank's memory, the nodes, the throughput."""
    import resource

    import torch.distributed as dist

    samples = int(sums.pop("_samples")[0])
    steps = int(sums.pop("_steps")[0])  # this worker's micro-batches
    keys = sorted(sums)
    totals = torch.stack([sums[k] for k in keys]) if keys else torch.zeros(0, 2, dtype=torch.float64)
    if w.world > 1:
        dist.all_reduce(totals)
    metrics: dict[str, Any] = {k: float(t[0] / max(t[1], 1)) for k, t in zip(keys, totals)
                               if not k.endswith("tokens")}
    for k, t in zip(keys, totals):  # real tokens / padded tokens over the epoch, per phase
        if k.endswith("/tokens"):
            padded = totals[keys.index(k.replace("/tokens", "/padded_tokens"))][0]
            metrics[k.replace("/tokens", "/padding_efficiency")] = float(t[0] / max(padded, 1))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # since the reset, if any
    train_peak_mb = _rss_mb("VmHWM") if w.peak_reset else None
    metrics.update(peak_rss_mb=max(w.load_peak_mb, peak_mb))  # this process, whole life
    memory = [max(w.load_peak_mb, peak_mb), train_peak_mb, w.rss_after_init_mb, str(w.engine.device)]
    if w.world > 1:  # every rank's memory and device, in rank order
        gathered = [None] * w.world
        dist.all_gather_object(gathered, memory)
    else:
        gathered = [memory]
    metrics.update(peak_rss_mb_per_rank=[m[0] for m in gathered],
                   train_peak_rss_mb_per_rank=[m[1] for m in gathered],
                   rss_after_init_mb_per_rank=[m[2] for m in gathered],
                   device_per_rank=[m[3] for m in gathered])  # where each rank trained: cuda:N or cpu
    metrics.update(epoch=epoch + 1, steps=steps, epoch_seconds=seconds, start_epoch=start_epoch,
                   worker_nodes=w.worker_nodes,
                   samples_per_s=samples * w.world / max(seconds, 1e-9), lr=w.scheduler.get_last_lr()[0])
    return metrics


def _report(w: _Worker, metrics: dict[str, Any], history: list[dict], *, final: bool, due: bool) -> None:
    """Report the epoch to Ray Train; with a checkpoint when one is due (rank 0's clock decides for
    every rank), and after the last epoch the export (HF model, LoRA adapter, losses' modules)."""
    if not due:
        w.runtime.report(metrics)
        return

    def write(directory: Path) -> None:
        if final:
            _export(w.engine, w.tokenizer, directory, rank=w.rank, zero=w.scaling.zero, spec=w.stage.model,
                    dtype=torch.bfloat16 if w.scaling.bf16 else torch.float32)
        else:  # a LoRA stage keeps only the adapter and its optimizer state
            w.engine.save_checkpoint(str(directory), tag=DS_TAG, exclude_frozen_parameters=w.lora)
        if w.rank == 0:
            Path(directory, STATE_FILE).write_text(json.dumps({"epoch": metrics["epoch"], "history": history}))
        write_manifest(directory, w.rank)

    w.runtime.report(metrics, write)


def _train_worker(config: dict[str, Any], runtime=None) -> None:
    """Runs inside every Ray Train worker (or, with ``runtime``, in this process): set up, resume,
    then for each epoch run it, report it and checkpoint it when due; the last epoch exports the
    trained model."""
    import torch.distributed as dist

    stage: Stage = config["stage"]
    w = _set_up(stage, config["scaling"], config["steps_per_epoch"], runtime or _RayTrainRuntime())
    start_epoch, history = _resume(w, config.get("resume_from"))
    teacher, family = _live_teacher(stage, w.engine.device)
    collate = PadCollate(stage.pad_ids, stage.padding_side, pad_to=stage.pad_to)
    w.engine.train()
    last_checkpoint = time.monotonic()
    for epoch in range(start_epoch, stage.train.epochs):
        if config.get("pid_dir"):  # lets fault-injection tests find and kill a worker (or its node) mid-run
            Path(config["pid_dir"], f"rank{w.rank}.node").write_text(w.node_id)
            Path(config["pid_dir"], f"rank{w.rank}.pid").write_text(f"{os.getpid()} {epoch}")
        t0 = time.perf_counter()
        sums = _run_epoch(w, epoch, teacher, family, collate, config["progress_s"])
        metrics = _epoch_metrics(w, sums, epoch, start_epoch, time.perf_counter() - t0)
        history.append(metrics)
        if w.rank == 0:
            print(f"[{stage.name}] epoch {epoch + 1}/{stage.train.epochs} done in {metrics['epoch_seconds']:.1f}s: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "/" in k), flush=True)
        final = epoch + 1 == stage.train.epochs
        due = torch.tensor([final or time.monotonic() - last_checkpoint >= stage.train.checkpoint_interval_s])
        if w.world > 1:
            dist.broadcast(due, src=0)  # every rank follows rank 0's clock
        _report(w, metrics, history, final=final, due=bool(due.item()))
        if due.item():
            last_checkpoint = time.monotonic()


def _epoch_eval(engine, shard, label: str, batch_size: int, collate, device) -> dict:
    """``{"eval/{label}/acc": [correct, n]}`` of the engine's model over this worker's shard."""
    correct, n = 0.0, 0
    if getattr(engine.module, "model", engine.module) is None:  # a stage without a model
        return {}
    engine.eval()
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate):
            out = engine(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            correct += float((out.logits.argmax(-1).cpu() == batch["label"].cpu()).sum())
            n += int(batch["label"].shape[0])
    engine.train()
    return {f"eval/{label}/acc": torch.tensor([correct, n], dtype=torch.float64)}


def steps_per_epoch(stage: Stage, counts: dict[str, int], workers: int) -> int:
    """Micro-batches one worker takes per epoch (streams are split equally across workers; each
    phase's pass at most ``max_steps_per_epoch``)."""
    cap = stage.train.max_steps_per_epoch or math.inf
    return sum(min(math.ceil((counts[p.stream] // workers) / stage.train.batch_size), cap) for p in stage.phases)


def run_stage(stage: Stage, streams: dict[str, Any], scaling: ScalingSettings, *, storage: Path,
              run_name: str | None = None, callbacks: list | None = None, on_report=None,
              pid_dir: str | None = None,
              progress_s: float = 15.0, resume_from: Path | None = None) -> StageResult:
    """Train ``stage`` on DeepSpeed and return its model directory and metrics: on a Ray Train
    worker group, or in this process when :func:`trains_in_process` (the same loop either way).

    ``streams`` maps each stream a phase names to a Ray Dataset (tokenised, teacher columns
    included). Re-running with the same ``storage``/``run_name`` after a crash of the driver
    starts a new run; on Ray Train, worker failures inside one run are recovered from
    checkpoints, up to ``scaling.max_failures`` times. ``resume_from``: a checkpoint directory
    of an earlier run of this stage (not its final one) to continue from. Every epoch's report
    reaches ``callbacks`` (Ray Train callbacks, worker group) or ``on_report(run_name, metrics)``
    (in process).
    """
    missing = [s for s in stage.streams if s not in streams]
    if missing:
        raise ValueError(f"stage {stage.name!r} needs streams {missing}")
    counts = {name: streams[name].count() for name in stage.streams}
    empty = [name for name, n in counts.items() if n < scaling.workers]
    if empty:
        raise ValueError(f"stage {stage.name!r}: streams {empty} have fewer rows than workers")
    storage = Path(storage).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    name = run_name or f"{stage.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = {"stage": stage, "scaling": scaling, "progress_s": progress_s,
              "steps_per_epoch": steps_per_epoch(stage, counts, scaling.workers),
              "pid_dir": pid_dir, "resume_from": str(resume_from) if resume_from else None}
    plan_resources(scaling)  # workers that can never be placed: one InputError line, not a hang
    ordered_data()
    t0 = time.perf_counter()
    if trains_in_process(scaling):
        ckpt, last = _fit_in_process(config, streams, storage / name, on_report)
    else:
        ckpt, last = _fit_on_ray_train(config, streams, storage, name, callbacks)
    seconds = time.perf_counter() - t0
    state = json.loads((ckpt / STATE_FILE).read_text())
    return StageResult(model_dir=ckpt / HF_MODEL_DIR if stage.model is not None else None,
                       metrics=dict(last or state["history"][-1]),
                       history=state["history"], seconds=seconds, checkpoint_path=ckpt,
                       extras_path=ckpt / EXTRAS_FILE if (ckpt / EXTRAS_FILE).is_file() else None,
                       adapter_dir=ckpt / ADAPTER_DIR if (ckpt / ADAPTER_DIR).is_dir() else None)


def _fit_in_process(config: dict[str, Any], streams: dict[str, Any], run_dir: Path, on_report):
    """The stage in this process: no worker group, no second copy of the libraries or the data;
    torch uses ``cpus_per_worker`` threads for the stage. Returns (final checkpoint, last metrics)."""
    if config["scaling"].gpus_per_worker == 0:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when DeepSpeed is first imported
    _single_process_group()
    runtime = _InProcessRuntime({n: streams[n] for n in config["stage"].streams}, run_dir, on_report)
    threads = torch.get_num_threads()
    try:
        _train_worker(config, runtime)
    finally:
        torch.set_num_threads(threads)
    return runtime.last_checkpoint, runtime.last_metrics


def _fit_on_ray_train(config: dict[str, Any], streams: dict[str, Any], storage: Path, name: str, callbacks):
    """The stage as a Ray Train run (a TorchTrainer over ``scaling.workers`` workers). Returns
    (final checkpoint, last metrics)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    stage, scaling = config["stage"], config["scaling"]
    use_gpu = scaling.gpus_per_worker > 0
    resources = {"CPU": scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    # Train V2 reroutes print() through its logger and, where stdout is wrapped, prints it as well:
    # every progress line reached the driver twice
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **({} if use_gpu else {"DS_ACCELERATOR": "cpu"})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.workers, use_gpu=use_gpu, resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env}, callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        datasets={name_: streams[name_] for name_ in stage.streams},
        # rows reach the workers in the streams' order (shuffled, if at all, by a seeded local
        # buffer): a stage re-run on the same data and settings trains on the same batches
        dataset_config=ray.train.DataConfig(execution_options=ray.train.DataConfig.default_ingest_options()),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return Path(result.checkpoint.path), result.metrics


def copy_model(src: Path, dst: Path) -> Path:
    """Copy a finished stage's HF directory to ``dst`` (replacing it)."""
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst
