"""kdshield tune / report / search_spaces: validation (fast), then a tiny BeDKD search through
Ray that is SIGKILLed mid-search and resumed, shares its DMM stage, and is reported; and a study
stored in a real PostgreSQL server started here."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from kdshield.cli import main
from kdshield.errors import InputError
from kdshield import defenses
from kdshield.search_spaces import load_space

# Another process's `ray start` / Cluster must not capture our local Ray (ray.init() without an
# address joins the most recent cluster it finds).
os.environ.setdefault("RAY_ADDRESS", "local")


def _space(tmp_path: Path, doc: dict | str, name: str = "space.yaml") -> str:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return str(path)


# ----------------------------------------------------------------------------- spaces (no Ray)

@pytest.mark.parametrize("method", defenses.names())
def test_packaged_spaces_load_and_every_point_is_a_valid_config(method):
    space = load_space(method)
    assert space.params and space.method == method
    dists = space.distributions()
    assert set(dists) == set(space.params)
    for p in space.params.values():  # both ends of every range form valid settings
        for v in p.values_to_check():
            space.config({**{n: q.first() for n, q in space.params.items()}, p.name: v})


def test_bedkd_space_has_the_knobs_and_log_scales():
    space = load_space("bedkd")
    for knob in ("alpha", "lam", "dmm_temperature", "akd_temperature", "target_frr", "n_c", "nc_np_ratio",
                 "dmm_epochs", "akd_cycles", "dmm_lr", "akd_lr"):
        assert knob in space.params, knob
    assert space.params["akd_lr"].log and space.params["akd_temperature"].log
    cfg = space.config({n: p.first() for n, p in space.params.items()} | {"n_c": 320, "nc_np_ratio": 10.0})
    assert cfg.n_p == 32 and cfg.gamma is None and cfg.target_frr is not None  # derived n_p, FRR threshold


@pytest.mark.parametrize("params, fixed, expected", [
    ({"no_such_knob": {"type": "float", "low": 0, "high": 1}}, {}, "unknown parameter 'no_such_knob'"),
    ({"lam": {"type": "float", "low": 0.5, "high": 0.5}}, {}, "low must be < high"),
    ({"lam": {"type": "float", "low": 0.9, "high": 0.1}}, {}, "low must be < high"),
    ({"akd_lr": {"type": "float", "low": 0, "high": 1.0e-3, "log": True}}, {}, "log scale needs low > 0"),
    ({"lam": {"type": "float", "low": 0.1, "high": 1.5}}, {}, "params.lam: 1.5 is not accepted"),
    ({"lam": {"type": "float", "low": "abc", "high": 1}}, {}, "low must be a number"),
    ({"lam": {"type": "uniform", "low": 0.1, "high": 0.9}}, {}, "type must be float, int or categorical"),
    ({"lam": {"type": "float", "low": 0.1, "high": 0.9, "lo": 1}}, {}, "unknown keys"),
    ({"alpha": {"type": "categorical", "choices": []}}, {}, "non-empty list"),
    ({"akd_cycles": {"type": "int", "low": 1.5, "high": 4}}, {}, "must be an integer"),
    ({"gamma": {"type": "float", "low": 0.01, "high": 0.2},
      "target_frr": {"type": "float", "low": 0.01, "high": 0.2}}, {}, "not both"),
    ({"lam": {"type": "float", "low": 0.1, "high": 0.9}}, {"lam": 0.3}, "both searched"),
    ({"nc_np_ratio": {"type": "float", "low": 2, "high": 8}}, {"n_p": 4}, "cannot both be given"),
    ({"lam": {"type": "float", "low": 0.1, "high": 0.9}}, {"gamma": 0.1, "target_frr": 0.05}, "exactly one"),
    ({"lam": {"type": "float", "low": 0.1, "high": 0.9}}, {"typo": 1}, "unknown parameter 'typo'"),
])
def test_bad_space_files_fail_with_one_line(tmp_path, params, fixed, expected):
    path = _space(tmp_path, {"method": "bedkd", "params": params, "fixed": fixed})
    with pytest.raises(InputError) as err:
        load_space("bedkd", path)
    msg = str(err.value)
    assert expected in msg and "\n" not in msg and msg.startswith(path)


def test_bad_space_file_shapes(tmp_path):
    for text, expected in [("[1, 2]", "expected a mapping"), ("method: bedkd\n", "non-empty mapping"),
                           ("method: kd\nparams: {lam: {type: float, low: 0.1, high: 0.9}}\n", "not 'bedkd'"),
                           ("params: {lam: {type: float, low: 0.1, high: 0.9}}\nextra: 1\n", "unknown top-level"),
                           ("params: [", "not valid YAML")]:
        with pytest.raises(InputError, match=expected):
            load_space("bedkd", _space(tmp_path, text))
    with pytest.raises(InputError, match="no such search-space file"):
        load_space("bedkd", tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="no defense .no-such-method"):
        load_space("no-such-method")


def test_a_cached_stage_is_keyed_by_what_its_loss_computes_not_by_its_repr():
    """Trials share a cached stage only when it would compute the same thing. RobustKD's mask
    losses that differ only in their variance weight, or in the clean features their masks start
    from, print alike but must not share; distillation connectors differing only in m neither.
    Losses built alike describe alike, so trials that agree do share."""
    import torch

    from kdshield.defenses.robustkd.losses import Connectors, Detox, DetoxLoss, FeatureKDLoss
    from kdshield.trainables.stage_cache import describe_loss

    head = torch.nn.Linear(4, 2)

    def mask_loss(p, var_weight=1.0):
        return DetoxLoss(Detox(p, 0.2, "additive", head), [2], var_weight=var_weight)

    def distill_loss(m):
        return FeatureKDLoss(Connectors(1, 4, 4, p=torch.ones(1, 4), m=m), [2], [1], "encoder")

    p = torch.zeros(1, 4)
    base = describe_loss(mask_loss(p))
    assert describe_loss(mask_loss(p.clone())) == base
    assert repr(mask_loss(p + 1)) == repr(mask_loss(p)) and repr(mask_loss(p, 0.5)) == repr(mask_loss(p))
    assert describe_loss(mask_loss(p + 1)) != base
    assert describe_loss(mask_loss(p, var_weight=0.5)) != base
    assert describe_loss(distill_loss(0.1)) == describe_loss(distill_loss(0.1))
    assert repr(distill_loss(0.1)) == repr(distill_loss(0.2))
    assert describe_loss(distill_loss(0.1)) != describe_loss(distill_loss(0.2))


# ----------------------------------------------------------------------------- a tiny RUN

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The toy RUN (the random tiny-bert as the suspect model): the search mechanics, not the
    defense's quality, are under test."""
    from kdshield.datasets.toy import write_toy_run

    return write_toy_run(tmp_path_factory.mktemp("tune") / "run", "tiny-bert", metrics={"cacc": 50.0, "asr": 50.0})


BEDKD_SPACE = {"method": "bedkd",
               "params": {"lam": {"type": "float", "low": 0.2, "high": 0.8},
                          "akd_cycles": {"type": "int", "low": 1, "high": 2}},
               "fixed": {"alpha": 0.3, "dmm_temperature": 1.5, "dmm_epochs": 1, "dmm_lr": 1.0e-3,
                         "n_c": 8, "n_c_dmm": 4, "n_p": 4, "gamma": 0.5, "akd_lr": 1.0e-3,
                         "batch_size": 8, "max_length": 16}}


def _tune_args(run, out, space, *extra):
    # ASHA runs (its metric checks and clock are exercised) but its first rung lies beyond the
    # trials' few cycles, so no trial of this tiny search is stopped at random
    return ["tune", "--method", "bedkd", "--run", str(run), "--space", space, "--num-samples", "2",
            "--max-concurrent", "1", "--grace-period", "10", "--probe-n", "4", "--val-fraction", "0.25",
            "--seed", "3", "--out", str(out), *extra]


@pytest.fixture
def no_ray(monkeypatch):
    import kdshield.cluster

    def refuse(*args, **kwargs):
        raise AssertionError("Ray work started before the bad input was refused")

    import ray

    monkeypatch.setattr(kdshield.cluster, "connect", refuse)
    monkeypatch.setattr(ray, "init", refuse)  # whoever imported connect: starting Ray is what fails


@pytest.mark.parametrize("extra, expected", [
    (["--cpus-per-worker", "1000"], "no node has that much"),
    (["--cpus-per-trial", "1000"], "no autoscaler"),
    (["--storage", "not a url"], "not a SQLAlchemy URL"),
    (["--trial-retries", "-1"], "trial_retries=-1"),
    (["--checkpoint-interval-s", "-1"], "checkpoint_interval_s=-1"),
])
def test_tune_refuses_impossible_requests_before_ray(tiny_run, tmp_path, capsys, no_ray, extra, expected):
    space = _space(tmp_path, BEDKD_SPACE)
    code = main(_tune_args(tiny_run, tmp_path / "out", space, *extra))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("kdshield: error:") and expected in line, line
    assert not (tmp_path / "out").exists()


def test_tune_refuses_a_bad_space_file_before_ray(tiny_run, tmp_path, capsys, no_ray):
    bad = {**BEDKD_SPACE, "params": {"lam": {"type": "float", "low": -1, "high": 1, "log": True}}}
    code = main(_tune_args(tiny_run, tmp_path / "out", _space(tmp_path, bad)))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "log scale needs low > 0" in line


def test_tune_checks_model_dependent_settings_of_every_trial_before_ray(tiny_run, tmp_path, capsys, no_ray):
    """Whether a RobustKD student fits depends on the suspect model: a space one of whose choices
    is a student with another tokenizer (tiny-llama for a tiny-bert suspect) is refused before
    the search starts, not in the trial that draws it."""
    space = _space(tmp_path, {"method": "robustkd", "params": {
        "distill_epochs": {"type": "int", "low": 1, "high": 2},
        "student": {"type": "categorical", "choices": ["copy", "tiny-llama"]}}})
    args = _tune_args(tiny_run, tmp_path / "out", space)
    args[args.index("--method") + 1] = "robustkd"
    assert main(args) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("kdshield: error:") and "tokenizer" in line, line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the search

def _env():
    env = dict(os.environ, RAY_ADDRESS="local", PYTHONUNBUFFERED="1")
    return env


def _ray_sessions_of(pid: int) -> list[int]:
    """Processes of the Ray instance a (dead) driver ``pid`` had started (session dir names end in its pid)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines()
            if f"_{pid}/" in line and "/tmp/ray/session_" in line]


def _kill_strays(driver_pid: int) -> None:
    """SIGKILL what is left of the Ray instance the dead driver had started (a dying raylet may
    still spawn a worker or two, hence a few rounds)."""
    for _ in range(5):
        pids = _ray_sessions_of(driver_pid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(2)


def _results(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (out / "trials").glob("*/result.json")}


def _events(path: Path) -> list[str]:
    return [json.loads(line)["event"] for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.ray
@pytest.mark.timeout(2700)
def test_search_killed_and_resumed_shares_the_dmm_and_reports(tiny_run, tmp_path, ray_local, capsys):
    space = _space(tmp_path, BEDKD_SPACE)
    out = tmp_path / "search"
    cmd = [sys.executable, "-m", "kdshield.cli", *_tune_args(tiny_run, out, space)]
    log = open(tmp_path / "driver1.log", "w")
    driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while not _results(out) and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(1)
        assert driver.poll() is None, (tmp_path / "driver1.log").read_text()[-3000:]
        before = _results(out)
        assert len(before) == 1, "the driver must be killed mid-search"
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything in its session
        driver.wait()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        _kill_strays(driver.pid)
        log.close()
    (first_id, first), = before.items()
    first_bytes = (out / "trials" / first_id / "result.json").read_bytes()

    # --resume continues the same search: the finished trial is neither lost nor re-run
    log = open(tmp_path / "driver2.log", "w")
    resumed = subprocess.Popen(cmd + ["--resume"], stdout=log, stderr=subprocess.STDOUT, env=_env(),
                               start_new_session=True)
    try:
        assert resumed.wait(timeout=1500) == 0, (tmp_path / "driver2.log").read_text()[-3000:]
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)
        _kill_strays(resumed.pid)
        log.close()
    after = _results(out)
    assert len(after) == 2 and first_id in after
    assert (out / "trials" / first_id / "result.json").read_bytes() == first_bytes
    for trial_id in after:  # every finished trial trained exactly once
        assert _events(out / "trials" / trial_id / "runs.jsonl").count("trained") == 1, trial_id
    import optuna

    study = optuna.load_study(study_name="kdshield-bedkd", storage=f"sqlite:///{out / 'study.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2
    assert {json.dumps(r["sampled"], sort_keys=True) for r in after.values()} == \
        {json.dumps(t.params, sort_keys=True) for t in complete}

    # ASHA's clock: training_iteration increases over each trial's AKD cycles, then the final result
    for progress in (out / "tune").glob("run_trial_*/result.json"):
        reports = [json.loads(line) for line in progress.read_text().splitlines()]
        its = [r["training_iteration"] for r in reports]
        assert its == sorted(set(its)) and reports[-1]["final"] == 1
        assert all("defender_score" in r for r in reports)

    # shared work: the probe trained the DMM once; both trials reused it (and its logits)
    events = [json.loads(line) for line in (out / "cache" / "events.jsonl").read_text().splitlines()]
    dmm = [e for e in events if e["kind"] == "stage" and e.get("stage") == "dmm"]
    assert [e["hit"] for e in dmm].count(False) == 1 and [e["hit"] for e in dmm].count(True) == 2
    assert sum(e["hit"] for e in events if e["kind"] == "logits") >= 4
    for trial_id in after:
        metrics = json.loads((out / "trials" / trial_id / "defend" / "metrics.json").read_text())
        assert metrics["cache"]["stage"]["hits"] == 1 and metrics["stage_seconds"]["dmm"] == 0.0
        assert not (out / "trials" / trial_id / "defend" / "ray").exists()

    # report: tables, plots, and a best configuration that `defend --config` re-runs to the same result
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    report = out / "report"
    for name in ("trials.md", "trials.csv", "pareto.png", "importance.png", "report.json", "best.yaml"):
        assert (report / name).is_file(), name
    assert (report / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    table = (report / "trials.md").read_text()
    assert all(trial_id in table for trial_id in after)
    best = yaml.safe_load((report / "best.yaml").read_text())
    top = max(r["report"]["defender_score"] for r in after.values())  # ties: the random tiny model often scores 50
    best_id = next(t for t in after if after[t]["params"] == best["params"])
    assert after[best_id]["report"]["defender_score"] == top
    assert main(["defend", "--config", str(report / "best.yaml"), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["cacc"] == pytest.approx(after[best_id]["report"]["cacc"])
    assert again["asr"] == pytest.approx(after[best_id]["report"]["asr"])
    # and trains the same: every epoch's losses as in the trial (whose DMM came from the probe's
    # cache and whose teachers' outputs were read back from the cache, computed in other processes)
    ran = json.loads((out / "trials" / best_id / "defend" / "metrics.json").read_text())["history"]
    assert set(ran) == set(again["history"]) == {"dmm", "akd"}
    for stage, epochs in ran.items():
        assert len(epochs) == len(again["history"][stage])
        for a, b in zip(epochs, again["history"][stage]):
            terms = sorted(k for k in b if k.split("/")[-1] in ("loss", "ce", "kl", "mse"))
            assert terms and {k: b[k] for k in terms} == pytest.approx({k: a[k] for k in terms}, rel=1e-4, abs=1e-6)


ROBUSTKD_SPACE = {"method": "robustkd",
                  "params": {"feature_weight": {"type": "float", "low": 0.5, "high": 2.0},
                             "distill_lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-3, "log": True}},
                  "fixed": {"m": 0.2, "mask_epochs": 2, "distill_epochs": 2, "batch_size": 8, "max_length": 16}}


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_robustkd_search_shares_its_mask_stage_and_reports_every_distillation_epoch(tiny_run, tmp_path, ray_local,
                                                                                       capsys):
    """Every defense is searchable through the same hooks, not only BeDKD. Both trials of this
    RobustKD search agree on the mask settings, so the mask stage trains once and the other
    trial reads it from the stage cache; Tune hears of every epoch of the distillation (the
    stage training the defended student); the best configuration re-runs through
    ``defend --config`` to the trial's result, epoch by epoch."""
    out = tmp_path / "search"
    args = _tune_args(tiny_run, out, _space(tmp_path, ROBUSTKD_SPACE))
    args[args.index("--method") + 1] = "robustkd"
    # the probe (a BeDKD DMM on the suspect model, for the trigger-free score) gets a tiny budget too
    for setting in ("dmm_epochs=1", "n_c_dmm=4", "batch_size=8", "max_length=16"):
        args += ["--probe-set", setting]
    assert main(args) == 0
    results = _results(out)
    assert len(results) == 2
    events = [json.loads(line) for line in (out / "cache" / "events.jsonl").read_text().splitlines()]
    hits = {name: [e["hit"] for e in events if e["kind"] == "stage" and e.get("stage") == name]
            for name in ("mask", "distill")}
    assert sorted(hits["mask"]) == [False, True]
    assert hits["distill"] == [False, False]  # the trials differ in their distillation settings
    for progress in (out / "tune").glob("run_trial_*/result.json"):
        reports = [json.loads(line) for line in progress.read_text().splitlines()]
        assert [r["final"] for r in reports] == [0, 0, 1]  # two distillation epochs, then the result
        assert [r["training_iteration"] for r in reports] == [1, 2, 3]

    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    best = yaml.safe_load((out / "report" / "best.yaml").read_text())
    best_id = next(t for t in results if results[t]["params"] == best["params"])
    assert main(["defend", "--config", str(out / "report" / "best.yaml"), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["cacc"] == pytest.approx(results[best_id]["report"]["cacc"])
    ran = json.loads((out / "trials" / best_id / "defend" / "metrics.json").read_text())["history"]
    assert set(ran) == set(again["history"]) == {"mask", "distill"}
    for stage, epochs in ran.items():
        assert [e["clean/loss"] for e in again["history"][stage]] == \
            pytest.approx([e["clean/loss"] for e in epochs], rel=1e-4)


# ----------------------------------------------------------------------------- a trial killed

RETRY_SPACE = {"method": "ft", "params": {"lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True}},
               "fixed": {"n_c": 8, "epochs": 8, "batch_size": 8, "max_length": 16}}


def _checkpointed_epoch(trial_dir: Path) -> int:
    """The epoch of the latest checkpoint of the trial's stage run (0: none yet): registered by Ray
    Train, or named in ``kdshield_latest.json`` by a stage that trains in the trial's process."""
    from kdshield.trainables.engine import LATEST_FILE
    from kdshield.trainables.stage_runs import SNAPSHOT

    for snapshot in (trial_dir / "ray").glob(f"*/{SNAPSHOT}"):
        try:
            return int(json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["epoch"])
        except (OSError, ValueError, KeyError, TypeError):  # being written
            return 0
    for latest in (trial_dir / "ray").glob(f"*/{LATEST_FILE}"):
        try:
            return int(json.loads(latest.read_text())["checkpoint"].rsplit("_", 1)[1])
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return 0
    return 0


def _trial_process(trial_dir: Path) -> int | None:
    """The pid of the Tune actor running the trial (its runs.jsonl), if it is a live Ray worker."""
    try:
        pid = json.loads((trial_dir / "runs.jsonl").read_text().splitlines()[-1])["pid"]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError, KeyError):
        return None
    return pid if cmdline.startswith(b"ray::") else None


def test_stage_runs_reuse_a_finished_run_and_restart_an_unreadable_one(tmp_path):
    """What a retried trial finds of its stage runs, without Ray: a finished run is returned as it
    was (the engine cannot resume from a final export); a torn snapshot means starting over."""
    from kdshield.config import TrainSettings
    from kdshield.defenses.losses import CrossEntropy
    from kdshield.trainables.engine import STATE_FILE, write_manifest
    from kdshield.defenses.stage import ModelSpec, Phase, Stage
    from kdshield.trainables.stage_runs import SNAPSHOT, StageRuns, finished_result, read_attempts

    stage = Stage(name="s", model=ModelSpec("unused", 2), phases=(Phase("train", CrossEntropy()),),
                  train=TrainSettings(epochs=2))
    runs = StageRuns(tmp_path / "ray", log=tmp_path / "attempts.jsonl")
    run_dir = tmp_path / "ray" / "s-1"  # no cache: the first run of stage "s" in this job
    final, mid = run_dir / "checkpoint_b", run_dir / "checkpoint_a"
    (final / "hf_model").mkdir(parents=True)
    (final / "hf_model" / "config.json").write_text("{}")
    history = [{"epoch": 1, "epoch_seconds": 1.0}, {"epoch": 2, "epoch_seconds": 2.0}]
    (final / STATE_FILE).write_text(json.dumps({"epoch": 2, "history": history}))
    write_manifest(final, rank=0)  # what the engine writes with every checkpoint
    (mid / "ds").mkdir(parents=True)
    (mid / STATE_FILE).write_text(json.dumps({"epoch": 1, "history": history[:1]}))
    (run_dir / SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": final.name}}))
    from kdshield.config import ScalingSettings

    ray_train = ScalingSettings(in_process=False)  # runs with Ray Train's snapshots
    result = runs.run(stage, {}, ray_train)  # training it would fail here: no streams, no Ray
    assert result.model_dir == final / "hf_model" and result.history == history and result.seconds == 3.0
    assert [(a["run"], a["event"], a["checkpoint"]) for a in read_attempts(tmp_path / "attempts.jsonl")] == \
        [("s-1", "finished", final.name)]
    assert finished_result(mid, stage) is None  # a mid-run checkpoint: resume, do not reuse
    (run_dir / SNAPSHOT).write_text('{"latest_checkpoint_res')  # the process died while Ray wrote it
    assert runs._latest_checkpoint(run_dir) is None and not run_dir.exists()


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_killed_trial_is_retried_from_its_checkpoint_and_nothing_else_restarts(tiny_run, tmp_path, ray_local, capsys):
    """SIGKILL the process of one of two concurrent trials once its stage has a checkpoint: Tune
    retries that trial only, its stage resumes from the checkpoint, and no result is lost or doubled."""
    import ray.tune
    from kdshield.trainables.stage_runs import read_attempts

    out = tmp_path / "retry"
    args = ["tune", "--method", "ft", "--run", str(tiny_run), "--space", _space(tmp_path, RETRY_SPACE),
            "--num-samples", "2", "--max-concurrent", "2", "--scheduler", "none", "--trial-retries", "1",
            "--checkpoint-interval-s", "0", "--probe-n", "4", "--probe-set", "dmm_epochs=1", "--probe-set",
            "n_c_dmm=4", "--val-fraction", "0.25", "--seed", "5", "--out", str(out)]
    killed: dict = {}
    done = threading.Event()

    def killer():
        while not done.is_set() and not killed:
            for trial_dir in sorted((out / "trials").glob("*")):
                pid = _trial_process(trial_dir)
                if pid and 1 <= _checkpointed_epoch(trial_dir) <= 5:  # a checkpoint, and epochs left to run
                    os.kill(pid, signal.SIGKILL)
                    killed.update(trial=trial_dir.name, pid=pid)
                    break
            time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        assert main(args) == 0
    finally:
        done.set()
        thread.join(timeout=5)
    assert killed, "no trial was killed"
    results = _results(out)
    assert len(results) == 2 and killed["trial"] in results  # both trials finished, the killed one too
    assert json.loads((out / "summary.json").read_text())["finished_trials"] == 2
    import optuna

    study = optuna.load_study(study_name="kdshield-ft", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2

    victim = out / "trials" / killed["trial"]
    (other,) = [out / "trials" / t for t in results if t != killed["trial"]]
    # Tune retried the killed trial (in a new process) and nothing else
    failures = {t.trial_id: t.run_metadata.num_failures for t in ray.tune.ExperimentAnalysis(str(out / "tune")).trials}
    assert failures == {victim.name: 1, other.name: 0}
    assert _events(victim / "runs.jsonl") == ["trained", "retried"]
    assert _events(other / "runs.jsonl") == ["trained"]
    pids = [json.loads(line)["pid"] for line in (victim / "runs.jsonl").read_text().splitlines()]
    assert pids[0] == killed["pid"] != pids[1]

    # the retry re-attached to the same Ray Train run and resumed it from a checkpoint
    first, second = read_attempts(victim / "stage_runs.jsonl")
    assert first["run"] == second["run"] and first["checkpoint"] is None and second["checkpoint"]
    assert [a["checkpoint"] for a in read_attempts(other / "stage_runs.jsonl")] == [None]
    history = json.loads((victim / "defend" / "metrics.json").read_text())["history"]["ft"]
    assert [h["epoch"] for h in history] == list(range(1, 9))
    resumed_at = history[-1]["start_epoch"]
    assert resumed_at >= 1  # the engine's last attempt started from a checkpoint, not epoch 0
    assert [h["start_epoch"] for h in history] == [0] * resumed_at + [resumed_at] * (8 - resumed_at)
    assert {h["start_epoch"] for h in json.loads((other / "defend" / "metrics.json").read_text())
            ["history"]["ft"]} == {0}

    # what Tune recorded: no epoch twice, training_iteration never restarts, the final result last;
    # everything the retry sent arrived with the iteration the trial's ledger gave it (an epoch
    # report in flight when the process died may be missing, never doubled)
    retried_at = json.loads((victim / "runs.jsonl").read_text().splitlines()[-1])["time"]
    for trial_dir in (victim, other):
        progress = next((out / "tune").glob(f"*{trial_dir.name}*/result.json"))
        reports = [json.loads(line) for line in progress.read_text().splitlines()]
        its = [r["training_iteration"] for r in reports]
        assert its == sorted(set(its)), its
        epochs = [r["epoch"] for r in reports if not r["final"]]
        assert epochs == sorted(set(epochs)) and set(epochs) <= set(range(1, 9))
        assert reports[-1]["final"] == 1 and reports[-1]["defender_score"] == results[trial_dir.name]["report"][
            "defender_score"]
        ledger = [json.loads(line) for line in (trial_dir / "reports.jsonl").read_text().splitlines()]
        sent = {row["iteration"] for row in ledger if trial_dir == other or row["time"] > retried_at}
        assert sent <= set(its) and its[-1] == ledger[-1]["iteration"] and ledger[-1]["key"] == "final"
        assert not (trial_dir / "ray").exists() and not list(trial_dir.glob(".defend.partial-*"))
    assert len(reports) == 9  # the other trial: every epoch and the final result, once each


# ----------------------------------------------------------------------------- PostgreSQL

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / name).is_file():
            return str(root / name)
    return None


@pytest.fixture
def postgres(tmp_path):
    """A throwaway PostgreSQL cluster on a localhost port (as user postgres when run as root)."""
    pytest.importorskip("psycopg2")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries not installed (.ci/run installs Debian's postgresql)")
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="kdshield-pg-"))  # under /tmp: reachable by the postgres user
    data, port = home / "pgdata", _free_port()
    prefix: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a postgres user")
        home.chmod(0o777)
        prefix = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "kdshield"], check=True,
                   capture_output=True)
    subprocess.run([*prefix, pg_ctl, "-D", str(data), "-l", str(home / "pg.log"), "-w", "-o",
                    f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"], check=True,
                   capture_output=True)
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="kdshield", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE studies")
        conn.close()
        yield f"postgresql+psycopg2://kdshield@127.0.0.1:{port}/studies"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


FT_SPACE = {"method": "ft", "params": {"lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True}},
            "fixed": {"n_c": 8, "epochs": 1, "batch_size": 8, "max_length": 16}}


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_study_lives_in_postgresql_and_a_search_resumes_from_it(tiny_run, tmp_path, postgres, capsys):
    import optuna

    space = _space(tmp_path, FT_SPACE)
    out = tmp_path / "pg-search"
    args = ["tune", "--method", "ft", "--run", str(tiny_run), "--space", space, "--max-concurrent", "1",
            "--probe-n", "4", "--probe-set", "dmm_epochs=1", "--probe-set", "n_c_dmm=4", "--probe-set", "n_c=8",
            "--probe-set", "batch_size=8", "--probe-set", "max_length=16", "--val-fraction", "0.25",
            "--storage", postgres, "--study-name", "pg-study", "--out", str(out)]

    def run(*extra):
        proc = subprocess.run([sys.executable, "-m", "kdshield.cli", *args, *extra], env=_env(),
                              capture_output=True, text=True, timeout=800, start_new_session=True)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run("--num-samples", "1")
    assert not (out / "study.db").exists()  # nothing stored in the default SQLite file
    first = optuna.load_study(study_name="pg-study", storage=postgres).trials
    assert [t.state for t in first] == [optuna.trial.TrialState.COMPLETE]
    # Tune's own state lost (another machine, a wiped disk): the study in PostgreSQL carries the search on
    shutil.rmtree(out / "tune")
    run("--num-samples", "2", "--resume")
    trials = optuna.load_study(study_name="pg-study", storage=postgres).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert trials[0].number == first[0].number and trials[0].params == first[0].params
    assert trials[0].values == first[0].values
    assert trials[1].params != trials[0].params  # the resumed sampler does not replay the first point
    assert len(list((out / "trials").glob("*/result.json"))) == 2


@pytest.mark.parametrize("durable", [True, False])
def test_a_resumed_searcher_ignores_reports_of_trials_the_study_finished(tmp_path, durable):
    """The driver died after Optuna finished a trial but before Tune saved that: the restored
    searcher gets the re-launched trial's report again. Stock OptunaSearch raises; ours drops it."""
    import optuna
    from optuna.distributions import FloatDistribution
    from ray.tune.search.optuna import OptunaSearch

    from kdshield.trainables.durable_search import DurableOptunaSearch

    cls = DurableOptunaSearch if durable else OptunaSearch
    searcher = cls(space={"x": FloatDistribution(0, 1)}, metric="m", mode="max", study_name="s",
                   storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}"))
    searcher.suggest("t0")
    searcher.on_trial_complete("t0", {"m": 1.0})
    searcher._completed_trials.clear()  # what a searcher restored from Tune's older state knows
    if not durable:
        with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
            searcher.on_trial_result("t0", {"m": 2.0, "training_iteration": 3})
        return
    searcher.on_trial_result("t0", {"m": 2.0, "training_iteration": 3})
    searcher.on_trial_complete("t0", {"m": 2.0})
    (trial,) = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert trial.value == 1.0 and trial.state == optuna.trial.TrialState.COMPLETE


# ----------------------------------------------------------------------------- secrets (no Ray)

def test_a_storage_password_reaches_no_file_and_no_error_line(tiny_run, tmp_path, capsys, no_ray):
    space = _space(tmp_path, BEDKD_SPACE)
    for url, expected in (("postgresql+psycopg2://kdshield:s3cret@127.0.0.1:1/studies", "cannot reach the database"),
                          ("postgresql+pg8000://kdshield:s3cret@127.0.0.1/studies", "driver 'pg8000' is not installed")):
        code = main(_tune_args(tiny_run, tmp_path / "out", space, "--storage", url))
        err = capsys.readouterr().err.strip()
        errors = [line for line in err.splitlines() if line.startswith("kdshield: error:")]
        assert code == 2 and len(errors) == 1 and expected in errors[0], err
        assert "s3cret" not in err and "kdshield:***@" in err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg", None])
def test_both_postgresql_drivers_reach_the_database_and_hold_a_study(postgres, driver):
    """psycopg2 and psycopg (v3, what a bare postgresql:// means with SQLAlchemy 2.1) both pass the
    storage check against a live server and carry an Optuna study."""
    import optuna
    from sqlalchemy.engine import make_url

    from kdshield.trainables.tune import _check_storage

    pytest.importorskip(driver or "psycopg")
    url = postgres.replace("postgresql+psycopg2://", f"postgresql+{driver}://" if driver else "postgresql://")
    assert make_url(url).get_dialect().driver == (driver or "psycopg")
    _check_storage(url)
    study = optuna.create_study(study_name=f"s-{driver}", storage=url)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(optuna.load_study(study_name=f"s-{driver}", storage=url).trials) == 2


def test_the_search_record_holds_the_storage_url_without_its_password(monkeypatch):
    from kdshield.trainables.tune import STORAGE_ENV, TuneJob

    job = TuneJob(method="bedkd", run="r", out="o", storage="postgresql+psycopg2://u:s3cret@db:5432/s")
    assert "s3cret" not in json.dumps(job.record()) and job.record()["storage"] == "postgresql+psycopg2://u:***@db:5432/s"
    monkeypatch.setenv(STORAGE_ENV, "postgresql+psycopg2://u:s3cret@db/s")  # the password arrives by environment
    bare = TuneJob(method="bedkd", run="r", out="o")
    assert bare.storage_url().endswith("@db/s") and "s3cret" not in json.dumps(bare.record())


# ----------------------------------------------------------------------------- the canary

def test_canary_scores_and_scheduler_metric_follow_the_objective():
    from kdshield.trainables.canary import canary_target
    from kdshield.trainables.objective import from_eval_metrics
    from kdshield.trainables.tune import TuneJob

    est = from_eval_metrics({"eval/val/acc": 0.8, "eval/flagged/acc": 0.5, "eval/canary/acc": 0.25})
    assert est["canary_score"] == pytest.approx(55.0) and est["canary_asr"] == pytest.approx(25.0)
    assert est["defender_score"] == pytest.approx(30.0)
    assert "canary_score" not in from_eval_metrics({"eval/val/acc": 0.8})
    assert [canary_target(1), canary_target(0), canary_target(3)] == [0, 1, 0]
    job = {"method": "bedkd", "run": "r", "out": "o"}
    assert TuneJob(**job, objective="canary").scheduler_metric() == "canary_score"
    assert TuneJob(**job).scheduler_metric() == "defender_score"
    assert TuneJob(**job, objective="asr+cacc").scheduler_metric() == "defender_score"
    assert TuneJob(**job, objective="canary", asha_metric="asr").scheduler_metric() == "asr"
    assert TuneJob(**job).canary(64, 16) is None
    assert TuneJob(**job, objective="canary", canary_rate=0.3).canary(64, 16)["rate"] == 0.3


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_planted_canary_is_learned_and_the_defense_gets_its_rows(tmp_path, ray_local):
    """The canary is a real backdoor: after planting, the trigger turns the canaried model's
    answers to the canary's target (not the suspected target) on held-out rows it classifies
    correctly without the trigger; the training set handed to the defense is the suspect's
    plus the canary rows, numbered apart."""
    import numpy as np

    from kdshield.config import ScalingSettings
    from kdshield.datasets import read_table
    from kdshield.datasets.toy import write_toy_run
    from kdshield.trainables.canary import CANARY_TRIGGERS, plant_canary
    from kdshield.trainables.inference import LocalScorer, predict_logits
    from kdshield.trainables.attack import tokenized_stream

    run = write_toy_run(tmp_path / "run")
    train, clean = read_table(run / "data/train.parquet"), read_table(run / "data/dev.parquet")
    val = read_table(run / "data/test.parquet")
    info, evaluation = plant_canary(str(run / "model"), train=train, clean=clean, val=val, num_labels=2,
                                    suspected_target=1, out=tmp_path / "canary", rate=0.4, epochs=30, lr=3e-3,
                                    batch_size=8, max_length=16, scaling=ScalingSettings(), seed=0)
    assert info["canary_target"] == 0 and info["canary_rows"] == 16
    assert evaluation.num_rows == 8 and set(evaluation.column("label").to_pylist()) == {0}
    assert all(any(w in t.split() for w in CANARY_TRIGGERS) for t in evaluation.column("text").to_pylist())
    handed = read_table(tmp_path / "canary" / "train.parquet")
    assert handed.num_rows == train.num_rows + 16
    assert len(set(handed.column("source_index").to_pylist())) == handed.num_rows
    added = handed.slice(train.num_rows)
    assert added.column("poisoned").to_pylist() == [True] * 16 and set(added.column("label").to_pylist()) == {0}

    def predictions(model, table):
        logits = predict_logits(tokenized_stream(table, str(run / "model"), 16), str(model), 2,
                                pad_ids={"input_ids": 0}, padding_side="right", scorer=LocalScorer(2, threads=1))
        return logits.argmax(-1)

    plain = val.filter(np.asarray(val.column("label").to_pylist()) != 0)  # the same rows without the trigger

    def trigger_effect(model):  # the share of rows the trigger moves to the canary's target
        return (predictions(model, evaluation) == 0).mean() - (predictions(model, plain) == 0).mean()

    canaried = tmp_path / "canary" / "model"
    assert (predictions(canaried, plain) == 1).mean() >= 0.75  # the clean task is kept
    assert trigger_effect(canaried) >= 0.5
    assert trigger_effect(run / "model") < 0.25  # the suspect had no canary


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_the_probe_records_how_well_the_canary_took(tmp_path, ray_local):
    """``--objective canary``: the probe plants the canary once and measures it on the canaried
    suspect before any defense (its ASR on the held-out rows), so a canary that did not take
    shows in probe.json instead of silently flattening every trial's score."""
    from kdshield.datasets.toy import write_toy_run
    from kdshield.trainables.defend import DefendJob
    from kdshield.trainables.objective import build_probe
    from kdshield.trainables.stage_cache import StageCache

    run = write_toy_run(tmp_path / "run")
    job = DefendJob(method="bedkd", run=str(run), out=str(tmp_path / "unused"),
                    params={"n_c_dmm": 4, "n_c": 8, "dmm_epochs": 1, "batch_size": 8, "max_length": 16})
    info = build_probe(job, tmp_path / "shared", cache=StageCache(tmp_path / "cache"), val_fraction=0.25,
                       probe_n=4, seed=0, canary={"rate": 0.4, "epochs": 30, "lr": 3e-3, "batch_size": 8,
                                                  "max_length": 16})
    assert (tmp_path / "shared" / "canary.parquet").is_file()
    assert info["canary_asr_planted"] >= 50 and 0 <= info["canary_val_acc_planted"] <= 100
    assert json.loads((tmp_path / "shared" / "probe.json").read_text())["canary_asr_planted"] == info["canary_asr_planted"]
