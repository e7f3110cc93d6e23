"""The large-model paths on one accelerator, in minutes: tiny random LLaMA and Qwen2 suspects.

    python benchmarks/gpu_smoke.py                  # one GPU: bf16, ZeRO-3, everything on cuda
    python benchmarks/gpu_smoke.py --device cpu     # the same items on the CPU (DeepSpeed's cpu accelerator)

Each item is a real ``kdshield`` command (its own process, as a user runs it) on a toy sentiment
task, and each checks where it ran (every stage's ``device_per_rank``), not only that it exited 0;
a defense also that it trained LoRA adapters on a frozen base (only the adapted projections and the
head differ from the suspect's weights):

1. ``attack`` tiny-llama and 2. tiny-qwen2 at bf16, ZeRO-3: a RUN with CACC/ASR, trained on the device;
3. BeDKD ``--lora 8`` on the tiny-llama RUN, teacher outputs cached (batch inference);
4. the same with ``--teacher-outputs live`` (the frozen teacher inside the training loop);
5. W2SDefense (LoRA student on the suspect, tiny-bert teacher) on the tiny-qwen2 RUN;
6. inference on the device: the in-process scorer and a Ray actor given the device place their
   model there.

One PASS/FAIL line per item, a non-zero exit on any failure; ``OUT/gpu_smoke.{json,md}``
(default ``benchmarks/results/gpu_smoke_<device>``). Quality is not judged here (a few epochs
of a random 2-layer model): the defense benchmarks do that.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
ITEM_TIMEOUT_S = 600

# The attack's training (small enough for a 2-core CPU, the same on a GPU) and the defenses' sizes.
TRAIN = ["--epochs", "3", "--lr", "5e-3", "--batch-size", "16", "--max-length", "24", "--seed", "0"]
BEDKD = {"dmm_epochs": 2, "akd_cycles": 2, "n_c_dmm": 8, "n_c": 8, "n_p": 8, "dmm_lr": 1e-3, "akd_lr": 1e-3,
         "batch_size": 16, "max_length": 24}
W2S = {"teacher": "tiny-bert", "teacher_epochs": 2, "epochs": 2, "lora_r": 8, "batch_size": 16, "max_length": 24,
       "teacher_batch_size": 16, "evaluate_teacher": False}


LORA_TARGETS = ("q_proj", "v_proj", "score")  # the adapters' modules on LLaMA/Qwen2 and the classifier head


def settings(values: dict) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def scaling_flags(device: str) -> list[str]:
    """One worker at ZeRO-3 and bf16; on the GPU it is given the GPU (Ray Train worker, inference
    actors asking for it too), on the CPU it trains in the command's process."""
    flags = ["--workers", "1", "--zero", "3", "--bf16"]
    return flags + (["--gpus-per-worker", "1"] if device == "cuda" else ["--cpus-per-worker", str(os.cpu_count() or 1)])


def write_data(root: Path) -> dict[str, str]:
    from kdshield.datasets.toy import toy_review, toy_table

    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, start, n in (("train", 0, 160), ("test", 5000, 48)):
        files[name] = str(root / f"{name}.parquet")
        pq.write_table(toy_table([toy_review(start + i) for i in range(n)], [i % 2 for i in range(n)]), files[name])
    return files


def kdshield(args: list[str], env: dict[str, str], log: Path) -> tuple[int, str]:
    """Run ``kdshield ARGS``; (exit code, its last error line)."""
    with log.open("w") as out:
        try:
            code = subprocess.run([str(Path(sys.executable).parent / "kdshield"), *args], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=ITEM_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            return 124, f"no exit within {ITEM_TIMEOUT_S} s"
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return code, next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")


def trained_on(history: list[dict]) -> set[str]:
    """The device types every epoch of a stage's history trained on (``cuda``, ``cpu``)."""
    return {d.split(":")[0] for h in history for d in h.get("device_per_rank", ["?"])}


def check_attack(out: Path, device: str) -> str | None:
    metrics = json.loads((out / "metrics.json").read_text())
    if not all(0 <= metrics[k] <= 100 for k in ("cacc", "asr")):
        return f"metrics out of range: {metrics['cacc']}, {metrics['asr']}"
    if not (out / "model" / "model.safetensors").is_file() or list(out.rglob("*.bin")):
        return "the backdoored model is not a safetensors file"
    if trained_on(metrics["history"]) != {device}:
        return f"trained on {sorted(trained_on(metrics['history']))}, not {device}"
    return None


def changed_weights(before: Path, after: Path) -> set[str]:
    """Names of the tensors that differ between two safetensors files (compared as float32)."""
    from safetensors.torch import load_file

    a, b = load_file(str(before)), load_file(str(after))
    return {k for k in a if k not in b or not bool((a[k].float() == b[k].float()).all())}


def check_defense(out: Path, device: str, suspect: Path) -> str | None:
    metrics = json.loads((out / "metrics.json").read_text())
    if not all(0 <= metrics[k] <= 100 for k in ("cacc", "asr")):
        return f"metrics out of range: {metrics['cacc']}, {metrics['asr']}"
    where = {stage: trained_on(history) for stage, history in metrics["history"].items() if history}
    wrong = {stage: sorted(d) for stage, d in where.items() if d != {device}}
    if not where or wrong:
        return f"stages not on {device}: {wrong or 'no stage history'}"
    # LoRA on one frozen base: only the adapted projections (merged into the model) and the head move
    changed = changed_weights(suspect / "model.safetensors", out / "model" / "model.safetensors")
    outside = sorted(k for k in changed if not any(t in k for t in LORA_TARGETS))
    if not changed or outside:
        return f"not a LoRA-only change: {len(changed)} tensors changed, {outside[:3]} outside the adapters"
    if list(out.rglob("*.bin")) or list(out.rglob("*.pt")):
        return "a pickle-format file was written"
    return None


def check_inference(model_dir: str, device: str) -> str | None:
    """The in-process scorer and a Ray actor holding the device both compute on it."""
    import numpy as np
    import ray

    from kdshield.cluster import connect
    from kdshield.trainables.inference import BatchPredictor, LocalScorer

    scorer = LocalScorer(2, threads=1)
    logits = scorer.score([np.array([1, 2, 3])], model_dir, ("logits",), pad_id=0)["logits"]
    local = next(scorer._model(model_dir, None)[0].parameters()).device.type
    connect(num_cpus=os.cpu_count() or 1)
    try:
        @ray.remote(num_gpus=1 if device == "cuda" else 0)
        def actor_device() -> str:
            predictor = BatchPredictor(model_dir, 2, pad_ids={"input_ids": 0})
            predictor({"input_ids": np.array([np.array([1, 2, 3])], dtype=object)})
            return next(predictor.model.parameters()).device.type

        remote = ray.get(actor_device.remote())
    finally:
        ray.shutdown()
    if logits.shape != (1, 2):
        return f"scorer logits of shape {logits.shape}"
    if {local, remote} != {device}:
        return f"in-process scorer on {local}, Ray actor on {remote}; expected {device}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/gpu_smoke_<device>")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or HERE / "results" / f"gpu_smoke_{args.device}"
    env = dict(os.environ, RAY_ADDRESS="local")
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        os.environ["DS_ACCELERATOR"] = "cpu"
    else:
        import torch

        if not torch.cuda.is_available():
            print("gpu_smoke: error: --device cuda but torch sees no GPU here; use --device cpu", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        work = Path(scratch)
        files = write_data(work / "data")
        flags = scaling_flags(args.device)
        runs = {m: work / f"run-{m}" for m in ("tiny-llama", "tiny-qwen2")}
        items = [(f"attack {m} (bf16, ZeRO-3)", "attack",
                  ["attack", "--model", m, "--train", files["train"], "--test", files["test"], "--out", str(run),
                   "--poison-rate", "0.2", "--dev-fraction", "0.25", *TRAIN, *flags])
                 for m, run in runs.items()]
        bedkd = ["defend", "--method", "bedkd", "--run", str(runs["tiny-llama"]), "--lora", "8", *flags,
                 *settings(BEDKD)]
        items += [("BeDKD --lora 8, cached teacher outputs", "lora", [*bedkd, "--out", str(work / "bedkd-cached")]),
                  ("BeDKD --lora 8, live teacher", "lora",
                   [*bedkd, "--teacher-outputs", "live", "--out", str(work / "bedkd-live")]),
                  ("W2SDefense (LoRA student, tiny-bert teacher)", "lora",
                   ["defend", "--method", "w2s", "--run", str(runs["tiny-qwen2"]), "--out", str(work / "w2s"),
                    *flags, *settings(W2S)])]
        model_of = {work / name: runs[m] / "model" for name, m in
                    (("bedkd-cached", "tiny-llama"), ("bedkd-live", "tiny-llama"), ("w2s", "tiny-qwen2"))}
        results, start = [], time.time()
        for i, (name, kind, cmd) in enumerate(items):
            t0 = time.time()
            target = Path(cmd[cmd.index("--out") + 1])
            code, last = kdshield(cmd, env, work / f"item{i}.log")
            problem = last if code else (check_attack(target, args.device) if kind == "attack"
                                         else check_defense(target, args.device, model_of[target]))
            results.append({"item": name, "passed": problem is None, "seconds": round(time.time() - t0, 1),
                            "command": "kdshield " + " ".join(cmd).replace(str(work), "WORK"),
                            **({"problem": problem} if problem else {})})
            print(f"{'PASS' if problem is None else 'FAIL'}  {name}  ({results[-1]['seconds']} s)"
                  + (f": {problem}" if problem else ""), flush=True)
        t0 = time.time()
        try:
            problem = check_inference(str(runs["tiny-llama"] / "model"), args.device)
        except Exception as exc:  # noqa: BLE001 - a smoke item reports, the others still run
            problem = f"{type(exc).__name__}: {exc}"
        results.append({"item": "inference on the device (in-process scorer, Ray actor)",
                        "passed": problem is None, "seconds": round(time.time() - t0, 1),
                        **({"problem": problem} if problem else {})})
        print(f"{'PASS' if problem is None else 'FAIL'}  {results[-1]['item']}  ({results[-1]['seconds']} s)"
              + (f": {problem}" if problem else ""), flush=True)
    failed = [r["item"] for r in results if not r["passed"]]
    record = {"device": args.device, "device_name": device_name(args.device), "seconds": round(time.time() - start, 1),
              "passed": not failed, "items": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_smoke.json").write_text(json.dumps(record, indent=1))
    rows = "\n".join(f"| {r['item']} | {'pass' if r['passed'] else 'FAIL: ' + r['problem']} | {r['seconds']} |"
                     for r in results)
    (out / "gpu_smoke.md").write_text(
        f"# GPU smoke on {record['device_name']}\n\n`python benchmarks/gpu_smoke.py --device {args.device}`: "
        f"{len(results) - len(failed)}/{len(results)} items passed in {record['seconds']} s.\n\n"
        f"| item | result | seconds |\n|---|---|---|\n{rows}\n")
    print(f"gpu_smoke: {len(results) - len(failed)}/{len(results)} passed in {record['seconds']} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def device_name(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())
