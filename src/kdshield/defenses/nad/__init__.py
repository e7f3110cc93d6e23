"""NAD: Neural Attention Distillation (Li et al., "Neural Attention Distillation: Erasing Backdoor
Triggers from Deep Neural Networks", ICLR 2021), the standard distillation baseline of backdoor
benchmarks, ported to transformer classifiers.

A teacher is fine-tuned from the backdoored model on a little clean data; the backdoored model
then learns, on that clean data, CE plus the distance between its attention maps and the
teacher's at the chosen layers, with ``A = sum_channels |F|^p`` normalised by its L2 norm.
"""

from kdshield.defenses.base import DefenseSpec, register
from kdshield.defenses.nad.config import NADConfig
from kdshield.defenses.nad.recipe import check_nad, run_nad

register(DefenseSpec("nad", "fine-tune a teacher on clean data, then distil its attention maps into the suspect "
                     "model", NADConfig, run_nad, final_stages=("distill",), epoch_setting="epochs",
                     check=check_nad, reference="Li et al., Neural Attention Distillation, ICLR 2021"))
