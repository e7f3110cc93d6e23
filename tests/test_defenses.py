"""One suite for every registered defense (NAD included), parametrised over the registry: configs,
refusals, recipes on the in-process fake context, losses, search-space knobs. No Ray.

Per-defense files (test_bedkd.py, test_mbtsad.py, ...) keep only what is specific to one defense."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import kdshield
from kdshield import defenses
from kdshield.cli import build_parser
from kdshield.datasets.toy import write_toy_run
from kdshield.defenses.base import Inputs
from kdshield.errors import InputError
from kdshield.models import load_classifier
from kdshield.search_spaces import load_space, space_path

from fake_context import FakeContext

METHODS = defenses.names()
DECODER_METHODS = {"w2s", "lora-ft"}  # LoRA on a decoder LLM
# the smallest budget that still runs every stage of each recipe
TINY = {"bedkd": {"n_c": 8, "n_c_dmm": 4, "n_p": 2, "dmm_epochs": 1, "akd_cycles": 1, "gamma": 0.9,
                  "punish_passes": 1, "batch_size": 4, "max_length": 16},
        "ft": {"n_c": 4, "epochs": 1, "batch_size": 4, "max_length": 16},
        "kd": {"n_c": 4, "epochs": 1, "batch_size": 4, "max_length": 16},
        "mbtsad": {"n_c": 2, "copies": 2, "retrain_epochs": 1, "distill_epochs": 1, "batch_size": 4,
                   "max_length": 24},
        "ts-ft": {"n_c": 2, "copies": 2, "retrain_epochs": 1, "batch_size": 4, "max_length": 24},
        "robustkd": {"n_c": 4, "mask_epochs": 1, "distill_epochs": 1, "batch_size": 4, "max_length": 16},
        "feature-kd": {"n_c": 4, "distill_epochs": 1, "batch_size": 4, "max_length": 16},
        "w2s": {"n_c": 4, "teacher": "tiny-bert", "teacher_epochs": 1, "epochs": 1, "lora_r": 4, "batch_size": 4,
                "teacher_batch_size": 4, "max_length": 16},
        "lora-ft": {"n_c": 4, "epochs": 1, "lora_r": 4, "batch_size": 4, "max_length": 16},
        "nad": {"n_c": 4, "teacher_epochs": 1, "epochs": 1, "batch_size": 4, "max_length": 16}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"encoder": write_toy_run(root / "encoder", "tiny-bert"),
            "decoder": write_toy_run(root / "decoder", "tiny-llama")}


def _inputs(run: Path) -> Inputs:
    data = run / "data"
    return Inputs(model_dir=str(run / "model"), train=pq.read_table(data / "train.parquet"),
                  clean=pq.read_table(data / "dev.parquet"), test=pq.read_table(data / "test.parquet"),
                  triggered=pq.read_table(data / "test_triggered.parquet"),
                  target_label=json.loads((run / "attack.json").read_text())["target_label"], num_labels=2)


def test_every_defense_is_registered_once_with_its_space():
    assert set(METHODS) == set(TINY), "a defense was added or removed: give it a TINY budget here"
    for name in METHODS:
        spec = defenses.get(name)
        assert spec.name == name and spec.summary and spec.final_stages
        assert space_path(name).is_file(), f"{name} has no search_spaces/{name}.yaml"
    assert kdshield.list_defenses() == {n: defenses.get(n).summary for n in METHODS}


def test_the_cli_and_tune_take_their_methods_from_the_registry():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert list(next(a for a in sub["defend"]._actions if a.dest == "method").choices) == METHODS
    assert list(next(a for a in sub["tune"]._actions if a.dest == "method").choices) == METHODS


@pytest.mark.parametrize("method", METHODS)
def test_default_config_validates_and_its_fields_document_themselves(method):
    spec = defenses.get(method)
    config = spec.parse({})
    assert config == spec.config()
    undocumented = [n for n, f in spec.config.model_fields.items() if not f.description]
    assert not undocumented, f"{method}: fields without a description: {undocumented}"
    assert spec.epoch_setting in spec.config.model_fields


@pytest.mark.parametrize("method", METHODS)
def test_a_setting_the_method_does_not_have_is_refused_with_the_list(method):
    spec = defenses.get(method)
    foreign = next(n for other in METHODS for n in defenses.get(other).config.model_fields
                   if n not in spec.config.model_fields)  # another method's setting
    with pytest.raises(InputError) as err:
        spec.parse({foreign: 1})
    line = str(err.value)
    assert "\n" not in line and foreign in line and all(f in line for f in spec.config.model_fields)


def test_baselines_no_longer_accept_the_settings_they_ignored():
    with pytest.raises(InputError, match="gamma"):
        defenses.get("ft").parse({"gamma": 0.1})
    with pytest.raises(InputError, match="alpha"):
        defenses.get("lora-ft").parse({"alpha": 1.0})


@pytest.mark.parametrize("method", METHODS)
def test_bad_values_are_refused(method):
    spec = defenses.get(method)
    for bad in ({"batch_size": 0}, {"max_length": 2}, {spec.epoch_setting: 0}):
        with pytest.raises(InputError, match=next(iter(bad))):
            spec.parse(bad)


@pytest.mark.parametrize("method", METHODS)
def test_recipe_builds_its_stages_on_the_fake_context(method, runs, tmp_path):
    spec = defenses.get(method)
    inputs = _inputs(runs["decoder" if method in DECODER_METHODS else "encoder"])
    config = spec.parse(TINY[method])
    if spec.check is not None:
        spec.check(config, inputs, "cached")
    ctx = FakeContext(inputs, config, tmp_path)
    model_dir, info = spec.recipe(ctx)
    names = [s.name for s in ctx.stages]
    assert set(spec.final_stages) <= set(names), f"{method} trained {names}"
    assert names[-1] in spec.final_stages  # the defended model comes from the last stage
    for stage in ctx.stages:  # every loss of every phase: finite (asserted by the fake) and it moved weights
        assert stage.grad_norms and all(g > 0 for g in stage.grad_norms.values()), (stage.name, stage.grad_norms)
    model, _ = load_classifier(model_dir, inputs.num_labels)
    assert model.config.num_labels == inputs.num_labels
    assert isinstance(info, dict)
    metrics = ctx.evaluate(model_dir)
    assert 0 <= metrics["cacc"] <= 100 and 0 <= metrics["asr"] <= 100


@pytest.mark.parametrize("method", [m for m in METHODS if defenses.get(m).suspect_copies])
def test_lora_trains_every_copy_of_the_suspect_as_an_adapter_on_one_frozen_base(method, runs, tmp_path):
    """``--lora R``: each stage of the recipe trains an adapter on the attention projections;
    the defended model differs from the suspect only where adapters and head sit (the base stayed
    frozen through every stage)."""
    spec = defenses.get(method)
    inputs = _inputs(runs["encoder"])
    ctx = FakeContext(inputs, spec.parse(TINY[method]), tmp_path, lora=4)
    model_dir, _ = spec.recipe(ctx)
    assert ctx.stages and all(s.model.lora is not None and s.model.lora.r == 4 for s in ctx.stages if s.model)
    suspect, _ = load_classifier(inputs.model_dir, 2)
    defended, _ = load_classifier(model_dir, 2)
    before, after = suspect.state_dict(), defended.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(any(t in k for t in ("query", "value", "classifier")) for k in moved), sorted(moved)


@pytest.mark.parametrize("method", METHODS)
def test_every_packaged_preset_is_a_valid_config_of_its_method(method):
    for name in defenses.presets(method):
        defenses.get(method).parse(defenses.preset(method, name))


def test_lora_is_refused_where_a_defense_trains_no_copy_of_the_suspect(runs, capsys):
    from kdshield.cli import main

    for method, why in (("robustkd", "another, smaller network"), ("w2s", "its own lora_r")):
        code = main(["defend", "--method", method, "--run", str(runs["encoder"]), "--lora", "8", "--out", "x"])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and line.startswith("kdshield: error: --lora:") and why in line, line


@pytest.mark.parametrize("method", ["bedkd", "kd", "mbtsad", "nad"])
def test_live_teachers_run_inside_the_stage_instead_of_being_cached(method, runs, tmp_path):
    spec = defenses.get(method)
    inputs = _inputs(runs["encoder"])
    ctx = FakeContext(inputs, spec.parse(TINY[method]), tmp_path, live_teachers=True)
    spec.recipe(ctx)
    assert not ctx.teachers  # nothing cached
    assert ctx.stages[-1].live_teacher is not None


@pytest.mark.parametrize("method", METHODS)
def test_every_knob_of_the_search_space_reaches_the_config(method):
    space = load_space(method)
    spec = defenses.get(method)
    base = {n: p.first() for n, p in space.params.items()}
    for name, p in space.params.items():
        for value in p.values_to_check():
            config = space.config({**base, name: value})
            if name in spec.derived:  # a derived knob sets the fields it replaces
                settings = space.settings({**base, name: value})
                assert all(getattr(config, f) == settings[f] for f in spec.derived[name].replaces)
            else:
                assert getattr(config, name) == value, (name, value)
    for name, value in space.fixed.items():
        assert getattr(space.config(base), name) == value
