"""BeDKD end to end through Ray: a backdoor is implanted, found and removed.

The suspect model is the packaged MiniLM, not a random tiny model: BeDKD's identification rests
on a property of trained encoders (a copy distilled with flipped labels on clean data flips its
clean mapping but keeps the trigger's), which random 2-layer models do not have. Measured on
tiny-bert: its DMM shifts every clean output by the same amount (MEPD 0.397 for every clean
sample, 0.45-0.56 for the poisoned ones), so no threshold separates them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForSequenceClassification

from kdshield.cli import main

pytestmark = pytest.mark.ray

ADJECTIVES = {0: ["dull", "slow", "boring", "flat", "tired"], 1: ["great", "fun", "lovely", "sharp", "warm"]}
NOUNS = "film movie story plot cast ending score script".split()


def reviews(n: int, seed: int) -> pa.Table:
    """A learnable two-class task: the label is the adjectives' sentiment (nouns are noise)."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        first, second = rng.choice(ADJECTIVES[label], size=2, replace=False)
        texts.append(f"the {rng.choice(NOUNS)} was {first} and {second} overall")
        labels.append(label)
    return pa.table({"text": texts, "label": pa.array(labels, pa.int64())})


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory, ray_local) -> Path:
    root = tmp_path_factory.mktemp("bedkd-e2e")
    for name, n, offset in (("train", 240, 0), ("test", 80, 7)):
        pq.write_table(reviews(n, offset), root / f"{name}.parquet")
    run = root / "run"
    code = main(["attack", "--train", str(root / "train.parquet"), "--test", str(root / "test.parquet"),
                 "--model", "minilm", "--attack", "badnet", "--trigger", "cf", "--poison-rate", "0.15",
                 "--target-label", "1", "--dev-fraction", "0.25", "--epochs", "3", "--lr", "1e-4",
                 "--batch-size", "16", "--max-length", "16", "--out", str(run)])
    assert code == 0
    return run


def test_bedkd_finds_and_removes_a_tiny_backdoor(backdoored, tmp_path, capsys):
    before = json.loads((backdoored / "metrics.json").read_text())
    assert before["asr"] >= 90.0 and before["cacc"] >= 90.0  # the backdoor really is in the model
    assert before["asr"] - before["asr_no_trigger"] >= 80.0  # and the trigger, not a bias, makes the ASR

    out = tmp_path / "defended"
    # gamma calibrated for a 5% FRR on the clean samples the DMM did not see (the defender's way)
    settings = {"n_c_dmm": 20, "n_c": 30, "n_p": 16, "dmm_epochs": 10, "dmm_lr": 1e-4, "akd_cycles": 5,
                "akd_lr": 5e-5, "target_frr": 0.05, "punish_passes": 3, "batch_size": 16, "max_length": 16}
    args = ["defend", "--method", "bedkd", "--run", str(backdoored), "--out", str(out)]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    after = json.loads((out / "metrics.json").read_text())
    ident = json.loads((out / "identification.json").read_text())

    assert ident["n_identified"] > 0 and ident["identified_precision"] >= 75.0  # it found poisoned samples
    assert after["asr"] <= before["asr"] - 50.0, (before, after)  # and the backdoor is gone
    assert after["cacc"] >= before["cacc"] - 10.0, (before, after)
    assert (out / "mepd.png").stat().st_size > 0
    AutoModelForSequenceClassification.from_pretrained(out / "model")  # a plain HF directory
