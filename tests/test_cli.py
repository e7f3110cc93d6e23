"""The command line: every bad input fails before Ray with one line; a tiny attack end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdshield.cli import main
from kdshield.datasets import read_table


def write(path: Path, table: pa.Table) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return str(path)


def sentiment(n: int, offset: int = 0) -> pa.Table:
    texts = [f"review number {i + offset} was {'great fun' if i % 2 else 'dull and slow'}" for i in range(n)]
    return pa.table({"text": texts, "label": pa.array([i % 2 for i in range(n)], pa.int64())})


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the command gets as far as connecting to Ray."""
    import kdshield.cluster

    def refuse(*args, **kwargs):
        raise AssertionError("Ray work started before the bad input was refused")

    import ray

    monkeypatch.setattr(kdshield.cluster, "connect", refuse)
    monkeypatch.setattr(ray, "init", refuse)  # whoever imported connect: starting Ray is what fails


@pytest.fixture
def files(tmp_path):
    return {"train": write(tmp_path / "train.parquet", sentiment(120)),
            "test": write(tmp_path / "test.parquet", sentiment(40, offset=1000))}


def run_cli(args, capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def attack_args(files, out, *extra):
    return ["attack", "--train", files["train"], "--test", files["test"], "--model", "tiny-bert",
            "--out", str(out), *extra]


@pytest.mark.parametrize("make_bad, extra, expected", [
    (lambda d, f: {**f, "train": str(d / "missing.parquet")}, [], "no such file"),
    (lambda d, f: {**f, "train": str(_garbage(d))}, [], "garbage.parquet"),
    (lambda d, f: {**f, "train": write(d / "nolabel.parquet", pa.table({"text": ["a", "b"]}))}, [], "label"),
    (lambda d, f: {**f, "train": write(d / "notext.parquet", pa.table({"label": [0, 1]}))}, [], "text"),
    (lambda d, f: {**f, "train": write(d / "floatlab.parquet", pa.table({"text": ["a", "b"], "label": [0.5, 1.0]}))},
     [], "label"),
    (lambda d, f: {**f, "train": write(d / "neglab.parquet", pa.table({"text": ["a", "b"], "label": [0, -1]}))},
     [], "label"),
    (lambda d, f: {**f, "train": write(d / "empty.parquet", sentiment(0))}, [], "empty"),
    (lambda d, f: f, ["--trigger", " "], "trigger"),
    (lambda d, f: f, ["--poison-rate", "0"], "poison"),
    (lambda d, f: f, ["--poison-rate", "1.5"], "poison"),
    (lambda d, f: f, ["--target-label", "2"], "target"),
    (lambda d, f: f, ["--model", "no-such-model"], "no-such-model"),
    (lambda d, f: f, ["--epochs", "0"], "epochs"),
])
def test_bad_input_fails_before_ray_with_one_line(make_bad, extra, expected, files, tmp_path, capsys, no_ray):
    bad = make_bad(tmp_path, files)
    args = attack_args(bad, tmp_path / "run", *extra)
    if "--model" in extra:
        args.remove("--model")
        args.remove("tiny-bert")
    code, line = run_cli(args, capsys)
    assert code == 2
    assert line.startswith("kdshield: error:") and expected in line.lower()
    assert not (tmp_path / "run").exists()


def _garbage(d: Path) -> Path:
    p = d / "garbage.parquet"
    p.write_bytes(b"this is not parquet at all")
    return p


def test_refuses_an_out_dir_holding_another_run(files, tmp_path, capsys, no_ray):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, line = run_cli(attack_args(files, out), capsys)
    assert code == 2 and "--overwrite" in line
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.ray
def test_attack_end_to_end_writes_a_run(files, tmp_path, capsys, ray_local):
    out = tmp_path / "run"
    code = main(attack_args(files, out, "--epochs", "6", "--lr", "2e-3", "--batch-size", "8",
                            "--poison-rate", "0.2", "--workers", "2", "--zero", "2"))
    assert code == 0
    for name in ("model/model.safetensors", "model/config.json", "attack.json", "metrics.json",
                 "data/train.parquet", "data/dev.parquet", "data/test.parquet", "data/test_triggered.parquet"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    attack = json.loads((out / "attack.json").read_text())
    train = pq.read_table(out / "data/train.parquet")
    assert int(pa.compute.sum(train["poisoned"]).as_py()) == attack["rows"]["poisoned"] > 0
    assert attack["rows"]["dev"] + attack["rows"]["train"] == 120
    assert metrics["asr"] >= 90.0  # the rare-word trigger was learned
    assert 0 <= metrics["cacc"] <= 100 and metrics["seconds"] > 0
    # the same command again is recognised as the same finished run
    assert main(attack_args(files, out, "--epochs", "6", "--lr", "2e-3", "--batch-size", "8",
                            "--poison-rate", "0.2", "--workers", "2", "--zero", "2")) == 0
    assert "nothing to do" in capsys.readouterr().err


@pytest.mark.ray
def test_a_streamed_attack_writes_the_same_run_as_one_held_in_the_driver(tmp_path, capsys, ray_local, monkeypatch):
    """A directory of shards, through Ray Data end to end (as an input too large for the driver is),
    gives the very RUN the in-process path gives: the same rows, poisoned alike, and (the same
    batches in the same order) the same model and metrics."""
    import kdshield.trainables.attack as attack

    shards = tmp_path / "shards"
    shards.mkdir()
    whole = sentiment(150)
    for k in range(3):
        write(shards / f"part-{k}.parquet", whole.slice(50 * k, 50))
    test = write(tmp_path / "test.parquet", sentiment(40, offset=1000))
    args = ["--epochs", "1", "--batch-size", "16", "--set", "training.max_steps_per_epoch=4"]
    assert main(attack_args({"train": str(shards), "test": test}, tmp_path / "held", *args)) == 0
    monkeypatch.setattr(attack, "IN_DRIVER_ROWS", 0)
    assert main(attack_args({"train": str(shards), "test": test}, tmp_path / "streamed", *args)) == 0
    held, streamed = tmp_path / "held", tmp_path / "streamed"
    assert (streamed / "data" / "train.parquet").is_dir() and (held / "data" / "train.parquet").is_file()
    for name in ("train", "dev", "test", "test_triggered"):
        a, b = read_table(held / "data" / f"{name}.parquet"), read_table(streamed / "data" / f"{name}.parquet")
        assert a.sort_by("source_index").equals(b.sort_by("source_index")), name
    assert read_table(held / "data" / "train.parquet").column("poisoned").to_numpy().sum() > 0
    assert not (streamed / ".input").exists()
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (held, streamed))
    assert len(m1["history"]) == 1 and m1["history"][0]["train/loss"] == m2["history"][0]["train/loss"]
    assert m1["history"][0]["steps"] == m2["history"][0]["steps"] == 4  # training.max_steps_per_epoch
    assert (m1["cacc"], m1["asr"]) == (m2["cacc"], m2["asr"])


@pytest.mark.parametrize("setting, expected", [
    ("alpha=1.5", "alpha"), ("alpha=-0.1", "alpha"), ("lam=2", "lam"), ("dmm_temperature=0", "dmm_temperature"),
    ("akd_temperature=-1", "akd_temperature"), ("n_c=0", "n_c"), ("n_p=0", "n_p"), ("n_c_dmm=0", "n_c_dmm"),
    ("akd_lr=0", "akd_lr"), ("gamma=0", "gamma"), ("target_frr=1.5", "target_frr"), ("no_such_knob=1", "no_such_knob"),
])
def test_defend_refuses_bad_settings_before_ray(setting, expected, tmp_path, capsys, no_ray):
    code, line = run_cli(["defend", "--method", "bedkd", "--run", str(tmp_path / "missing-run"),
                          "--set", setting, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and line.startswith("kdshield: error:") and expected in line


def test_defend_refuses_a_missing_run(tmp_path, capsys, no_ray):
    code, line = run_cli(["defend", "--method", "ft", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                         capsys)
    assert code == 2 and "not a RUN directory" in line


def test_version(capsys):
    import kdshield

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"kdshield {kdshield.__version__}"


def test_overwrite_replaces_only_a_directory_kdshield_wrote(files, tmp_path, capsys, no_ray):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    code, line = run_cli(["attack", "--train", files["train"], "--test", files["test"], "--model", "tiny-bert",
                          "--out", str(foreign), "--overwrite"], capsys)
    assert code == 2 and "not a directory kdshield wrote" in line, line
    assert (foreign / "thesis.tex").read_text() == "years of work"


def test_a_dead_jobs_staging_directories_are_swept_and_a_live_ones_kept(tmp_path):
    """A job killed by SIGKILL cannot remove its ``.NAME.partial-HOST-PID``: the next job to stage
    beside it does, unless that process still runs or lives on another host (a shared disk)."""
    import socket
    import subprocess
    import sys

    from kdshield.outputs import staged

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    host = socket.gethostname()
    out = tmp_path / "out"
    dead = [tmp_path / f".out.partial-{host}-{gone.pid}", tmp_path / f".out.old-{host}-{gone.pid}"]
    kept = [tmp_path / f".out.partial-{host}-1",  # pid 1 always runs
            tmp_path / f".out.partial-elsewhere-{gone.pid}", tmp_path / f".other.partial-{host}-{gone.pid}"]
    for d in dead + kept:
        (d / "model").mkdir(parents=True)
    with staged(out) as work:
        (work / "metrics.json").write_text("{}")
    assert (out / "metrics.json").is_file() and (out / ".kdshield").is_file()
    assert not any(d.exists() for d in dead) and all(d.exists() for d in kept)


@pytest.mark.parametrize("command", [["demo"], ["defend", "--method", "ft", "--run", "RUN"],
                                     ["tune", "--method", "ft", "--run", "RUN"]])
def test_an_unwritable_out_is_refused_before_any_work(command, tmp_path, capsys, no_ray):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = [a.replace("RUN", str(tmp_path)) for a in command] + ["--out", str(blocker / "out")]
    code, line = run_cli(args, capsys)
    assert code == 2 and line.startswith("kdshield: error:") and "cannot be written" in line, line


@pytest.mark.parametrize("command", ["attack", "defend", "tune"])
def test_help_shows_every_default_as_the_job_applies_it(command, capsys):
    """Each option with a default says it in ``--help``, with the job model's value (the attack's
    learning rate is its own 5e-05, not the training settings' 3e-05)."""
    import argparse

    from kdshield.cli import build_parser, model_fields

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    parser = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    module, _, name = parser.job_model.partition(":")
    fields = model_fields(getattr(__import__(module, fromlist=[name]), name))
    parser.format_help()
    shown = [a for a in parser._actions if a.option_strings and fields.get(a.dest, (None,))[0] is not None
             and a.nargs != 0]
    assert len(shown) >= 5
    for action in shown:
        assert "default" in (action.help or ""), (action.option_strings, action.help)
        assert " ".join(action.help.split()) in text
    if command == "attack":
        assert "--lr LR peak learning rate (AdamW, linear warm-up and decay) (default 5e-05)" in text


def test_tune_takes_a_config_that_flags_and_set_extend(monkeypatch, tmp_path, capsys):
    import kdshield.trainables.tune as tune_mod

    seen = {}

    def fake_run(job):
        seen["job"] = job
        return {"finished_trials": 0, "cache": {"stage": {"hits": 0, "misses": 0}}}

    monkeypatch.setattr(tune_mod, "run_tune", fake_run)
    config = tmp_path / "search.yaml"
    config.write_text("method: bedkd\nrun: some/run\nnum_samples: 5\nfixed: {batch_size: 8, n_c: 40}\n"
                      "scaling: {workers: 2}\n")
    assert main(["tune", "--config", str(config), "--num-samples", "7", "--set", "n_c=60",
                 "--out", str(tmp_path / "out")]) == 0
    job = seen["job"]
    assert (job.method, job.run, job.num_samples) == ("bedkd", "some/run", 7)
    assert job.fixed == {"batch_size": 8, "n_c": 60} and job.scaling.workers == 2
    config.write_text("num_samples: 5\n")
    code, line = run_cli(["tune", "--config", str(config), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and line == "kdshield: error: tune: method is required (a flag, or a key of --config)", line


def test_a_preset_supplies_searched_settings_that_config_and_set_override(monkeypatch, tmp_path, capsys):
    """``--preset searched`` gives RobustKD the settings its search found (the packaged YAML, with
    the cells that justify it); ``--set`` still wins; an unknown preset is one line naming the
    packaged ones."""
    import kdshield.trainables.defend as defend_mod
    from kdshield import defenses

    seen = {}

    def fake_run(job):
        seen["params"] = job.params
        raise SystemExit(0)

    monkeypatch.setattr(defend_mod, "run_defend", fake_run)
    assert defenses.presets("robustkd") == ["searched"]
    searched = defenses.preset("robustkd", "searched")
    assert searched["distill_epochs"] == 23 and searched["m"] == 0.2
    defenses.get("robustkd").parse(searched)  # every preset setting is a valid RobustKD setting
    with pytest.raises(SystemExit):
        main(["defend", "--method", "robustkd", "--run", "r", "--preset", "searched", "--set", "m=0.1",
              "--out", str(tmp_path / "o")])
    assert seen["params"] == {**searched, "m": 0.1}
    assert main(["defend", "--method", "nad", "--run", "r", "--preset", "searched", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kdshield: error: --preset searched: nad has no such preset (packaged: none)"]


def test_set_values_are_yaml_with_exponent_floats_and_bad_yaml_is_one_line(tmp_path):
    """``--set lr=3e-5`` is the float a user means (YAML 1.1 alone reads it as a string), in
    config files and search spaces too; a value that is not YAML is refused with one line."""
    from kdshield.config import load_yaml, parse_assignments
    from kdshield.errors import InputError

    assert parse_assignments(["lr=3e-5", "a=1.5E+2", "n=7", "name=3e", "t=null"]) == \
        {"lr": 3e-5, "a": 150.0, "n": 7, "name": "3e", "t": None}
    config = tmp_path / "job.yaml"
    config.write_text("params:\n  lr: 1e-4\n")
    assert load_yaml(config) == {"params": {"lr": 1e-4}}
    with pytest.raises(InputError, match=r"^--set 'a=\[1': not a YAML value"):
        parse_assignments(["a=[1"])


def test_quiet_by_default_and_verbose_on_request(monkeypatch, capsys):
    """By default: Ray's notices that need no action are filtered, model loads draw no bar, and a
    search prints one line per trial with the search so far; ``--verbose`` (before or after the
    command) turns every library's own output back on."""
    import logging
    from types import SimpleNamespace

    import transformers

    import kdshield.models.loading  # noqa: F401 - importing it is what turns the load bar off
    from kdshield.cluster.connect import _Harmless, quiet_process
    from kdshield.outputs import VERBOSE_ENV, verbose
    from kdshield.trainables.tune import TuneJob, _progress

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    assert not verbose() and not transformers.utils.logging.is_progress_bar_enabled()
    assert transformers.utils.logging.get_verbosity() == transformers.utils.logging.ERROR  # no LOAD REPORT tables
    notice = logging.LogRecord("ray", logging.WARNING, "", 0, "Token authentication is enabled for this Ray "
                               "cluster. Set RAY_AUTH_MODE=disabled to opt out.", None, None)
    failure = logging.LogRecord("ray", logging.WARNING, "", 0, "Token authentication is enabled but the "
                                "authentication token is invalid or incorrect.", None, None)
    assert not _Harmless().filter(notice) and _Harmless().filter(failure)
    quiet_process()  # the logger that emits the notice drops it, whatever handlers Ray adds later
    source = logging.getLogger("ray._private.authentication.authentication_token_setup")
    assert not source.filter(notice) and source.filter(failure)

    progress = _progress(TuneJob(method="bedkd", run="r", out="o", num_samples=3), completed=0)
    trial = lambda i, result, status="TERMINATED": SimpleNamespace(  # noqa: E731
        trial_id=i, last_result=result, status=status, config={"alpha": 0.123456}, path=f"/t/{i}")
    a, b, c = (trial("a", {"final": 1, "defender_score": 61.25, "training_iteration": 3}),
               trial("b", {"final": 0, "defender_score": 70.0, "training_iteration": 1}, "RUNNING"),
               trial("c", {}, "RUNNING"))
    capsys.readouterr()
    progress.on_trial_start(0, [a, b, c], a)
    progress.on_trial_complete(0, [a, b, c], a)
    b.status = "TERMINATED"
    progress.on_trial_complete(0, [a, b, c], b)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["kdshield: trial a started: alpha=0.1235",
                     "kdshield: trial a finished: defender_score 61.25 (1/3 done, 2 running; best finished 61.25)",
                     "kdshield: trial b stopped early after 1 epoch(s): defender_score 70 (2/3 done, 1 running; "
                     "best finished 61.25)"]  # a stopped trial's score is not a best

    for argv in (["--verbose", "report", "nowhere"], ["report", "nowhere", "-v"]):
        monkeypatch.delenv(VERBOSE_ENV, raising=False)
        assert main(argv) == 2 and verbose()


def test_memory_flags_reach_deepspeed_and_impossible_ones_are_one_line(capsys, no_ray):
    """--grad-accum, --gradient-checkpointing and --offload are scaling settings every training
    command takes; DeepSpeed gets them; what cannot run (offload without a GPU, parameter offload
    below ZeRO 3) is refused before any work, in one line; at their defaults they are not part of
    a job's record, so RUNs written before them still match."""
    from kdshield.config import ScalingSettings, TrainSettings
    from kdshield.trainables.engine import deepspeed_config

    big = ScalingSettings(workers=2, zero=3, gpus_per_worker=1, grad_accum=4, offload="optimizer+params")
    ds = deepspeed_config(TrainSettings(batch_size=8), big)
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "offload_optimizer" not in deepspeed_config(TrainSettings(), ScalingSettings(zero=2))["zero_optimization"]
    assert set(ScalingSettings().model_dump()) == {"workers", "cpus_per_worker", "gpus_per_worker", "zero", "bf16",
                                                   "address", "placement_strategy", "max_failures"}
    for flags, why in ((["--offload", "optimizer", "--zero", "2"], "the job has no GPU"),
                       (["--offload", "optimizer+params", "--zero", "2", "--gpus-per-worker", "1"], "needs zero=3"),
                       (["--offload", "optimizer", "--gpus-per-worker", "1"], "needs zero 1-3"),
                       (["--grad-accum", "0"], "grad_accum")):
        code, line = run_cli(["defend", "--method", "ft", "--run", "nowhere", "--out", "o", *flags], capsys)
        assert code == 2 and line.startswith("kdshield: error: defend: scaling") and why in line, line
