"""benchmarks/gpu_smoke.py, the GPU machine's check, runs its every item on the CPU here too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"


@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_the_gpu_smoke_passes_on_the_cpu(tmp_path):
    """Attack tiny LLaMA and Qwen2 at bf16 and ZeRO-3, BeDKD --lora with cached and live teacher,
    W2SDefense, inference placement: each a real command, each checked to have run on the device."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out), "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    record = json.loads((out / "gpu_smoke.json").read_text())
    assert record["passed"] and len(record["items"]) == 6
    assert all(r["passed"] for r in record["items"])
    assert proc.stdout.count("PASS ") == 6
    assert "6/6 items passed" in (out / "gpu_smoke.md").read_text()


def test_the_gpu_smoke_refuses_a_machine_without_a_gpu_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "gpu_smoke: error: --device cuda but torch sees no GPU here; use --device cpu"]
    assert not (tmp_path / "out").exists()
