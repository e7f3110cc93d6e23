"""MBTSAD: token splitting + attention distillation, and ``ts-ft``, its first step alone.

The paper (../shared/papers/mbtsad.md; no public code) defends a backdoored classifier M_b
with a small clean set D_c in two steps:

1. **TS-FT**: every clean sample yields ``copies`` (N = 3) token-split variants
   (:mod:`kdshield.datasets.augment`), giving D_a; a copy of M_b is retrained on D_a with
   cross-entropy (lr 2e-5), giving M_p.
2. **Attention distillation**: the student is the original M_b, the frozen teacher M_p, on D_a
   (lr 5e-4), with ``L_a + alpha * L_cls + beta * L_h`` (``losses.MBTSADLoss``, Eq. 1-7).
"""

from kdshield.defenses.base import DefenseSpec, register
from kdshield.defenses.mbtsad.config import MBTSADConfig, TSFTConfig
from kdshield.defenses.mbtsad.recipe import check_mbtsad, run_mbtsad, run_ts_ft

PAPER = "MBTSAD: mitigating backdoors by token splitting and attention distillation; ../shared/papers/mbtsad.md"
register(
    DefenseSpec("mbtsad", "token-split retraining (TS-FT), then attention distillation into the suspect model",
                MBTSADConfig, run_mbtsad, final_stages=("distill",), epoch_setting="distill_epochs",
                check=check_mbtsad, reference=PAPER),
    DefenseSpec("ts-ft", "baseline: MBTSAD's first step alone (retrain on token-split clean data)", TSFTConfig,
                run_ts_ft, final_stages=("ts_ft",), epoch_setting="retrain_epochs", reference=PAPER),
)
