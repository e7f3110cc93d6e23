"""W2SDefense and LoRA-FT: loss terms by hand, pooling under left/right padding, the projection,
LoRA adapters (save / load / merge), settings refused before Ray, and tiny decoders trained
through Ray with 2 workers under ZeRO-3 (LoRA weights change, base weights do not)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdshield.cli import main
from kdshield.defenses.losses import kl_at_temperature
from kdshield.defenses.w2s.config import AUTHORS_WEIGHTS, W2SConfig
from kdshield.defenses.w2s.losses import ProjectedHead, TeacherLoss, W2SLoss, fit_projection
from kdshield.models.pooling import last_token_index, pool

from test_cli import no_ray, run_cli, sentiment, write  # noqa: F401  (a fixture and helpers)


# ----------------------------------------------------------------------------- loss terms

def _log_softmax(z: list[float]) -> list[float]:
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def test_w2s_loss_terms_by_hand():
    s = torch.tensor([[2.0, 0.0], [0.0, 1.0]])          # student logits [B=2, C=2]
    t = torch.tensor([[1.0, 1.0], [0.0, 3.0]])          # teacher logits
    y = torch.tensor([0, 1])
    # last hidden states [B=2, L=3, H=2]: row 0 right-padded (1 1 0), row 1 left-padded (0 1 1)
    h = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [7.0, 7.0]],
                      [[5.0, 5.0], [6.0, 6.0], [0.0, -1.0]]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    f_t = torch.tensor([[0.0, 2.0], [1.0, 1.0]])        # projected teacher features [B, H]
    batch = {"label": y, "teacher_logits": t, "teacher_feature": f_t, "attention_mask": mask}
    out = SimpleNamespace(logits=s, hidden_states=(torch.zeros_like(h), h))

    # by hand: CE = mean -log p_y
    ce = -(_log_softmax([2.0, 0.0])[0] + _log_softmax([0.0, 1.0])[1]) / 2
    # KL(p_t || p_s) at T = 2, summed over classes, mean over the batch, times T^2 = 4
    kl = 0.0
    for zs, zt in (([2.0, 0.0], [1.0, 1.0]), ([0.0, 1.0], [0.0, 3.0])):
        ls, lt = _log_softmax([v / 2 for v in zs]), _log_softmax([v / 2 for v in zt])
        kl += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
    kl = 4.0 * kl / 2
    # pooled student: row 0 -> position 1 (1, 2); row 1 -> position 2 (0, -1)
    fa = ((1 - 0) ** 2 + (2 - 2) ** 2 + (0 - 1) ** 2 + (-1 - 1) ** 2) / 4   # = 1.5

    loss = W2SLoss(alpha=5.0, beta=0.5, gamma=0.25, temperature=2.0)
    value, logs = loss(out, batch)
    assert logs["ce"] == pytest.approx(ce, rel=1e-6)
    assert logs["kl"] == pytest.approx(kl, rel=1e-5)
    assert logs["fa"] == pytest.approx(1.5, rel=1e-6)
    assert value.item() == pytest.approx(5.0 * ce + 0.5 * kl + 0.25 * fa, rel=1e-6)
    assert kl_at_temperature(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-7)  # a perfect match costs nothing


def test_w2s_loss_without_soft_terms_is_ce_only_and_needs_no_hidden_states():
    s, y = torch.tensor([[0.5, -0.5]]), torch.tensor([1])
    loss = W2SLoss(1.0, 0.0, 0.0)
    assert not loss.needs_hidden_states
    value, logs = loss(SimpleNamespace(logits=s, hidden_states=None), {"label": y})
    assert set(logs) == {"ce"} and value.item() == pytest.approx(-_log_softmax([0.5, -0.5])[1], rel=1e-6)
    assert W2SLoss(1.0, 0.0, 1e-3).needs_hidden_states


def test_teacher_loss_trains_the_projection_through_its_classifier():
    torch.manual_seed(0)
    head = ProjectedHead(teacher_width=3, student_width=5, num_labels=2)
    h = torch.randn(2, 4, 3, requires_grad=True)
    logits = torch.randn(2, 2, requires_grad=True)
    batch = {"label": torch.tensor([0, 1]), "teacher_attention_mask": torch.ones(2, 4, dtype=torch.long)}
    value, logs = TeacherLoss(head)(SimpleNamespace(logits=logits, hidden_states=(h,)), batch)
    projected, proj_logits = head(h[:, 0])  # encoders pool [CLS]
    assert projected.shape == (2, 5)
    expect = (torch.nn.functional.cross_entropy(logits, batch["label"])
              + torch.nn.functional.cross_entropy(proj_logits, batch["label"]))
    assert value.item() == pytest.approx(expect.item(), rel=1e-6)
    value.backward()
    assert head.proj.weight.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0


def test_fit_projection_recovers_an_affine_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    w, b = rng.normal(size=(6, 4)), rng.normal(size=6)
    fw, fb = fit_projection(x, x @ w.T + b, ridge=0.0)
    assert np.allclose(fw, w, atol=1e-4) and np.allclose(fb, b, atol=1e-4)
    shrunk, _ = fit_projection(x, x @ w.T + b, ridge=1.0)
    assert np.abs(shrunk).sum() < np.abs(fw).sum()  # the ridge penalty shrinks the map


def test_config_defaults_and_authors_weights():
    c = W2SConfig()
    assert c.loss_weights == AUTHORS_WEIGHTS["word"] == (5.0, 0.001, 0.001)
    assert W2SConfig(weights="sentence", gamma=0.5).loss_weights == (3.0, 0.01, 0.5)
    assert (c.lr, c.epochs, c.temperature, c.lora_dropout, c.padding_side) == (2e-4, 5, 2.0, 0.1, "left")


# ----------------------------------------------------------------------------- pooling

def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 4]
    h = torch.arange(4 * 5, dtype=torch.float32).reshape(4, 5, 1)
    assert pool(h, mask, "decoder")[:, 0].tolist() == [2.0, 9.0, 14.0, 19.0]
    assert pool(h, mask, "encoder")[:, 0].tolist() == [0.0, 5.0, 10.0, 15.0]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_decoder_pooling_is_the_same_under_left_and_right_padding(preset):
    from kdshield.models import load_classifier

    model, tok = load_classifier(preset, 2)
    model.eval()
    texts = ["a short one", "a much longer text that needs no padding at all here"]
    alone = []
    with torch.no_grad():
        for text in texts:
            enc = tok([text], return_tensors="pt")
            out = model(**enc, output_hidden_states=True)
            alone.append((out.logits[0], pool(out.hidden_states[-1], enc["attention_mask"], "decoder")[0]))
        for side in ("left", "right"):
            tok.padding_side = side
            enc = tok(texts, return_tensors="pt", padding=True)
            assert (enc["attention_mask"] == 0).any()  # the short text really is padded
            out = model(**enc, output_hidden_states=True)
            pooled = pool(out.hidden_states[-1], enc["attention_mask"], "decoder")
            for i, (logits, feature) in enumerate(alone):
                assert torch.allclose(pooled[i], feature, atol=1e-4), (side, i)
                assert torch.allclose(out.logits[i], logits, atol=1e-4), (side, i)


# ----------------------------------------------------------------------------- adapters

def test_adapter_save_load_and_merge_round_trip(tmp_path):
    from kdshield.models import load_classifier
    from kdshield.models.lora import LoraSpec, load_with_adapter, merge_into, save_adapter, wrap_lora

    model, tok = load_classifier("tiny-llama", 2)
    peft_model = wrap_lora(model, LoraSpec(r=4, alpha=8.0, dropout=0.0))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # LoRA starts as the identity (B = 0): make it do something
    ids = tok(["a film", "another film I liked"], return_tensors="pt", padding=True)
    peft_model.eval()
    with torch.no_grad():
        expect = peft_model(**ids).logits
    save_adapter(peft_model, tmp_path / "adapter")
    assert (tmp_path / "adapter/adapter_model.safetensors").is_file()
    assert not list((tmp_path / "adapter").glob("*.bin"))
    loaded, _ = load_with_adapter("tiny-llama", tmp_path / "adapter", 2)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(**ids).logits, expect, atol=1e-5)
    merge_into(loaded, tok, tmp_path / "merged")
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", use_safetensors=True).eval()
    with torch.no_grad():
        assert torch.allclose(merged(**ids).logits, expect, atol=1e-4)


# ----------------------------------------------------------------------------- refused before Ray

@pytest.fixture
def decoder_files(tmp_path):
    return {"train": write(tmp_path / "train.parquet", sentiment(48)),
            "clean": write(tmp_path / "clean.parquet", sentiment(48, offset=500)),
            "test": write(tmp_path / "test.parquet", sentiment(24, offset=1000))}


def _defend(files, out, method="w2s", model="tiny-llama", *extra):
    return ["defend", "--method", method, "--model", model, "--train", files["train"], "--clean", files["clean"],
            "--test", files["test"], "--out", str(out), *extra]


def _wrong_width_teacher(tmp_path) -> str:
    """A finished-looking W2S teacher whose projection maps MiniLM's vocabulary model (tiny-bert,
    width 32) to width 48, not tiny-llama's 64."""
    from safetensors.torch import save_file

    from kdshield.models import resolve_model

    teacher = tmp_path / "teacher"
    shutil.copytree(resolve_model("tiny-bert"), teacher)
    save_file({"proj.weight": torch.zeros(48, 32), "proj.bias": torch.zeros(48)},
              str(teacher / "w2s_projection.safetensors"))
    return str(teacher)


@pytest.mark.parametrize("method, model, extra, expected", [
    ("w2s", "tiny-llama", ["--set", "target_modules=[q_proj, not_a_module]"], "not_a_module"),
    ("lora-ft", "tiny-qwen2", ["--set", "target_modules=[query]"], "query"),
    ("w2s", "tiny-llama", ["--set", "lora_r=0"], "lora_r"),
    ("lora-ft", "tiny-llama", ["--set", "lora_r=-3"], "lora_r"),
    ("w2s", "tiny-llama", ["--set", "teacher=WRONG_WIDTH"], "width 48"),
    ("w2s", "tiny-bert", [], "encoder"),
    ("w2s", "tiny-llama", ["--teacher-outputs", "live"], "live"),
    ("w2s", "tiny-llama", ["--set", "alpha=0", "--set", "beta=0", "--set", "gamma=0"], "all 0"),
    ("w2s", "tiny-llama", ["--set", "teacher=no-such-teacher"], "no-such-teacher"),
])
def test_bad_settings_fail_before_ray_with_one_line(method, model, extra, expected, decoder_files, tmp_path,
                                                    capsys, no_ray):
    if any("WRONG_WIDTH" in x for x in extra):
        teacher = _wrong_width_teacher(tmp_path)
        extra = [x.replace("WRONG_WIDTH", teacher) for x in extra]
    code, line = run_cli(_defend(decoder_files, tmp_path / "out", method, model, *extra), capsys)
    assert code == 2, line
    assert line.startswith("kdshield: error:") and expected in line, line
    assert not (tmp_path / "out").exists()


def test_attack_trigger_presets(tmp_path, capsys, no_ray):
    from kdshield.trainables.attack import AttackJob

    word = AttackJob(train="t", test="t", out="o", trigger_preset="w2s-word")
    sentence = AttackJob(train="t", test="t", out="o", trigger_preset="w2s-sentence", clean_label=True)
    assert (word.attack, word.triggers) == ("badnet", ["mn"])
    assert (sentence.attack, sentence.triggers, sentence.clean_label) == ("addsent", ["I watched this 3D movie"], True)
    files = {"train": write(tmp_path / "train.parquet", sentiment(40)),
             "test": write(tmp_path / "test.parquet", sentiment(20, offset=100))}
    code, line = run_cli(["attack", "--train", files["train"], "--test", files["test"], "--model", "tiny-llama",
                          "--trigger-preset", "w2s-word", "--attack", "addsent", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "w2s-word is a badnet attack" in line


# ----------------------------------------------------------------------------- through Ray

def _lora_delta(adapter: Path, name: str) -> tuple[torch.Tensor, float]:
    """``B @ A`` of one adapted layer (by its base weight's name) and the scale alpha / r."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    state = load_file(str(adapter / "adapter_model.safetensors"))
    stem = name.removesuffix(".weight")
    a = next(v for k, v in state.items() if k.endswith(f"{stem}.lora_A.weight"))
    b = next(v for k, v in state.items() if k.endswith(f"{stem}.lora_B.weight"))
    return b @ a, cfg["lora_alpha"] / cfg["r"]


def _assert_only_lora_changed(preset: str, adapter: Path, merged_dir: Path, blocks: int = 2) -> None:
    """Every adapter moved away from its initialisation (B = 0), and every base weight of the
    merged model is the suspect's own: exactly (not adapted) or up to the adapter's scaled B A
    (q_proj, v_proj). The merged model is rebuilt from the state the engine held, so a base
    weight the optimizer had touched would show here."""
    from safetensors.torch import load_file

    from kdshield.models import resolve_model

    state = load_file(str(adapter / "adapter_model.safetensors"))
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert len(lora_b) == 2 * blocks and all(v.abs().sum() > 0 for v in lora_b)
    base = load_file(str(Path(resolve_model(preset)) / "model.safetensors"))
    merged = load_file(str(merged_dir / "model.safetensors"))
    adapted = 0
    for name, weight in base.items():
        if name not in merged:  # the causal-LM head of the preset (tied); the classifier has none
            continue
        if name.endswith(("q_proj.weight", "v_proj.weight")):
            delta, scale = _lora_delta(adapter, name)
            assert torch.allclose(merged[name] - scale * delta, weight, atol=1e-5), name
            adapted += 1
        else:
            assert torch.equal(merged[name], weight), name  # a frozen base weight, unchanged
    assert adapted == 2 * blocks


@pytest.mark.ray
def test_w2s_end_to_end_tiny_llama_two_workers_zero3(decoder_files, tmp_path, capsys, ray_local):
    """The whole defense through the CLI: teacher (tiny-bert, WordPiece) -> cached projected
    features -> LoRA student (tiny-llama, BPE) on 2 Ray Train workers under ZeRO-3."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    code = main(_defend(decoder_files, out, "w2s", "tiny-llama", "--workers", "2", "--zero", "3",
                        "--set", "teacher=tiny-bert", "--set", "teacher_epochs=1", "--set", "epochs=2",
                        "--set", "lr=5e-3", "--set", "batch_size=8", "--set", "teacher_batch_size=8",
                        "--set", "max_length=16", "--set", "gamma=0.1", "--set", "beta=0.5",
                        "--set", "evaluate_teacher=false"))  # 4 inference passes fewer (CI budget)
    assert code == 0, capsys.readouterr().err[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("model/model.safetensors", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                 "teacher/model.safetensors", "teacher/w2s_projection.safetensors", "teacher/tokenizer.json"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    student_hist = metrics["history"]["student"]
    assert {"clean/ce", "clean/kl", "clean/fa"} <= set(student_hist[-1])
    assert len(student_hist[-1]["peak_rss_mb_per_rank"]) == 2  # both workers' memory
    assert metrics["lora"]["r"] == 8 and metrics["lora"]["trainable_params"] > 0
    assert 0 <= metrics["cacc"] <= 100 and metrics["projection"] == "joint"
    _assert_only_lora_changed("tiny-llama", out / "adapter", out / "model")
    proj = load_file(str(out / "teacher/w2s_projection.safetensors"))
    assert proj["proj.weight"].shape == (64, 32)  # tiny-bert's width 32 -> tiny-llama's 64


def _lora_stage(preset: str, epochs: int, *, dropout: float = 0.1, zero_loss: bool = False):
    """A W2S student stage on ``preset`` with synthetic cached teacher columns (64 rows)."""
    import pyarrow as pa

    from kdshield.config import TrainSettings
    from kdshield.models import load_tokenizer, resolve_model
    from kdshield.models.lora import LoraSpec
    from kdshield.trainables.attack import tokenized_stream
    from kdshield.defenses.stage import ModelSpec, Phase, Stage

    model_dir = resolve_model(preset)
    tok = load_tokenizer(model_dir)
    table = sentiment(64)
    rng = np.random.default_rng(0)
    table = table.append_column("teacher_feature", pa.array(list(rng.normal(size=(64, 64)).astype(np.float32)),
                                                            pa.list_(pa.float32(), 64)))
    table = table.append_column("teacher_logits", pa.array(list(rng.normal(size=(64, 2)).astype(np.float32)),
                                                           pa.list_(pa.float32(), 2)))
    stream = tokenized_stream(table, model_dir, 16)
    loss = W2SLoss(1.0, 0.0, 0.0) if zero_loss else W2SLoss(1.0, 0.5, 0.1)
    stage = Stage(name="lora", model=ModelSpec(model_dir, 2, lora=LoraSpec(r=4, alpha=4.0, dropout=dropout)),
                  phases=(Phase("train", loss),), pad_ids={"input_ids": tok.pad_token_id},
                  padding_side="left", shuffle_buffer=0,
                  train=TrainSettings(epochs=epochs, lr=1e-2, batch_size=8, max_length=16, warmup_ratio=0.5,
                                      checkpoint_interval_s=0))
    return stage, stream


@pytest.mark.ray
def test_lora_student_stage_tiny_qwen2_two_workers_zero3(tmp_path, ray_local):
    """The W2S student stage (CE + KL + feature MSE) on a Qwen2 decoder, 2 workers, ZeRO-3:
    only the adapter trains; adapter and merged model are exported."""
    from kdshield.config import ScalingSettings
    from kdshield.trainables.engine import run_stage

    stage, stream = _lora_stage("tiny-qwen2", epochs=1)
    result = run_stage(stage, {"train": stream}, ScalingSettings(workers=2, zero=3), storage=tmp_path)
    assert {"train/ce", "train/kl", "train/fa"} <= set(result.history[-1])
    assert result.adapter_dir is not None
    _assert_only_lora_changed("tiny-qwen2", result.adapter_dir, result.model_dir)


@pytest.mark.ray
def test_lora_stage_resumes_adapter_and_optimizer_state(tmp_path, ray_local):
    """A LoRA stage checkpointed after epoch 1 and resumed from there ends with the same adapter as
    the uninterrupted run: the adapter *and* the AdamW moments / schedule came back (with
    freshly initialised moments the second epoch's updates would differ). The checkpoint holds
    no frozen base weight."""
    from safetensors.torch import load_file

    from kdshield.config import ScalingSettings
    from kdshield.trainables.engine import run_stage

    stage, stream = _lora_stage("tiny-llama", epochs=2, dropout=0.0, zero_loss=True)
    scaling = ScalingSettings(workers=1, zero=2)
    full = run_stage(stage, {"train": stream}, scaling, storage=tmp_path / "a", run_name="full")
    first = sorted(p for p in (tmp_path / "a" / "full").glob("checkpoint_*") if not (p / "adapter").exists())
    assert first, "no intermediate checkpoint kept"
    files = {p.name for p in first[0].rglob("*") if p.is_file()}
    sizes = sum(p.stat().st_size for p in first[0].rglob("*") if p.is_file())
    assert sizes < 2_000_000, files  # adapter + optimizer state only: tiny-llama's base alone is ~13 MB
    resumed = run_stage(stage, {"train": stream}, scaling, storage=tmp_path / "b", run_name="resumed",
                        resume_from=first[0])
    assert resumed.metrics["start_epoch"] == 1 and len(resumed.history) == 2
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
