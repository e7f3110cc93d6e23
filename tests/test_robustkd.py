"""RobustKD: mask arithmetic, variance loss, mask and feature-distillation losses, the engine's
loss-owned modules, reduced-depth students, settings refused before Ray, one tiny run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from kdshield.cli import main
from kdshield.defenses.robustkd.config import RobustKDConfig
from kdshield.defenses.robustkd.losses import (Connectors, Detox, DetoxLoss, FeatureKDLoss, detoxify,
                                               feature_variance)

from test_cli import no_ray, run_cli, sentiment, write  # noqa: F401  (a fixture and helpers)


# ----------------------------------------------------------------------------- arithmetic

def test_detoxify_both_forms_by_hand():
    F = torch.tensor([[[1.0, 3.0], [0.0, -2.0]]])  # [B=1, K=2, H=2]
    p = torch.tensor([[10.0, 20.0], [4.0, 4.0]])
    assert torch.allclose(detoxify(F, p, 0.1), torch.tensor([[[2.0, 5.0], [0.4, -1.6]]]))
    assert torch.allclose(detoxify(F, p, 0.1, "interpolate"), torch.tensor([[[1.9, 4.7], [0.4, -1.4]]]))
    assert torch.equal(detoxify(F, p, 0.0), F)  # m = 0 leaves the features alone
    assert torch.allclose(detoxify(F, p, 1.0, "interpolate"), p.expand_as(F))  # m = 1 replaces them
    with pytest.raises(ValueError):
        detoxify(F, p, 0.1, "multiply")


def test_feature_variance_by_hand():
    F = torch.tensor([[[1.0, 3.0], [0.0, 0.0]], [[2.0, 2.0], [1.0, 5.0]]])  # [B=2, K=2, H=2]
    # per sample and layer, population variance over H: (1,3)->1, (0,0)->0, (2,2)->0, (1,5)->4
    assert torch.allclose(feature_variance(F), torch.tensor([0.5, 2.0]))


def _detox(K=2, H=2, m=0.5, form="additive"):
    head = torch.nn.Linear(H, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        head.bias.zero_()
    return Detox(torch.zeros(K, H), m, form, head)


def test_detox_loss_is_variance_plus_head_ce():
    detox = _detox()
    with torch.no_grad():
        detox.p.copy_(torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    feats = torch.tensor([[[9.0, 9.0], [0.0, 0.0], [1.0, 3.0]]])  # [B=1, N+1=3, H]; layers 1, 2 chosen
    batch = {"teacher_hidden_states": feats, "label": torch.tensor([1])}
    loss = DetoxLoss(detox, [1, 2], var_weight=2.0, ce_weight=1.0)
    value, logs = loss(None, batch)
    # F' = F + 0.5 p: layer 1 (0,0)->(1,0): var 0.25; layer 2 (1,3)->(1,4): var 2.25
    after = torch.tensor([[1.0, 4.0]])
    ce = torch.nn.functional.cross_entropy(after, torch.tensor([1])).item()
    assert logs["var"] == pytest.approx(2.5)
    assert logs["ce"] == pytest.approx(ce, rel=1e-6)
    assert value.item() == pytest.approx(2.0 * 2.5 + ce, rel=1e-6)
    assert logs["acc"] == 100.0
    # only the masks get gradients; the head stays frozen
    value.backward()
    assert detox.p.grad is not None and detox.p.grad.abs().sum() > 0
    assert all(not q.requires_grad for q in detox.head.parameters())


def test_optimising_the_mask_lowers_the_variance():
    """A shared p can cancel the systematic profile of the features (here a ramp across the
    hidden dimension), not the per-sample noise: the variance falls towards the noise's."""
    torch.manual_seed(0)
    feats = torch.linspace(-3.0, 3.0, 8) + 0.3 * torch.randn(64, 3, 8)  # profile variance 4.0, noise 0.09
    labels = torch.randint(0, 2, (64,))
    detox = Detox(feats[:, 1:].mean(0), 0.2, "additive", torch.nn.Linear(8, 2).requires_grad_(False))
    loss = DetoxLoss(detox, [1, 2], ce_weight=0.0)
    opt = torch.optim.Adam(detox.parameters(), lr=0.2)  # p must travel to about -profile / m
    batch = {"teacher_hidden_states": feats, "label": labels}
    first, _ = loss(None, batch)
    for _ in range(300):
        opt.zero_grad()
        value, _ = loss(None, batch)
        value.backward()
        opt.step()
    assert first.item() > 2 * 3.5  # two layers, each about 4 + 0.09
    assert value.item() < 2 * 0.3  # close to the noise floor of 2 * 0.09


def test_feature_kd_loss_with_and_without_masks():
    torch.manual_seed(0)
    B, L, Hs, Ht = 2, 3, 2, 3
    states = tuple(torch.randn(B, L, Hs) for _ in range(3))  # student: embeddings + 2 blocks
    teacher = torch.randn(B, 5, Ht)  # teacher: embeddings + 4 blocks, pooled
    p = torch.randn(2, Ht)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    batch = {"teacher_hidden_states": teacher, "label": torch.tensor([0, 1]), "attention_mask": mask}
    out = SimpleNamespace(logits=logits, hidden_states=states)
    for with_mask in (False, True):
        conn = Connectors(2, Hs, Ht, p=p if with_mask else None, m=0.1)
        loss = FeatureKDLoss(conn, [2, 4], [1, 2], "encoder", feature_weight=3.0, ce_weight=0.5)
        value, logs = loss(out, batch)
        target = teacher[:, [2, 4]] + (0.1 * p if with_mask else 0.0)
        feat = sum(((conn.maps[k](states[s][:, 0]) - target[:, k]) ** 2).mean() for k, s in enumerate([1, 2]))
        ce = torch.nn.functional.cross_entropy(logits, batch["label"])
        assert logs["feat"] == pytest.approx(feat.item(), rel=1e-5)
        assert value.item() == pytest.approx(3.0 * feat.item() + 0.5 * ce.item(), rel=1e-5)


def test_connectors_start_as_identity_for_equal_widths():
    conn = Connectors(2, 4, 4)
    x = torch.randn(3, 2, 4)
    projected, target = conn(x, x)
    assert torch.allclose(projected, x) and torch.equal(target, x)


def test_engine_wraps_loss_modules_once_per_module():
    from kdshield.config import TrainSettings
    from kdshield.trainables.engine import StageModule
    from kdshield.defenses.stage import Phase, Stage

    detox = _detox()
    loss = DetoxLoss(detox, [1, 2])
    stage = Stage(name="mask", model=None, phases=(Phase("a", loss), Phase("b", loss, name="again")),
                  train=TrainSettings())
    mods = stage.loss_modules()
    assert list(mods) == ["a"] and mods["a"] is detox
    module = StageModule(None, mods)
    trainable = [n for n, q in module.named_parameters() if q.requires_grad]
    assert trainable == ["extras.a.p"]  # the head is carried, frozen
    assert module() is None


def test_reduced_depth_copy_keeps_the_chosen_blocks():
    from kdshield.models import load_classifier, reduced_copy

    full, _ = load_classifier("tiny-bert", 2)
    small = reduced_copy(full, (1,))
    assert small.config.num_hidden_layers == 1 and len(small.bert.encoder.layer) == 1
    assert torch.equal(small.bert.encoder.layer[0].output.dense.weight, full.bert.encoder.layer[1].output.dense.weight)
    assert torch.equal(small.classifier.weight, full.classifier.weight)
    assert sum(q.numel() for q in small.parameters()) < sum(q.numel() for q in full.parameters())
    fresh = reduced_copy(full, (0,), init="random")
    assert not torch.equal(fresh.bert.embeddings.word_embeddings.weight, full.bert.embeddings.word_embeddings.weight)


def test_plan_student_defaults(tmp_path):
    from kdshield.models import count_parameters, resolve_model
    from kdshield.defenses.robustkd.recipe import plan_student

    teacher = resolve_model("tiny-bert")
    plan = plan_student(RobustKDConfig(), teacher)
    assert plan.keep_layers == (1,) and plan.teacher_layers == [2] and plan.student_layers == [1]
    assert plan.student_params < plan.teacher_params == count_parameters(teacher)
    same = plan_student(RobustKDConfig(student_layers=[0, 1]), teacher)
    assert same.student_params == same.teacher_params and same.teacher_layers == [1, 2]


# ----------------------------------------------------------------------------- refused before Ray

@pytest.fixture
def defend_files(tmp_path):
    return {k: write(tmp_path / f"{k}.parquet", sentiment(8, offset=i * 100))
            for i, k in enumerate(("train", "clean", "test"))}


@pytest.mark.parametrize("setting, expected", [
    ("m=-0.1", "m"), ("detox=multiply", "detox"), ("mask_epochs=0", "mask_epochs"), ("mask_lr=0", "mask_lr"),
    ("student_layers=[]", "student_layers"), ("student_layers=[1,0]", "ascending"),
    ("student_init=zeros", "student_init"), ("n_c=0", "n_c"), ("distill_epochs=0", "distill_epochs"),
    ("detox=interpolate", None), ("var_weight=0", None),
])
def test_robustkd_refuses_bad_settings_before_ray(setting, expected, tmp_path, capsys, no_ray):  # noqa: F811
    extra = {"detox=interpolate": ["--set", "m=1.5"], "var_weight=0": ["--set", "mask_ce_weight=0"]}.get(setting, [])
    code, line = run_cli(["defend", "--method", "robustkd", "--run", str(tmp_path / "missing-run"),
                          "--set", setting, *extra, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and line.startswith("kdshield: error:")
    assert (expected or "robustkd settings") in line


@pytest.mark.parametrize("settings, expected", [
    (["student_layers=[2]"], "do not exist"),            # tiny-bert has blocks 0 and 1
    (["student_layers=[0,1,2]"], "do not exist"),
    (["teacher_layers=[3]"], "do not exist"),
    (["teacher_layers=[1]"], "must end with the last block"),
    (["teacher_layers=[1,2]"], "to pair them with"),               # a one-block student cannot pair two layers
    (["student_feature_layers=[2]"], "do not exist"),
    (["teacher_layers=[1,2]", "student_feature_layers=[1]"], "pairwise"),
    (["student=no-such-model"], "no-such-model"),
    (["student=tiny-llama"], "tokenizer"),
])
def test_robustkd_refuses_model_dependent_settings_before_ray(settings, expected, defend_files, tmp_path, capsys,
                                                              no_ray):  # noqa: F811
    args = ["defend", "--method", "robustkd", "--model", "tiny-bert", "--train", defend_files["train"],
            "--clean", defend_files["clean"], "--test", defend_files["test"], "--out", str(tmp_path / "out")]
    for s in settings:
        args += ["--set", s]
    code, line = run_cli(args, capsys)
    assert code == 2 and line.startswith("kdshield: error:") and expected in line
    assert not (tmp_path / "out").exists()


def test_robustkd_refuses_a_larger_student_before_ray(defend_files, tmp_path, capsys, no_ray):  # noqa: F811
    """tiny-bert as the student of a 1-block copy of itself: the student is the larger one."""
    from kdshield.models import load_classifier, load_tokenizer, save_classifier

    model, _ = load_classifier("tiny-bert", 2, keep_layers=(0,))
    teacher = save_classifier(model, load_tokenizer("tiny-bert"), tmp_path / "small-teacher")
    code, line = run_cli(["defend", "--method", "robustkd", "--model", str(teacher), "--train", defend_files["train"],
                          "--clean", defend_files["clean"], "--test", defend_files["test"],
                          "--set", "student=tiny-bert", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "larger than the teacher" in line


def test_defend_warns_when_the_suspect_has_no_trained_head(defend_files, tmp_path, capsys, no_ray):  # noqa: F811
    """A base checkpoint given as the suspect model is defended with a fresh random head, and the
    person running it is told so (before any Ray work); a trained classifier raises no warning."""
    from kdshield.cli import main
    from kdshield.models import load_classifier, load_tokenizer, save_classifier

    files = ["--train", defend_files["train"], "--clean", defend_files["clean"], "--test", defend_files["test"]]
    failing = ["--set", "teacher_layers=[3]", "--out", str(tmp_path / "out")]  # stops the job before Ray
    assert main(["defend", "--method", "robustkd", "--model", "tiny-bert", *files, *failing]) == 2
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kdshield: warning")]
    assert len(warning) == 1 and "no trained classification head" in warning[0] and "random head" in warning[0]

    model, _ = load_classifier("tiny-bert", 2)
    trained = save_classifier(model, load_tokenizer("tiny-bert"), tmp_path / "classifier")
    assert main(["defend", "--method", "robustkd", "--model", str(trained), *files, *failing]) == 2
    assert "kdshield: warning" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- through Ray

@pytest.mark.ray
def test_robustkd_end_to_end_on_tiny_bert(tmp_path, capsys, ray_local):
    files = {"train": write(tmp_path / "train.parquet", sentiment(40)),
             "clean": write(tmp_path / "clean.parquet", sentiment(32, offset=500)),
             "test": write(tmp_path / "test.parquet", sentiment(16, offset=900))}
    out = tmp_path / "out"
    code = main(["defend", "--method", "robustkd", "--model", "tiny-bert", "--train", files["train"],
                 "--clean", files["clean"], "--test", files["test"], "--num-labels", "2", "--out", str(out),
                 "--set", "mask_epochs=4", "--set", "mask_lr=0.1", "--set", "m=1.0", "--set", "distill_epochs=2",
                 "--set", "batch_size=16", "--set", "max_length=32"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "model/model.safetensors").is_file()
    assert metrics["method"] == "robustkd" and 0 <= metrics["cacc"] <= 100
    # the student is the reduced-depth copy (1 of tiny-bert's 2 blocks), and says so
    cfg = json.loads((out / "model/config.json").read_text())
    assert cfg["num_hidden_layers"] == 1
    assert 0 < metrics["compression"] < 1
    assert metrics["compression"] == pytest.approx(metrics["student_params"] / metrics["teacher_params"])
    # the mask stage trained only the masks (no model), over the cached features, and lowered its
    # loss; (tiny-bert's random LayerNorm'd features have no systematic profile for p to cancel,
    # so its variance term alone need not fall: see test_optimising_the_mask_lowers_the_variance)
    history = metrics["history"]["mask"]
    assert len(history) == 4 and history[-1]["clean/loss"] < history[0]["clean/loss"]
    var = metrics["mask"]
    assert len(var["var_before"]) == len(var["var_init"]) == len(metrics["teacher_layers"]) == 1
    assert var["var_after"] != var["var_init"] != var["var_before"]  # p's start adds to F; the learned p was read back
    assert len(metrics["history"]["distill"]) == 2
    assert set(metrics["stage_seconds"]) >= {"teacher_cache", "mask", "distill"}
