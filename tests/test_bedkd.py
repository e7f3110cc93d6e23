"""kdshield.defenses.bedkd: losses, label flipping, MEPD, gamma, identification, settings,
histogram; and pad_collate's hidden_seq columns. Fast, no Ray."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdshield.config import parse_settings
from kdshield.datasets import pad_collate
from kdshield.defenses.bedkd.config import BeDKDConfig
from kdshield.defenses.bedkd.losses import DistillLoss, PunishLoss
from kdshield.defenses.bedkd.identify import (
    backdoor_confidence,
    calibrate_gamma,
    flip_labels,
    identify,
    majority_label,
    mepd,
    plot_mepd_histogram,
    softmax,
    suspected_target,
)
from kdshield.errors import InputError

# ----------------------------------------------------------------------------- fixtures

S_LOGITS = np.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
T_LOGITS = np.array([[1.0, 1.0, 0.0], [-1.0, 2.0, 1.0]])
LABELS = np.array([0, 2])
MASK = np.array([[1, 1, 0], [1, 1, 1]])  # row 0: last position is padding
S_HID = np.arange(18, dtype=np.float64).reshape(2, 3, 3) / 10
T_HID = S_HID + np.array([[[1, 0, 0], [0, 2, 0], [50, 50, 50]],
                          [[0, 0, 1], [1, 1, 0], [0, 0, 0]]], dtype=np.float64)


def _np_softmax(z, t=1.0):
    e = np.exp(z / t - (z / t).max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _expected_terms(t=2.0):
    ce = -np.mean(np.log(_np_softmax(S_LOGITS))[np.arange(2), LABELS])
    p, q = _np_softmax(T_LOGITS, t), _np_softmax(S_LOGITS, t)
    kl = np.sum(p * (np.log(p) - np.log(q))) / 2  # batchmean, no T^2
    # real positions: 2 + 3 tokens, 3 dims each: squared errors 1+4 (row 0) + 1+1+1 (row 1)
    mse = (1 + 4 + 1 + 1 + 1) / (5 * 3)
    return ce, kl, mse


def _case(student_logits=S_LOGITS, student_hidden=S_HID, labels=LABELS, grad=False):
    logits = torch.tensor(student_logits, dtype=torch.float32, requires_grad=grad)
    hidden = torch.tensor(student_hidden, dtype=torch.float32, requires_grad=grad)
    outputs = SimpleNamespace(logits=logits, hidden_states=(hidden * 0, hidden))
    batch = {"label": torch.tensor(labels), "attention_mask": torch.tensor(MASK),
             "teacher_logits": torch.tensor(T_LOGITS, dtype=torch.float32),
             "teacher_hidden_seq": torch.tensor(T_HID, dtype=torch.float32)}
    return outputs, batch, logits, hidden


# ----------------------------------------------------------------------------- trust / DMM loss

def test_distill_loss_matches_hand_computation():
    ce, kl, mse = _expected_terms(t=2.0)
    assert mse == pytest.approx(8 / 15)
    outputs, batch, _, _ = _case()
    loss, logs = DistillLoss(alpha=0.3, temperature=2.0)(outputs, batch)
    assert logs["ce"] == pytest.approx(ce, rel=1e-5)
    assert logs["kl"] == pytest.approx(kl, rel=1e-5)
    assert logs["mse"] == pytest.approx(mse, rel=1e-5)  # the 50s on the padded position ignored
    assert loss.item() == pytest.approx(0.3 * ce + 0.7 * (kl + mse), rel=1e-5)
    assert DistillLoss.needs_hidden_states


def test_distill_loss_is_zero_soft_at_the_teacher():
    outputs, batch, _, _ = _case(student_logits=T_LOGITS, student_hidden=T_HID)
    loss, logs = DistillLoss(alpha=0.0, temperature=1.5)(outputs, batch)
    assert logs["kl"] == pytest.approx(0.0, abs=1e-6)
    assert logs["mse"] == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kwargs", [{"alpha": -0.1, "temperature": 1.0},
                                    {"alpha": 0.5, "temperature": 0.0}])
def test_distill_loss_refuses_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        DistillLoss(**kwargs)


# ----------------------------------------------------------------------------- punish loss

def test_unbounded_punish_is_the_negated_trust_loss():
    outputs, batch, logits, _ = _case(grad=True)
    trust, _ = DistillLoss(alpha=0.3, temperature=2.5)(outputs, batch)
    punish, logs = PunishLoss(lam=0.3, temperature=2.5, mode="unbounded")(outputs, batch)
    assert punish.item() == pytest.approx(-trust.item(), rel=1e-6)
    assert punish.item() < 0
    ce, _, mse = _expected_terms(t=2.5)
    assert logs["ce"] == pytest.approx(ce, rel=1e-5) and logs["mse"] == pytest.approx(mse, rel=1e-5)
    (g_trust,) = torch.autograd.grad(trust, logits, retain_graph=True)
    (g_punish,) = torch.autograd.grad(punish, logits)
    assert torch.allclose(g_punish, -g_trust)


def test_unbounded_punish_is_unbounded_below():
    far = np.array([[-40.0, 0.0, 40.0], [0.0, 40.0, -40.0]])  # labels 0, 2 get ~0 probability
    outputs, batch, _, _ = _case(student_logits=far, student_hidden=S_HID + 100)
    loss, _ = PunishLoss(lam=0.3, temperature=2.5, mode="unbounded")(outputs, batch)
    assert loss.item() < -1000


def _at_teacher():
    """Student == teacher; labels = the teacher's predicted (target) label."""
    target = T_LOGITS.argmax(-1)
    return _case(student_logits=T_LOGITS, student_hidden=T_HID, labels=target, grad=True)


def test_bounded_punish_pushes_away_from_the_teacher():
    outputs, batch, logits, _ = _at_teacher()
    loss, logs = PunishLoss(lam=0.3, temperature=2.5)(outputs, batch)
    assert logs["kl"] == pytest.approx(0.0, abs=1e-6) and logs["mse"] == pytest.approx(0.0)
    # every hinge is active: lam * (log C - CE) + (1 - lam) * (log C + 1), batch mean
    ce = -np.log(_np_softmax(T_LOGITS))[np.arange(2), T_LOGITS.argmax(-1)]
    expected = np.mean(0.3 * (math.log(3) - ce) + 0.7 * (math.log(3) + 1.0))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.abs().sum() > 0
    # gradient descent lowers the target logit (grad > 0 there) and raises the others
    target = torch.tensor(T_LOGITS.argmax(-1))
    assert (grad[torch.arange(2), target] > 0).all()
    p = torch.softmax(torch.tensor(T_LOGITS, dtype=torch.float32), -1)
    onehot = torch.nn.functional.one_hot(target, 3).float()
    assert torch.allclose(grad, 0.3 * (onehot - p) / 2, atol=1e-6)  # only the CE hinge acts


def test_bounded_punish_is_bounded_below_and_flat_past_the_bound():
    target = T_LOGITS.argmax(-1)  # [0, 1]
    far = np.array([[-40.0, 20.0, 20.0], [20.0, -40.0, 20.0]])
    outputs, batch, logits, hidden = _case(student_logits=far, student_hidden=-T_HID,
                                           labels=target, grad=True)
    loss, logs = PunishLoss(lam=0.3, temperature=2.5, margin=1.0)(outputs, batch)
    assert loss.item() == 0.0 and logs["active"] == 0.0
    g_logits, g_hidden = torch.autograd.grad(loss, (logits, hidden))
    assert torch.count_nonzero(g_logits) == 0 and torch.count_nonzero(g_hidden) == 0
    # much further still: the loss stays at its lower bound (0) instead of diverging
    outputs, batch, _, _ = _case(student_logits=far * 100, student_hidden=-1000 * T_HID,
                                 labels=target)
    loss, _ = PunishLoss(lam=0.3, temperature=2.5, margin=1.0)(outputs, batch)
    assert loss.item() == 0.0


def test_bounded_punish_never_negative_over_random_students():
    gen = torch.Generator().manual_seed(0)
    target = T_LOGITS.argmax(-1)
    for scale in (0.1, 1.0, 10.0, 1000.0):
        s = torch.randn(2, 3, generator=gen).numpy() * scale
        h = torch.randn(2, 3, 3, generator=gen).numpy() * scale
        outputs, batch, _, _ = _case(student_logits=s, student_hidden=h, labels=target)
        loss, _ = PunishLoss(lam=0.3, temperature=2.5)(outputs, batch)
        bound = 0.3 * math.log(3) + 0.7 * (math.log(3) + 1.0)
        assert 0.0 <= loss.item() <= bound + 1e-6


def test_bounded_punish_margin_moves_the_bound():
    # p(target) = 0.2 < 1/3: past the CE bound at margin 1, not at margin 2 (needs p <= 1/9)
    logits = np.log(np.array([[0.2, 0.4, 0.4], [0.4, 0.2, 0.4]]))
    target = T_LOGITS.argmax(-1)
    for margin, active in ((1.0, False), (2.0, True)):
        outputs, batch, lg, _ = _case(student_logits=logits, student_hidden=-T_HID,
                                      labels=target, grad=True)
        loss, _ = PunishLoss(lam=1.0, temperature=2.5, margin=margin)(outputs, batch)
        (grad,) = torch.autograd.grad(loss, lg)
        assert bool(grad.abs().sum() > 0) is active
        if active:
            assert loss.item() == pytest.approx(2 * math.log(3) - math.log(5), rel=1e-5)


@pytest.mark.parametrize("kwargs", [{"lam": 2.0, "temperature": 1.0},
                                    {"lam": 0.3, "temperature": -1.0},
                                    {"lam": 0.3, "temperature": 1.0, "mode": "soft"},
                                    {"lam": 0.3, "temperature": 1.0, "margin": 0.0}])
def test_punish_loss_refuses_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        PunishLoss(**kwargs)


# ----------------------------------------------------------------------------- labels

def test_flip_labels():
    assert flip_labels(np.array([0, 1, 1, 0]), 2).tolist() == [1, 0, 0, 1]
    assert flip_labels(np.array([0, 1, 2, 2]), 3).tolist() == [1, 2, 0, 0]
    flipped = flip_labels(torch.tensor([2, 0, 1]), 3)
    assert isinstance(flipped, torch.Tensor) and flipped.tolist() == [0, 1, 2]
    y = np.random.default_rng(0).integers(0, 5, 100)
    assert (flip_labels(y, 5) != y).all()
    with pytest.raises(ValueError):
        flip_labels(np.array([0, 3]), 3)


def test_suspected_target_is_the_over_predicted_label_not_the_majority():
    """R8-like: 'earn' (2) is half of all data, and poisoning adds 10% of predictions to 'crude'
    (1). The majority is 2; the label predicted more often than the clean data has it is 1."""
    clean = np.repeat([0, 1, 2, 3], [20, 5, 50, 25])
    preds = np.repeat([0, 1, 2, 3], [18, 15, 45, 22])  # 10 points moved onto label 1
    assert majority_label(preds) == 2
    assert suspected_target(preds, clean) == 1
    # balanced binary data: the same answer as the majority (the authors' rule)
    assert suspected_target(np.repeat([0, 1], [45, 55]), np.repeat([0, 1], [50, 50])) == 1
    # a label the clean data never shows still counts; ties go to the smaller label
    assert suspected_target([0, 0, 3, 3], [0, 0, 0, 0]) == 3
    assert suspected_target([0, 1], [0, 1]) == 0
    for preds, clean in (([], [0]), ([0], []), ([-1], [0])):
        with pytest.raises(ValueError):
            suspected_target(preds, clean)


def test_majority_label():
    assert majority_label(np.array([2, 1, 2, 0, 2, 1])) == 2
    assert majority_label([1, 0]) == 0  # tie: the smaller label
    with pytest.raises(ValueError):
        majority_label([])


# ----------------------------------------------------------------------------- MEPD and gamma

def test_mepd_on_constructed_probabilities():
    pt = np.array([[0.9, 0.1], [0.5, 0.5]])
    pd = np.array([[0.1, 0.9], [0.5, 0.5]])
    assert mepd(pt, pd) == pytest.approx([0.8, 0.0])
    p3t = np.array([[0.7, 0.2, 0.1]])
    p3d = np.array([[0.1, 0.2, 0.7]])
    assert mepd(p3t, p3d) == pytest.approx([(0.6 + 0.0 + 0.6) / 3])
    logits = np.array([[3.0, -1.0], [0.0, 0.0]])
    assert softmax(logits).sum(-1) == pytest.approx([1.0, 1.0])
    assert mepd(softmax(logits), softmax(logits)) == pytest.approx([0.0, 0.0])
    with pytest.raises(ValueError, match="softmax"):
        mepd(logits, logits)
    with pytest.raises(ValueError, match="shape"):
        mepd(pt, p3t)


def test_calibrate_gamma_hits_the_target_frr():
    clean = np.round(np.arange(1, 101) / 100, 2)  # 0.01 .. 1.00
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(clean)
    for frr in (0.05, 0.29, 0.5):
        gamma = calibrate_gamma(shuffled, frr)
        assert np.mean(clean < gamma) == pytest.approx(frr)
    assert calibrate_gamma(shuffled, 0.05) == pytest.approx(0.06)
    # not a multiple of 1/n: never above the target
    gamma = calibrate_gamma(clean, 0.055)
    assert np.mean(clean < gamma) == pytest.approx(0.05)
    # ties straddling the cut: fewer flagged, never more
    tied = np.array([0.1, 0.2, 0.2, 0.2, 0.5])
    assert np.mean(tied < calibrate_gamma(tied, 0.4)) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        calibrate_gamma(np.array([]), 0.05)


def test_identify():
    values = np.array([0.05, 0.30, 0.01, 0.09, 0.02, 0.10, 0.03])
    preds = np.array([1, 1, 0, 1, 1, 1, 1])
    assert identify(values, preds, gamma=0.1, n_p=10, target_label=None).tolist() == [0, 2, 3, 4, 6]
    assert identify(values, preds, gamma=0.1, n_p=10, target_label=1).tolist() == [0, 3, 4, 6]
    # cap keeps the smallest MEPD (0.02, 0.03), returned sorted by index
    assert identify(values, preds, gamma=0.1, n_p=2, target_label=1).tolist() == [4, 6]
    assert identify(values, preds, gamma=0.01, n_p=5, target_label=None).tolist() == []
    drawn = identify(values, preds, gamma=0.1, n_p=2, target_label=1, selection="random", seed=3)
    assert len(drawn) == 2 and set(drawn) <= {0, 3, 4, 6}
    assert drawn.tolist() == identify(values, preds, gamma=0.1, n_p=2, target_label=1, selection="random",
                                      seed=3).tolist()
    assert identify(values, preds, gamma=0.1, n_p=3, target_label=None).dtype == np.int64
    with pytest.raises(ValueError):
        identify(values, preds[:3], gamma=0.1, n_p=2, target_label=None)


def test_identify_confident_prefers_samples_both_models_are_sure_of():
    # three candidates under gamma predicted as the target: an ambiguous clean sample where both
    # models say ~0.55 (MEPD 0.01, the smallest), and two backdoored ones both models are sure of
    p_teacher = np.array([[0.45, 0.55], [0.01, 0.99], [0.03, 0.97], [0.9, 0.1]])
    p_dmm = np.array([[0.46, 0.54], [0.04, 0.96], [0.07, 0.93], [0.2, 0.8]])
    values, preds = mepd(p_teacher, p_dmm), p_teacher.argmax(-1)
    conf = backdoor_confidence(p_teacher, p_dmm)
    np.testing.assert_allclose(conf, [0.54, 0.96, 0.93, 0.2])  # min over the two models, teacher's label
    assert identify(values, preds, gamma=0.1, n_p=2, target_label=1, selection="smallest").tolist() == [0, 1]
    assert identify(values, preds, gamma=0.1, n_p=2, target_label=1, selection="confident",
                    confidence=conf).tolist() == [1, 2]
    with pytest.raises(ValueError, match="confidence"):
        identify(values, preds, gamma=0.1, n_p=2, target_label=1, selection="confident")
    with pytest.raises(ValueError, match="shape"):
        backdoor_confidence(p_teacher, p_dmm[:2])


# ----------------------------------------------------------------------------- settings

def test_config_defaults_are_the_authors():
    cfg = parse_settings(BeDKDConfig, {}, source="bedkd")
    assert (cfg.alpha, cfg.lam, cfg.dmm_temperature, cfg.akd_temperature) == (0.3, 0.3, 1.5, 2.5)
    assert (cfg.gamma, cfg.target_frr, cfg.n_c_dmm, cfg.n_c, cfg.n_p) == (0.1, None, 80, 320, 32)
    assert (cfg.dmm_epochs, cfg.akd_cycles, cfg.batch_size, cfg.punish) == (20, 50, 16, "bounded")
    assert cfg.require_target_prediction and cfg.punish_margin == 1.0
    assert (cfg.selection, cfg.punish_passes) == ("confident", 5)  # kdshield's measured departures
    assert all(f.description for f in BeDKDConfig.model_fields.values())
    frr = parse_settings(BeDKDConfig, {"target_frr": 0.05}, source="bedkd")
    assert frr.gamma is None and frr.target_frr == 0.05
    both_null = {"target_frr": 0.05, "gamma": None}
    assert parse_settings(BeDKDConfig, both_null, source="bedkd").gamma is None


@pytest.mark.parametrize("values, where", [
    ({"alpha": -0.1}, "alpha"), ({"alpha": 1.1}, "alpha"), ({"lam": 2}, "lam"),
    ({"dmm_temperature": 0}, "dmm_temperature"), ({"akd_temperature": -1.0}, "akd_temperature"),
    ({"n_c": 0}, "n_c"), ({"n_c_dmm": 0}, "n_c_dmm"), ({"n_p": 0}, "n_p"),
    ({"gamma": 0.1, "target_frr": 0.05}, "exactly one"), ({"gamma": None}, "exactly one"),
    ({"target_frr": 1.0}, "target_frr"), ({"gamma": 0}, "gamma"),
    ({"punish": "soft"}, "punish"), ({"punish_margin": 0}, "punish_margin"),
    ({"max_length": 4}, "max_length"), ({"akd_lr": 0}, "akd_lr"),
    ({"punish_passes": 0}, "punish_passes"), ({"selection": "best"}, "selection"),
    ({"typo": 1}, "typo"),
])
def test_config_refuses_bad_values(values, where):
    with pytest.raises(InputError, match=where) as err:
        parse_settings(BeDKDConfig, values, source="bedkd")
    assert str(err.value).startswith("bedkd:") and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- histogram

@pytest.mark.parametrize("with_truth", [True, False])
def test_plot_mepd_histogram_writes_a_png(tmp_path, with_truth):
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(0.2, 0.5, 50), rng.uniform(0, 0.05, 10)])
    truth = np.r_[np.zeros(50, bool), np.ones(10, bool)] if with_truth else None
    out = plot_mepd_histogram(values, truth, 0.1, tmp_path / "sub" / "mepd.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


# ----------------------------------------------------------------------------- pad_collate

def _object_rows(*arrays):
    out = np.empty(len(arrays), dtype=object)
    out[:] = list(arrays)
    return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_collate_pads_hidden_seq_like_input_ids(side):
    h0 = np.arange(6, dtype=np.float64).reshape(3, 2) + 1  # 3 tokens, H = 2
    h1 = np.array([[-1.0, -2.0]])  # 1 token
    batch = {"input_ids": _object_rows(np.array([5, 6, 7], np.int32), np.array([8], np.int32)),
             "label": np.array([1, 0]), "teacher_hidden_seq": _object_rows(h0, h1)}
    out = pad_collate(batch, pad_ids={"input_ids": 0}, padding_side=side)
    hidden, mask = out["teacher_hidden_seq"], out["attention_mask"]
    assert hidden.shape == (2, 3, 2) and hidden.dtype == torch.float32
    assert out["input_ids"].shape == hidden.shape[:2]
    assert torch.equal(hidden[0], torch.tensor(h0, dtype=torch.float32))
    row1 = [[-1.0, -2.0], [0.0, 0.0], [0.0, 0.0]]
    assert hidden[1].tolist() == (row1 if side == "right" else row1[::-1])
    assert ((hidden != 0).any(-1).long() == mask).all()  # vectors sit on the real tokens
    # equal lengths: Ray may hand one 3-D array
    same = {"input_ids": np.array([[1, 2], [3, 4]], np.int32),
            "teacher_hidden_seq": np.ones((2, 2, 4), np.float64)}
    out = pad_collate(same, pad_ids={"input_ids": 0}, padding_side=side)
    assert out["teacher_hidden_seq"].shape == (2, 2, 4)
    assert out["teacher_hidden_seq"].dtype == torch.float32


def test_pad_collate_refuses_misaligned_hidden_seq():
    batch = {"input_ids": _object_rows(np.array([5, 6, 7]), np.array([8])),
             "teacher_hidden_seq": _object_rows(np.ones((2, 2)), np.ones((1, 2)))}
    with pytest.raises(InputError, match="positions"):
        pad_collate(batch, pad_ids={"input_ids": 0})


def test_the_demo_budget_is_a_valid_bedkd_config():
    """`kdshield demo` defends only after a four-minute attack: its BeDKD settings must hold."""
    from kdshield.demo import DEMO_BEDKD

    config = BeDKDConfig(**DEMO_BEDKD)
    assert config.gamma is not None and config.n_c_dmm <= config.n_c


def _title_fits(png_writer, tmp_path):
    """Every axes title of the figure ``png_writer`` draws lies inside the figure."""
    import matplotlib.figure

    drawn = []
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        drawn.append(fig)
        return save(fig, *args, **kwargs)

    matplotlib.figure.Figure.savefig = spy
    try:
        png_writer(tmp_path)
    finally:
        matplotlib.figure.Figure.savefig = save
    (fig,) = drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    box = fig.bbox
    for ax in fig.axes:
        t = ax.title.get_window_extent(renderer)
        assert box.x0 <= t.x0 and t.x1 <= box.x1, (ax.get_title(), t, box)


def test_the_mepd_histogram_and_demo_chart_titles_fit_and_the_chart_shows_no_trigger_asr(tmp_path):
    from kdshield.demo import bar_chart

    _title_fits(lambda d: plot_mepd_histogram(np.linspace(0, 0.4, 50), None, 0.1, d / "m.png"), tmp_path)
    rows = [{"model": "backdoored MiniLM", "CACC %": 79.2, "ASR %": 91.9, "no-trigger ASR %": 20.1},
            {"model": "after BeDKD", "CACC %": 78.0, "ASR %": 15.8, "no-trigger ASR %": 14.4}]
    _title_fits(lambda d: bar_chart(rows, d / "demo.png"), tmp_path)
    import matplotlib.figure

    labels = []
    save = matplotlib.figure.Figure.savefig
    matplotlib.figure.Figure.savefig = lambda fig, *a, **k: labels.extend(
        t.get_text() for t in fig.axes[0].get_legend().get_texts())
    try:
        bar_chart(rows, tmp_path / "x.png")
    finally:
        matplotlib.figure.Figure.savefig = save
    assert "no-trigger ASR" in labels
