"""BeDKD (Backdoor Defense via Knowledge Distillation) and its Table 2 baselines.

The paper (../shared/papers/bedkd.md) defends a poisoned classifier f* in three steps:

1. **DMM** (Eq. 1-3): a copy of f* is distilled from the frozen f* on ``n_c_dmm`` clean
   samples per class whose labels are *flipped*, with
   ``alpha * CE(flipped) + (1 - alpha) * (KL_T + MSE of last hidden states)``. The flipped
   labels destroy the clean mapping while the soft terms keep the backdoor mapping, so f* and
   the DMM disagree on clean inputs and agree on triggered ones.
2. **Identification** (Eq. 4): MEPD, the mean absolute difference of the two models' class
   probabilities; a suspect training sample with MEPD below ``gamma`` is called poisoned.
3. **AKD** (Eq. 5-7): a student initialised from f* alternates *trust* distillation on clean
   data and *punish* distillation on the identified poisoned samples.

Files: ``config.py`` (settings of bedkd, ft, kd), ``losses.py`` (trust and punish losses),
``identify.py`` (MEPD, gamma, selection), ``recipe.py`` (the stages).
"""

from kdshield.defenses.base import DefenseSpec, Derived, register
from kdshield.defenses.bedkd.config import BeDKDConfig, FTConfig, KDConfig
from kdshield.defenses.bedkd.recipe import run_bedkd, run_ft, run_kd


def _nc_np_ratio(values: dict, defaults: dict) -> None:
    """BeDKD's n_c/n_p ratio: ``n_p = max(1, round(n_c / nc_np_ratio))``."""
    ratio = float(values.pop("nc_np_ratio"))
    values["n_p"] = max(1, int(round(values.get("n_c", defaults["n_c"]) / ratio)))


PAPER = "Backdoor defense via knowledge distillation (BeDKD); ../shared/papers/bedkd.md"
register(
    DefenseSpec("bedkd", "DMM -> MEPD identification -> adversarial KD (trust + punish)", BeDKDConfig, run_bedkd,
                final_stages=("akd",), epoch_setting="akd_cycles", reference=PAPER,
                derived={"nc_np_ratio": Derived("n_p = round(n_c / nc_np_ratio)", ("n_p",), _nc_np_ratio,
                                                low_exclusive=0.0)}),
    DefenseSpec("ft", "baseline: fine-tune the suspect model on the clean set", FTConfig, run_ft,
                final_stages=("ft",), epoch_setting="epochs", reference=PAPER),
    DefenseSpec("kd", "baseline: distil the suspect model into a copy of itself on the clean set", KDConfig,
                run_kd, final_stages=("kd",), epoch_setting="epochs", reference=PAPER),
)
