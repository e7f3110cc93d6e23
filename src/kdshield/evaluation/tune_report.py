"""``kdshield report DIR...``: what a search found, as tables, plots and re-runnable YAML.

For every trial of every search directory (``kdshield tune --out``): its sampled parameters,
status (``finished``; ``stopped``: ended early by ASHA or by a crash, with its last per-epoch
estimates from the Optuna study) and metrics. Written into ``report/`` of the first search
directory (or ``--out``), built beside it and published whole:

- ``trials.md`` / ``trials.csv``: all trials;
- ``pareto.png``: ASR against CACC of the finished trials, the non-dominated ones joined;
- ``importance.png``: Optuna's parameter importances (PED-ANOVA: no scikit-learn needed) for each objective of each study;
- ``best.yaml`` (one objective) or ``pareto_<k>.yaml`` (asr+cacc): the best configuration(s)
  as ``kdshield defend --config`` files (method, run, the clean subset the trials trained on,
  params, scaling) that re-run the trial;
- ``report.json``: the same numbers, plus the Spearman rank correlation of the defender score
  with the true ASR across finished trials (benchmark RUNs only; a good trigger-free score
  has a correlation near -1).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from kdshield.errors import InputError
from kdshield.evaluation.objectives import OBJECTIVES, SCALAR_MODES
from kdshield.outputs import check_replaceable, check_writable, staged

METRICS = ("cacc", "asr", "defender_score", "canary_score", "canary_asr", "far", "frr", "trial_seconds")
SCORES = {"defender_score": "the defender score", "canary_score": "the canary score"}  # trigger-free objectives


def spearman(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN with fewer than 3 pairs."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 3:
        return float("nan")

    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(v.size)
        r[order] = np.arange(v.size, dtype=float)
        for value in np.unique(v):
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _without_hidden_password(url: str | None) -> str | None:
    """The recorded storage URL (its password written as ``***``) without the password: the
    database client then finds it where it keeps passwords (PGPASSWORD, ~/.pgpass), or
    $KDSHIELD_STORAGE gives the whole URL."""
    if not url or ":***@" not in url:
        return url
    from sqlalchemy.engine import make_url

    return make_url(url.replace(":***@", "@")).render_as_string(hide_password=False)


def _load(out: Path) -> dict[str, Any]:
    record = out / "tune.json"
    if not record.is_file():
        raise InputError(f"{out}: not a search directory of `kdshield tune` (no tune.json)")
    meta = json.loads(record.read_text())
    job = meta["job"]
    started = {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "trials").glob("*/started.json"))}
    finished = {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "trials").glob("*/result.json"))}
    study = None
    try:
        import optuna

        url = os.environ.get("KDSHIELD_STORAGE") or _without_hidden_password(job.get("storage")) \
            or f"sqlite:///{out.resolve() / 'study.db'}"
        study = optuna.load_study(study_name=meta["study_name"], storage=url)
    except Exception:  # noqa: BLE001 - the study is optional for the tables
        study = None
    return {"dir": out, "meta": meta, "job": job, "started": started, "finished": finished, "study": study}


def _rows(search: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    metrics, _ = OBJECTIVES[search["job"]["objective"]]
    study_trials = search["study"].get_trials(deepcopy=False) if search["study"] is not None else []
    for trial_id, start in search["started"].items():
        row: dict[str, Any] = {"search": search["dir"].name, "trial": trial_id, "method": search["job"]["method"]}
        done = search["finished"].get(trial_id)
        if done is not None:
            row["status"] = "finished"
            row.update({k: done["report"].get(k) for k in METRICS})
            row["stage_cache_hits"] = done["report"].get("cache_stage_hits")
        else:
            row["status"] = "stopped"
            match = [t for t in study_trials if t.params == start["sampled"] and t.values]
            if match:
                row.update(dict(zip(metrics, match[-1].values)))
        row["params"] = start["sampled"]
        row["settings"] = start["params"]
        rows.append(row)
    return rows


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 and value else f"{value:.2f}"
    return str(value)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (asr, cacc) no other point beats on both (lower ASR, higher CACC)."""
    front = []
    for i, (a, c) in enumerate(points):
        if not any((a2 <= a and c2 >= c) and (a2 < a or c2 > c) for j, (a2, c2) in enumerate(points) if j != i):
            front.append(i)
    return front


def _figure(width=6.4, height=4.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _plot_pareto(rows, path: Path) -> list[dict]:
    done = [r for r in rows if r["status"] == "finished" and r.get("asr") is not None and r.get("cacc") is not None]
    fig = _figure()
    ax = fig.add_subplot()
    front_rows = []
    if done:
        pts = [(float(r["asr"]), float(r["cacc"])) for r in done]
        front = pareto_front(pts)
        front_rows = [done[i] for i in front]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], c="tab:blue", alpha=0.6, label="trials")
        fp = sorted(pts[i] for i in front)
        ax.plot([p[0] for p in fp], [p[1] for p in fp], "o-", c="tab:red", label="Pareto front")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no finished trial with a known ASR", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("ASR % (lower is better)")
    ax.set_ylabel("CACC % (higher is better)")
    ax.set_title("finished trials: ASR vs CACC")
    fig.savefig(path)
    return front_rows


def _plot_importance(searches, path: Path) -> dict[str, dict[str, float]]:
    import optuna

    panels: dict[str, dict[str, float]] = {}
    for s in searches:
        study = s["study"]
        if study is None:
            continue
        metrics, _ = OBJECTIVES[s["job"]["objective"]]
        for i, metric in enumerate(metrics):
            key = f"{s['dir'].name}: {metric}"
            try:
                target = (lambda t, i=i: t.values[i]) if len(metrics) > 1 else None
                panels[key] = optuna.importance.get_param_importances(
                    study, target=target, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
            except (RuntimeError, ValueError, ImportError) as err:  # too few trials, one value only, ...
                panels[key] = {"(not enough trials: " + str(err).splitlines()[0][:60] + ")": 0.0}
    fig = _figure(6.4, max(3.0, 2.6 * max(1, len(panels))))
    if not panels:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no study found", ha="center", va="center", transform=ax.transAxes)
    for k, (title, imp) in enumerate(panels.items()):
        ax = fig.add_subplot(len(panels), 1, k + 1)
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names], color="tab:green")
        ax.set_title(f"parameter importance (PED-ANOVA) - {title}", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return panels


def _defend_yaml(search: dict[str, Any], row: dict[str, Any], path: Path) -> None:
    job = search["job"]
    doc = {"method": job["method"], "run": str(Path(job["run"]).resolve()),
           "clean": str((search["dir"] / "shared" / "clean_train.parquet").resolve()),
           "params": row["settings"],
           "scaling": {k: v for k, v in job["scaling"].items() if v is not None}}
    measured = ", ".join(f"{k} {row[k]:.2f}" for k in METRICS if isinstance(row.get(k), (int, float)))
    text = ("# `kdshield defend --config THIS_FILE --out DIR` re-runs this configuration:\n"
            f"# trial {row['trial']} of the search {search['dir'].resolve()}\n"
            f"# measured there: {measured}\n")
    path.write_text(text + yaml.safe_dump(doc, sort_keys=False))


REPORT_FILES = ("trials.md", "trials.csv", "pareto.png", "importance.png", "report.json", "*.yaml")


def write_report(dirs: list[str], out: str | None = None) -> dict[str, Any]:
    """Write the report of the searches in ``dirs`` into ``out`` (default: ``report`` in the first
    dir), built beside it and published whole; returns the published paths."""
    searches = []
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            raise InputError(f"{p}: no such search directory")
        searches.append(_load(p))
    final = Path(out) if out else Path(dirs[0]) / "report"
    check_replaceable(final, what="report replaces", own=REPORT_FILES)
    check_writable(final)
    with staged(final) as dest:
        written = _write(searches, dest)
    return {k: (final / v.name if isinstance(v, Path) else v) for k, v in written.items()}


def _write(searches: list[dict[str, Any]], dest: Path) -> dict[str, Any]:
    rows = [r for s in searches for r in _rows(s)]
    params = sorted({k for r in rows for k in r["params"]})
    columns = ["search", "trial", "method", "status", *params, *METRICS, "stage_cache_hits"]
    with open(dest / "trials.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([r["params"].get(c) if c in params else r.get(c) for c in columns])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r["params"].get(c) if c in params else r.get(c)) for c in columns) + " |")
    finished = [r for r in rows if r["status"] == "finished"]
    summary = [f"{len(rows)} trial(s), {len(finished)} finished."]
    rhos = {}
    for score, words in SCORES.items():
        scored = [r for r in finished if r.get(score) is not None and r.get("asr") is not None]
        rhos[score] = spearman([r[score] for r in scored], [r["asr"] for r in scored])
        if np.isfinite(rhos[score]):
            summary.append(f"Spearman rank correlation of {words} with the true ASR over finished trials: "
                           f"{rhos[score]:.3f} (near -1: it ranks trials as ASR does).")
    front = _plot_pareto(rows, dest / "pareto.png")
    importances = _plot_importance(searches, dest / "importance.png")
    best_files = []
    for s in searches:
        metrics, modes = OBJECTIVES[s["job"]["objective"]]
        mine = [r for r in finished if r["search"] == s["dir"].name and all(r.get(m) is not None for m in metrics)]
        if not mine:
            continue
        if len(metrics) == 1:
            sign = 1 if SCALAR_MODES[metrics[0]] == "max" else -1
            best = [max(mine, key=lambda r: sign * float(r[metrics[0]]))]
            names = ["best.yaml" if len(searches) == 1 else f"best_{s['dir'].name}.yaml"]
        else:
            idx = pareto_front([(float(r["asr"]), float(r["cacc"])) for r in mine])
            best = [mine[i] for i in idx]
            prefix = "pareto" if len(searches) == 1 else f"pareto_{s['dir'].name}"
            names = [f"{prefix}_{k}.yaml" for k in range(len(best))]
        for row, name in zip(best, names):
            _defend_yaml(s, row, dest / name)
            best_files.append(dest / name)
            summary.append(f"Best ({', '.join(metrics)}): trial {row['trial']} -> {name}")
    markdown = "\n".join(["# kdshield tune report", "", *summary, "", *lines, ""])
    (dest / "trials.md").write_text(markdown)
    report = {"trials": rows, "spearman_defender_vs_asr": rhos["defender_score"],
              "spearman_canary_vs_asr": rhos["canary_score"], "pareto": [r["trial"] for r in front],
              "importances": importances, "best": [p.name for p in best_files]}
    (dest / "report.json").write_text(json.dumps(report, indent=2, default=str, sort_keys=True) + "\n")
    return {"markdown_text": markdown, "markdown": dest / "trials.md", "csv": dest / "trials.csv",
            "pareto": dest / "pareto.png", "importance": dest / "importance.png", "json": dest / "report.json",
            **{f"best{k}": p for k, p in enumerate(best_files)}}
