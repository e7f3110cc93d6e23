"""Multi-node training overhead: the same ZeRO-3 stage on two nodes vs on one node, in one run.

A ``ray.cluster_utils.Cluster`` on this machine (head with 0 CPUs; worker nodes of 1, 1 and 2
CPUs, each its own raylet) runs the packaged MiniLM on Rotten Tomatoes samples with 2 Ray Train
workers (1 CPU each, DeepSpeed ZeRO-3, gloo) twice: ``STRICT_SPREAD`` (one worker per node, the
collectives cross raylets) and ``STRICT_PACK`` (both workers on the 2-CPU node). Both runs see the
same data, seed and settings. Reported: steady-state samples/s (epochs after the first), the
ratio spread/pack, wall seconds, and the largest difference of the final weights.

Caveat: the "nodes" share one machine, so the network between them is loopback; on a real
cluster the gap grows with the interconnect's latency and bandwidth.

    python benchmarks/multinode.py [--rows 512] [--epochs 3]   # writes benchmarks/results/multinode.{json,md}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--work", default=str(HERE / "work" / "multinode"))
    args = ap.parse_args()

    from kdshield.cluster.local import multinode_cluster
    from kdshield.config import ScalingSettings, TrainSettings
    from kdshield.datasets import build_corpus, read_table
    from kdshield.defenses.losses import CrossEntropy
    from kdshield.demo import subset
    from kdshield.evaluation import markdown_table
    from kdshield.models import load_classifier, load_tokenizer, resolve_model
    from kdshield.trainables.attack import tokenized_stream
    from kdshield.trainables.engine import run_stage
    from kdshield.defenses.stage import ModelSpec, Phase, Stage

    work = Path(args.work)
    build_corpus("rotten-tomatoes", work / "corpus", seed=0)
    table = subset(read_table(work / "corpus/train.parquet"), args.rows, seed=0)
    model_dir = resolve_model(args.model)
    tok = load_tokenizer(model_dir)
    stage = Stage(name="multinode", model=ModelSpec(source=str(model_dir), num_labels=2),
                  phases=(Phase("train", CrossEntropy()),),
                  train=TrainSettings(epochs=args.epochs, lr=5e-5, batch_size=args.batch_size,
                                      max_length=args.max_length, checkpoint_interval_s=3600),
                  pad_ids={"input_ids": tok.pad_token_id}, padding_side=tok.padding_side)
    rows = []
    results = {}
    with multinode_cluster([1, 1, 2], head_cpus=0) as cluster:
        head = cluster.head_node.node_id
        stream = tokenized_stream(table, model_dir, args.max_length)
        for strategy in ("STRICT_PACK", "STRICT_SPREAD"):
            print(f"{strategy}: 2 workers, ZeRO-3", flush=True)
            result = run_stage(stage, {"train": stream},
                               ScalingSettings(workers=2, zero=3, placement_strategy=strategy),
                               storage=work / "ray" / strategy)
            nodes = result.metrics["worker_nodes"]
            assert head not in nodes
            steady = [h["samples_per_s"] for h in result.history[1:]] or [result.history[-1]["samples_per_s"]]
            results[strategy] = {"nodes": len(set(nodes)), "samples_per_s": sum(steady) / len(steady),
                                 "epoch_samples_per_s": [h["samples_per_s"] for h in result.history],
                                 "seconds": result.seconds, "final_loss": result.history[-1]["train/loss"],
                                 "model_dir": str(result.model_dir)}
        weights = [load_classifier(results[s]["model_dir"], 2)[0].state_dict() for s in results]
        max_diff = max(float((weights[0][k].float() - weights[1][k].float()).abs().max()) for k in weights[0])
    ratio = results["STRICT_SPREAD"]["samples_per_s"] / results["STRICT_PACK"]["samples_per_s"]
    for strategy, r in results.items():
        rows.append({"placement": strategy, "nodes": r["nodes"], "samples/s": round(r["samples_per_s"], 1),
                     "seconds": round(r["seconds"], 1), "final loss": round(r["final_loss"], 4)})
    record = {"model": args.model, "rows": args.rows, "epochs": args.epochs, "batch_size": args.batch_size,
              "max_length": args.max_length, "workers": 2, "zero": 3, "results": results,
              "ratio_spread_over_pack": ratio, "max_weight_difference": max_diff}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "multinode.json").write_text(json.dumps(record, indent=1))
    md = (f"# Multi-node training overhead\n\n{args.model}, {args.rows} Rotten Tomatoes samples, {args.epochs} epochs, "
          f"2 workers x 1 CPU, ZeRO-3, batch {args.batch_size}, {args.max_length} tokens; one machine, "
          f"`ray.cluster_utils.Cluster` (head 0 CPUs + nodes of 1, 1, 2 CPUs).\n\n"
          + markdown_table(rows)
          + f"\n\nTwo nodes vs one node, steady-state samples/s: **{ratio:.2f}x** "
          f"(largest final-weight difference {max_diff:.2e}).\n"
          "Nodes share one machine: the link between them is loopback, so this measures Ray/gloo's "
          "cross-raylet overhead, not a network.\n")
    (out / "multinode.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
