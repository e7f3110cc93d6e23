"""MBTSAD: token splitting, attention-enhancement/transfer loss, hidden MSE, the per-layer
attention tap, settings refused before Ray, and one tiny run through Ray."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from kdshield.cli import main
from kdshield.datasets import split_count, split_tokens, token_split_table
from kdshield.defenses.losses import masked_mse
from kdshield.defenses.mbtsad.config import MBTSADConfig
from kdshield.defenses.mbtsad.losses import MBTSADLoss, attention_transfer
from kdshield.models.attention import attention_enhancement, tap_attentions

from test_cli import no_ray, run_cli, sentiment, write  # noqa: F401  (a fixture and helpers)

LONG = ("a stirring , funny and finally transporting re-imagining of beauty and the beast and "
        "1930s horror films that is never dull and always surprising to watch")


# ----------------------------------------------------------------------------- token splitting

@pytest.mark.parametrize("n, expected", [(0, 10), (5, 10), (33, 10), (34, 10), (40, 12), (100, 30)])
def test_split_count_is_max_of_10_and_30_percent(n, expected):
    assert split_count(n) == expected == max(10, math.floor(0.3 * n))


def _pieces_rejoin(original: str, augmented: str, k: int) -> None:
    """Walk the augmented tokens: each original token is either kept or the concatenation of
    exactly two non-empty consecutive pieces; exactly k tokens were split."""
    orig, aug = original.split(), augmented.split()
    assert len(aug) == len(orig) + k
    j, splits = 0, 0
    for tok in orig:
        if aug[j] == tok:
            j += 1
        else:
            assert len(aug[j]) >= 1 and len(aug[j + 1]) >= 1
            assert aug[j] + aug[j + 1] == tok
            j, splits = j + 2, splits + 1
    assert j == len(aug) and splits == k


@pytest.mark.parametrize("seed", range(5))
def test_split_tokens_counts_and_preserves_characters(seed):
    words = LONG.split()
    text = " ".join(words * 3)  # 78 tokens: floor(0.3 * 78) = 23 > 10
    out, k = split_tokens(text, np.random.default_rng(seed))
    assert k == max(10, math.floor(0.3 * len(text.split()))) == 23
    assert out.replace(" ", "") == text.replace(" ", "")  # joined pieces give the same characters
    _pieces_rejoin(text, out, k)


def test_split_tokens_caps_at_the_splittable_tokens():
    text = "a b c dog cat"  # 5 tokens, only 2 have >= 2 characters
    out, k = split_tokens(text, np.random.default_rng(0))
    assert k == 2
    _pieces_rejoin(text, out, k)
    assert split_tokens("a b c", np.random.default_rng(0)) == ("a b c", 0)
    short, k = split_tokens("hello world", np.random.default_rng(1), min_tokens=1, ratio=0.5)
    assert k == 1 and short.replace(" ", "") == "helloworld"


def test_token_split_table_is_deterministic_and_makes_copies():
    table = pa.table({"text": [LONG, "short one here", LONG + " again"], "label": pa.array([1, 0, 1], pa.int64()),
                      "source_index": pa.array([7, 8, 9], pa.int64())})
    a = token_split_table(table, copies=3, seed=4)
    b = token_split_table(table, copies=3, seed=4)
    c = token_split_table(table, copies=3, seed=5)
    assert a.num_rows == 9
    assert a.column("text").to_pylist() == b.column("text").to_pylist()  # same seed, same result
    assert a.column("text").to_pylist() != c.column("text").to_pylist()  # another seed differs
    assert a.column("label").to_pylist() == [1, 1, 1, 0, 0, 0, 1, 1, 1]
    assert a.column("source_index").to_pylist() == [7, 7, 7, 8, 8, 8, 9, 9, 9]
    assert a.column("augment_copy").to_pylist() == [0, 1, 2] * 3
    texts = a.column("text").to_pylist()
    assert len(set(texts[:3])) == 3  # the copies of one row differ from each other
    for out, src in zip(texts, np.repeat(table.column("text").to_pylist(), 3)):
        assert out.replace(" ", "") == src.replace(" ", "")
    # one row alone gives the same copies as inside a batch: randomness is per row, not per batch
    alone = token_split_table(table.slice(2, 1), copies=3, seed=4)
    assert alone.column("text").to_pylist() == texts[6:]


@pytest.mark.parametrize("kwargs", [{"copies": 0}, {"ratio": 0.0}, {"ratio": 1.5}, {"min_tokens": -1}])
def test_token_split_refuses_bad_settings(kwargs):
    from kdshield.errors import InputError

    table = pa.table({"text": ["x y"], "label": pa.array([0], pa.int64()), "source_index": pa.array([0], pa.int64())})
    with pytest.raises(InputError):
        token_split_table(table, **kwargs)


# ----------------------------------------------------------------------------- losses

def test_attention_enhancement_sums_squared_heads():
    a = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]], [[0.2, 0.8], [0.6, 0.4]]]])  # [1, 2 heads, 2, 2]
    ae = attention_enhancement(a)
    assert torch.allclose(ae, torch.tensor([[[0.25 + 0.04, 0.25 + 0.64], [1.0 + 0.36, 0.0 + 0.16]]]))


def test_attention_transfer_on_hand_made_maps():
    eye = torch.eye(2)[None]
    flip = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    # a map and a positive multiple of it: identical after L2 normalisation
    assert attention_transfer(3.0 * eye, eye).item() == pytest.approx(0.0, abs=1e-6)
    # disjoint supports: two orthogonal unit vectors are sqrt(2) apart
    assert attention_transfer(eye, flip).item() == pytest.approx(math.sqrt(2), rel=1e-6)
    # a hand-computed case: s = [1,0,0,0], t = [1,1,0,0]/sqrt(2)
    s = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    t = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    expected = math.sqrt((1 - 1 / math.sqrt(2)) ** 2 + 0.5)
    assert attention_transfer(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_attention_transfer_ignores_padding():
    s = torch.zeros(1, 3, 3)
    t = torch.zeros(1, 3, 3)
    s[0, :2, :2], t[0, :2, :2] = torch.eye(2), 2 * torch.eye(2)
    s[0, 2, :], t[0, :, 2] = 9.0, 5.0  # garbage on the padded row / column
    mask = torch.tensor([[1, 1, 0]])
    assert attention_transfer(s, t, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_transfer(s, t).item() > 0.5  # without the mask the garbage counts


def test_masked_mse_over_real_tokens():
    s = torch.zeros(1, 3, 2)
    t = torch.tensor([[[1.0, 1.0], [0.0, 2.0], [100.0, 100.0]]])
    assert masked_mse(s, t, torch.tensor([[1, 1, 0]])).item() == pytest.approx((1 + 1 + 0 + 4) / 4)


def _fake_batch(L=3, layers=2, H=2, C=2):
    torch.manual_seed(0)
    return {"label": torch.tensor([0, 1]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
            "teacher_ae_token_map": torch.rand(2, layers, L, L),
            "teacher_layer_seq": torch.rand(2, layers + 1, L, H)}


def test_mbtsad_loss_combines_the_terms():
    batch = _fake_batch()
    hidden = tuple(torch.rand(2, 3, 2) for _ in range(3))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    probs = [torch.softmax(torch.rand(2, 2, 3, 3), -1) for _ in range(2)]
    loss = MBTSADLoss(alpha=0.5, beta=2.0)
    loss._terms = [attention_transfer(attention_enhancement(p), batch["teacher_ae_token_map"][:, n],
                                      batch["attention_mask"]) for n, p in enumerate(probs)]
    value, logs = loss(SimpleNamespace(logits=logits, hidden_states=hidden), batch)
    ce = torch.nn.functional.cross_entropy(logits, batch["label"]).item()
    att = sum(attention_transfer(attention_enhancement(p), batch["teacher_ae_token_map"][:, n], batch["attention_mask"])
              for n, p in enumerate(probs)).mean().item()
    hid = sum(masked_mse(h, batch["teacher_layer_seq"][:, n], batch["attention_mask"]) for n, h in enumerate(hidden)).item()
    assert logs["att"] == pytest.approx(att, rel=1e-5) and logs["hid"] == pytest.approx(hid, rel=1e-5)
    assert value.item() == pytest.approx(att + 0.5 * ce + 2.0 * hid, rel=1e-5)
    # CE only (the paper's CD ablation) reads no teacher column
    cd = MBTSADLoss(alpha=1.0, beta=0.0, attention=False)
    value, logs = cd(SimpleNamespace(logits=logits, hidden_states=None), {"label": batch["label"]})
    assert value.item() == pytest.approx(ce, rel=1e-6) and not cd.needs_hidden_states


def test_capture_taps_every_layer_and_keeps_no_attention_tuple():
    from kdshield.models import load_classifier

    model, tok = load_classifier("tiny-bert", 2, attn_implementation="eager")
    model.eval()
    enc = tok(["a short text", "another slightly longer text here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc, output_attentions=True).attentions
        mask = enc["attention_mask"]
        teacher = torch.stack([attention_enhancement(a) for a in ref], 1)
    batch = {"attention_mask": mask, "teacher_ae_token_map": teacher, "label": torch.tensor([0, 1]),
             "teacher_layer_seq": None}
    loss = MBTSADLoss(beta=0.0)
    with torch.no_grad(), loss.capture(model, batch):
        out = model(**enc)
    assert out.attentions is None  # nothing collected by the model itself
    value, logs = loss(out, batch)
    assert logs["att"] == pytest.approx(0.0, abs=1e-5)  # the student's own maps, tapped = the teacher's
    assert len(loss._terms) == 0


def test_student_attention_in_eval_mode_matches_a_frozen_models_maps_and_still_trains():
    """``student_attention=eval``: a student in training mode gives the attention maps a frozen
    (eval-mode) copy gives and gradients flow through them; in the default ``train`` mode dropout
    makes them differ. Either way the model is back in training mode afterwards."""
    from kdshield.models import load_classifier

    model, tok = load_classifier("tiny-bert", 2, attn_implementation="eager")
    model.config.attention_probs_dropout_prob = 0.5
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
        if hasattr(m, "dropout") and isinstance(getattr(m, "dropout"), float):
            m.dropout = 0.5
    enc = tok(["a short text", "another slightly longer text here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        frozen = [a.clone() for a in model.eval()(**enc, output_attentions=True).attentions]
    batch = {"attention_mask": enc["attention_mask"], "label": torch.tensor([0, 1]), "teacher_layer_seq": None,
             "teacher_ae_token_map": torch.stack([attention_enhancement(a) for a in frozen], 1)}
    model.train()
    for eval_attention, same in ((True, True), (False, False)):
        torch.manual_seed(0)
        seen = []
        with tap_attentions(model, lambda i, p: seen.append(p), eval_mode=eval_attention):
            out = model(**enc)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(seen, frozen)) is same
        assert model.training and all(m.training for m in model.modules())  # modes restored
    loss = MBTSADLoss(beta=0.0, eval_attention=True)
    with loss.capture(model, batch):
        out = model(**enc)
    value, logs = loss(out, batch)
    assert logs["att"] == pytest.approx(0.0, abs=1e-5)  # maps as the frozen copy's ...
    value.backward()  # ... and the loss still trains the student
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_tap_refuses_models_without_eager_attention():
    from kdshield.models import load_classifier

    model, tok = load_classifier("tiny-bert", 2, attn_implementation="sdpa")
    with pytest.raises(RuntimeError, match="eager"), tap_attentions(model, lambda i, p: None):
        model(**tok(["x y"], return_tensors="pt"))


def test_config_defaults_are_the_papers():
    c = MBTSADConfig()
    assert (c.copies, c.split_ratio, c.split_min_tokens, c.retrain_lr, c.distill_lr) == (3, 0.3, 10, 2e-5, 5e-4)
    assert c.use_attention and c.hidden_weight == 1.0
    assert not MBTSADConfig(ablation="no-att").use_attention
    assert MBTSADConfig(ablation="no-hid").hidden_weight == 0.0
    cd = MBTSADConfig(ablation="cd")
    assert not cd.use_attention and cd.hidden_weight == 0.0


# ----------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("setting, expected", [
    ("split_ratio=0", "split_ratio"), ("split_ratio=1.5", "split_ratio"), ("copies=0", "copies"),
    ("split_min_tokens=-1", "split_min_tokens"), ("alpha=-1", "alpha"), ("beta=-0.5", "beta"),
    ("distill_lr=0", "distill_lr"), ("ablation=nope", "ablation"), ("n_c=0", "n_c"), ("gamma=0.1", "gamma"),
])
def test_mbtsad_refuses_bad_settings_before_ray(setting, expected, tmp_path, capsys, no_ray):  # noqa: F811
    code, line = run_cli(["defend", "--method", "mbtsad", "--run", str(tmp_path / "missing-run"),
                          "--set", setting, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and line.startswith("kdshield: error:") and expected in line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- through Ray

@pytest.mark.ray
def test_mbtsad_end_to_end_on_tiny_bert(tmp_path, capsys, ray_local):
    files = {"train": write(tmp_path / "train.parquet", sentiment(40)),
             "clean": write(tmp_path / "clean.parquet", sentiment(16, offset=500)),
             "test": write(tmp_path / "test.parquet", sentiment(16, offset=900))}
    out = tmp_path / "out"
    code = main(["defend", "--method", "mbtsad", "--model", "tiny-bert", "--train", files["train"],
                 "--clean", files["clean"], "--test", files["test"], "--num-labels", "2", "--out", str(out),
                 "--set", "retrain_epochs=1", "--set", "distill_epochs=2", "--set", "copies=2",
                 "--set", "batch_size=8", "--set", "max_length=32", "--set", "distill_lr=1e-3",
                 "--set", "evaluate_teacher=false"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "model/model.safetensors").is_file()
    assert metrics["method"] == "mbtsad" and 0 <= metrics["cacc"] <= 100
    assert metrics["augmented_rows"] == 32  # 16 clean rows x 2 copies
    assert metrics["teacher_outputs"] == "cached" and metrics["teacher_cache_mb"] > 0
    assert set(metrics["stage_seconds"]) >= {"ts_ft", "distill", "teacher_cache"}
    distill = metrics["history"]["distill"]
    assert len(distill) == 2
    for key in ("augmented/att", "augmented/hid", "augmented/ce"):
        assert np.isfinite(distill[-1][key])
    assert distill[0]["augmented/att"] > 0  # the student's maps differ from the TS-FT teacher's
    assert metrics["stage_peak_rss_mb"]["distill"] > 0
