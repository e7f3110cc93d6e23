"""A pipeline check, not a benchmark of quality: ``kdshield tune`` for W2SDefense (tiny-llama
suspect, tiny-bert teacher) and MBTSAD (tiny-bert) on a hand-built RUN, 2 trials each. It prints,
per method, the trials' results, the stage-cache events (a shared teacher stage trains once and
hits once) and each trial's Tune reports (one per epoch of the defended model's stage, then the
final result). RobustKD's search is a CI test (tests/test_tune.py).

    RAY_ADDRESS=local python benchmarks/tune_methods_smoke.py [w2s] [mbtsad]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from kdshield.datasets.toy import write_toy_run

ROOT = Path(__file__).resolve().parent / "work" / "tune_methods_smoke"

# method -> (suspect model, search space)
SPACES = {
    "w2s": ("tiny-llama", {"method": "w2s", "params": {"beta": {"type": "float", "low": 0.01, "high": 1.0, "log": True}},
                           "fixed": {"teacher": "tiny-bert", "teacher_epochs": 1, "epochs": 2, "batch_size": 8,
                                     "teacher_batch_size": 8, "max_length": 16, "lora_r": 4}}),
    "mbtsad": ("tiny-bert", {"method": "mbtsad", "params": {"alpha": {"type": "float", "low": 0.5, "high": 2.0}},
                             "fixed": {"copies": 1, "retrain_epochs": 1, "distill_epochs": 2, "batch_size": 8,
                                       "max_length": 24, "evaluate_teacher": False}}),
}


def make_run(model: str) -> Path:
    """The toy RUN (``kdshield.datasets.toy``: trigger " cf" on every sixth training row) with ``model``."""
    run = ROOT / f"run-{model}"
    return run if run.exists() else write_toy_run(run, model)


def smoke(method: str) -> None:
    model, space = SPACES[method]
    run = make_run(model)
    space_file = ROOT / f"{method}.yaml"
    space_file.write_text(yaml.safe_dump(space))
    out = ROOT / f"search-{method}"
    t0 = time.time()
    rc = subprocess.call([sys.executable, "-m", "kdshield.cli", "tune", "--method", method, "--run", str(run),
                          "--space", str(space_file), "--num-samples", "2", "--max-concurrent", "1",
                          "--grace-period", "10", "--probe-n", "4", "--val-fraction", "0.25", "--seed", "3",
                          "--out", str(out), "--probe-set", "dmm_epochs=1", "--probe-set", "n_c_dmm=4",
                          "--probe-set", "batch_size=8", "--probe-set", "max_length=16"])
    print(f"### {method}: rc={rc} in {time.time() - t0:.0f}s")
    if rc != 0:
        return
    for path in sorted((out / "trials").glob("*/result.json")):
        result = json.loads(path.read_text())
        print("###", method, result["params"],
              {k: result["report"].get(k) for k in ("cacc", "asr", "defender_score")})
    events = [json.loads(line) for line in (out / "cache" / "events.jsonl").read_text().splitlines()]
    print("###", method, "cache:", [(e["kind"], e.get("stage"), e["hit"]) for e in events if e["kind"] == "stage"])
    for path in sorted((out / "tune").glob("run_trial_*/result.json")):
        reports = [json.loads(line) for line in path.read_text().splitlines()]
        print("###", method, "reports:", [(r["training_iteration"], r["final"]) for r in reports])


def main() -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    for method in sys.argv[1:] or list(SPACES):
        smoke(method)


if __name__ == "__main__":
    main()
