"""RobustKD: feature-variance detoxification for distilling a backdoored teacher, and
``feature-kd``, its plain feature-distillation baseline.

The paper (../shared/papers/robustkd.md; the authors' code is for images) compresses a
possibly backdoored teacher into a smaller student in two steps:

1. **Feature detoxification** (Sec. 4.2): for each chosen teacher layer, the detoxified
   feature is ``F' = F + m * p`` (Eq. 7, the default: ``detox="additive"``) or
   ``F' = (1 - m) * F + m * p`` (Eq. 15, the authors' code: ``detox="interpolate"``), where
   ``p`` is a learned tensor the size of ``F``, initialised from the mean clean feature, and
   ``m`` the mask threshold (0.2 default, 0.1 best in the paper). The masks are optimised with
   ``L_t = L_ce + L_f`` (Eq. 8-10): ``L_f = Var(F')`` and ``L_ce = CE(B(F'_last), y)`` with
   ``B`` the teacher's own (frozen) classifier head.
2. **Feature distillation** (Sec. 4.3): the student learns the detoxified features of all
   chosen layers through linear connectors (student width -> teacher width), plus CE on the
   labels; without masks this is plain feature distillation, which the paper shows carries
   the backdoor over.

Porting to text transformers: a layer's feature is its pooled hidden state, one ``[H]`` vector
per sample and layer (a per-token mask would have no meaning across texts of different
lengths, and the pooled feature is what ``B`` classifies). ``Var`` is the variance of a sample's
feature values over the hidden dimension, averaged over the batch.
"""

from kdshield.defenses.base import DefenseSpec, register
from kdshield.defenses.robustkd.config import FeatureKDConfig, RobustKDConfig
from kdshield.defenses.robustkd.recipe import check_robustkd, run_feature_kd, run_robustkd

PAPER = "RobustKD: feature-variance detoxification for backdoored teachers; ../shared/papers/robustkd.md"
register(
    DefenseSpec("robustkd", "detoxification masks on the teacher's features, then feature distillation into a "
                "smaller student", RobustKDConfig, run_robustkd, final_stages=("distill",),
                epoch_setting="distill_epochs", check=check_robustkd, reference=PAPER, suspect_copies=False),
    DefenseSpec("feature-kd", "baseline: plain feature distillation into the same student (no masks)",
                FeatureKDConfig, run_feature_kd, final_stages=("distill",), epoch_setting="distill_epochs",
                check=check_robustkd, reference=PAPER, suspect_copies=False),
)
