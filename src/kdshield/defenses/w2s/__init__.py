"""W2SDefense: a weak clean teacher guides a LoRA-tuned poisoned LLM to unlearn its backdoor, and
``lora-ft``, the papers' "LoRA" baseline (../shared/papers/w2sdefense.md; the authors' code
defaults in ../shared/papers/README.md).

1. **Teacher** (Sec. 3.1, Eq. 4-5): a small encoder (default ``minilm``; BERT-base in the paper)
   fully fine-tuned on the clean data, with a linear projection ``g`` from its width d_t to the
   student's d_s. ``projection="joint"`` (the paper: ``g`` sits between the encoder's last
   [CLS] state and a classifier, all trained by cross-entropy); ``projection="fitted"``: the
   teacher is trained alone and ``g`` is fitted afterwards by ridge regression from its clean
   features to the *suspect student's* clean features, so the target lives in the student's
   own feature space.
2. **Student** (Sec. 3.3, Eq. 14): the poisoned decoder as a sequence classifier with a LoRA
   adapter, trained on the clean data with
   ``alpha CE(z_s, y) + beta T^2 KL(softmax(z_t/T) || softmax(z_s/T)) + gamma MSE(g(h_t), pool(h_s))``.
   ``h_s`` is pooled at the last non-pad token (the one the decoder's classifier reads) under
   left or right padding; the authors' code compared the projected [CLS] with the student's
   unpooled states instead (a broadcast over tokens).

``lora-ft`` is step 2 with CE only: same adapter, same budget.
"""

from kdshield.defenses.base import DefenseSpec, register
from kdshield.defenses.w2s.config import LoraFTConfig, W2SConfig
from kdshield.defenses.w2s.recipe import check_w2s, run_lora_ft, run_w2s

PAPER = "W2SDefense: weak-to-strong unlearning of backdoors; ../shared/papers/w2sdefense.md"
register(
    DefenseSpec("w2s", "a weak clean teacher distilled into a LoRA adapter on the suspect decoder", W2SConfig,
                run_w2s, final_stages=("student",), epoch_setting="epochs", check=check_w2s, reference=PAPER,
                suspect_copies=False),
    DefenseSpec("lora-ft", "baseline: the same LoRA adapter trained by CE alone", LoraFTConfig, run_lora_ft,
                final_stages=("lora_ft",), epoch_setting="epochs", check=check_w2s, reference=PAPER,
                suspect_copies=False),
)
