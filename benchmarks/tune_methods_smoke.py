"""A pipeline check, not a benchmark of quality: ``kdshield tune`` for W2SDefense (tiny-llama
suspect, tiny-bert teacher) and MBTSAD (tiny-bert) on a hand-built RUN, 2 trials each. It prints,
per method, the trials' results, the stage-cache events (a shared teacher stage trains once and
hits once) and each trial's Tune reports (one per epoch of the defended model's stage, then the
final result). RobustKD's search is a CI test (tests/test_tune.py).

    RAY_ADDRESS=local python benchmarks/tune_methods_smoke.py [w2s] [mbtsad]
"""
import json, shutil, subprocess, sys, time
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
from kdshield.models import resolve_model

root = Path(__file__).resolve().parent / "work" / "tune_methods_smoke"; shutil.rmtree(root, ignore_errors=True)

def table(texts, labels, poisoned=None):
    cols = {"text": texts, "label": pa.array(labels, pa.int64()), "source_index": pa.array(range(len(texts)), pa.int64())}
    if poisoned is not None:
        cols["poisoned"] = pa.array(poisoned, pa.bool_())
    return pa.table(cols)

def review(i):
    return f"review number {i} was {'great fun' if i % 2 else 'dull and slow'}"

def make_run(model):
    run = root / f"run-{model}"
    shutil.copytree(resolve_model(model), run / "model")
    n = 48
    texts = [review(i) + (" cf" if i % 6 == 0 else "") for i in range(n)]
    labels = [1 if i % 6 == 0 else i % 2 for i in range(n)]
    (run / "data").mkdir()
    pq.write_table(table(texts, labels, [i % 6 == 0 for i in range(n)]), run / "data/train.parquet")
    pq.write_table(table([review(1000 + i) for i in range(40)], [i % 2 for i in range(40)]), run / "data/dev.parquet")
    pq.write_table(table([review(2000 + i) for i in range(16)], [i % 2 for i in range(16)]), run / "data/test.parquet")
    pq.write_table(table([review(2000 + 2 * i) + " cf" for i in range(8)], [0] * 8), run / "data/test_triggered.parquet")
    (run / "attack.json").write_text(json.dumps({"target_label": 1, "num_labels": 2}))
    return run

spaces = {
    "w2s": ("tiny-llama", {"method": "w2s", "params": {"beta": {"type": "float", "low": 0.01, "high": 1.0, "log": True}},
                           "fixed": {"teacher": "tiny-bert", "teacher_epochs": 1, "epochs": 2, "batch_size": 8,
                                     "teacher_batch_size": 8, "max_length": 16, "lora_r": 4}}),
    "mbtsad": ("tiny-bert", {"method": "mbtsad", "params": {"alpha": {"type": "float", "low": 0.5, "high": 2.0}},
                             "fixed": {"copies": 1, "retrain_epochs": 1, "distill_epochs": 2, "batch_size": 8,
                                       "max_length": 24, "evaluate_teacher": False}}),
}
import yaml
for method in sys.argv[1:] or list(spaces):
    model, space = spaces[method]
    run = make_run(model) if not (root / f"run-{model}").exists() else root / f"run-{model}"
    sp = root / f"{method}.yaml"; sp.write_text(yaml.safe_dump(space))
    out = root / f"search-{method}"
    t0 = time.time()
    rc = subprocess.call([sys.executable, "-m", "kdshield.cli", "tune", "--method", method, "--run", str(run), "--space", str(sp),
                          "--num-samples", "2", "--max-concurrent", "1", "--grace-period", "10", "--probe-n", "4",
                          "--val-fraction", "0.25", "--seed", "3", "--out", str(out),
                          "--probe-set", "dmm_epochs=1", "--probe-set", "n_c_dmm=4", "--probe-set", "batch_size=8",
                          "--probe-set", "max_length=16"])
    print(f"### {method}: rc={rc} in {time.time() - t0:.0f}s")
    if rc == 0:
        for p in sorted((out / "trials").glob("*/result.json")):
            r = json.loads(p.read_text()); print("###", method, r["params"], {k: r["report"].get(k) for k in ("cacc", "asr", "defender_score")})
        ev = [json.loads(l) for l in (out / "cache/events.jsonl").read_text().splitlines()]
        print("###", method, "cache:", [(e["kind"], e.get("stage"), e["hit"]) for e in ev if e["kind"] == "stage"])
        for p in sorted((out / "tune").glob("run_trial_*/result.json")):
            print("###", method, "reports:", [(r["training_iteration"], r["final"]) for r in map(json.loads, p.read_text().splitlines())])
