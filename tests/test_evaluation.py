"""The papers' metrics on hand-checked predictions."""

from __future__ import annotations

import numpy as np
import pytest

from kdshield.evaluation import asr, cacc, far_frr
from kdshield.evaluation.metrics import clean_and_attack_metrics


def _logits(preds, num_labels=3):
    return np.eye(num_labels)[np.asarray(preds)]


def test_cacc_asr_and_far_frr_by_hand():
    assert cacc([1, 0, 1, 1], [1, 0, 0, 0]) == 50.0
    # ASR ignores triggered rows whose true label already is the target
    assert asr([1, 1, 0, 1], [0, 2, 0, 1], target_label=1) == pytest.approx(200 / 3)
    with pytest.raises(ValueError):
        asr([1], [1], target_label=1)
    # FAR: poisoned called clean; FRR: clean called poisoned
    assert far_frr([True, False, True, False], [True, True, False, False]) == (50.0, 50.0)


def test_no_trigger_asr_is_clean_error_into_the_target_on_the_asr_rows():
    labels = np.array([0, 0, 1, 2, 2])  # target 1: the non-target rows are 0, 1, 3, 4
    clean = _logits([1, 0, 1, 1, 2])  # rows 0 and 3 go to the target without any trigger
    triggered = (_logits([1, 1, 1, 2]), np.array([0, 0, 2, 2]))  # the same 4 rows, triggered
    m = clean_and_attack_metrics(clean, labels, triggered, target_label=1)
    assert m["cacc"] == 60.0
    assert m["asr"] == 75.0
    assert m["asr_no_trigger"] == 50.0  # so the trigger adds 25 points
    assert clean_and_attack_metrics(clean, labels, None, 1) == {"cacc": 60.0}
    assert "asr" not in clean_and_attack_metrics(clean, labels, triggered, None)


def test_inference_progress_draws_only_on_a_terminal():
    """Scoring thousands of rows in process shows a bar to a person at a terminal; a log file (or
    a short job) gets nothing."""
    import io

    from kdshield.trainables.inference import _TerminalProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen, log = Terminal(), io.StringIO()
    for stream in (screen, log):
        bar = _TerminalProgress("scoring 2000 rows with model", 2000, stream=stream)
        for _ in range(4):
            bar.update(500)
        bar.close()
    assert screen.getvalue().endswith("[" + "#" * 30 + "] 2000/2000\n") and log.getvalue() == ""
    short = Terminal()
    _TerminalProgress("scoring 10 rows", 10, stream=short).update(10)
    assert short.getvalue() == ""
