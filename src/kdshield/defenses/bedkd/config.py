"""Settings of ``bedkd`` and of its Table 2 baselines ``ft`` and ``kd`` (each only the fields it uses)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kdshield.config import _Settings


class BeDKDConfig(_Settings):
    """BeDKD settings; defaults are those of the authors' public code (papers/README.md)."""

    alpha: float = Field(0.3, ge=0, le=1, description=(
        "DMM loss weight: alpha * CE(flipped labels) + (1 - alpha) * (KL + MSE) (Eq. 3)"))
    lam: float = Field(0.3, ge=0, le=1, description=(
        "AKD loss weight lambda: lam * CE + (1 - lam) * (KL + MSE) for trust and punish "
        "distillation (Eq. 5-6)"))
    dmm_temperature: float = Field(1.5, gt=0, description="softmax temperature T of the DMM KL term")
    akd_temperature: float = Field(2.5, gt=0, description="softmax temperature T of the AKD KL terms")
    gamma: float | None = Field(0.1, gt=0, le=1, description=(
        "MEPD threshold: a sample with MEPD < gamma is called poisoned (Eq. 4); None when "
        "target_frr calibrates it"))
    target_frr: float | None = Field(None, gt=0, lt=1, description=(
        "instead of a fixed gamma: the FRR wanted on held-out clean data; gamma becomes the "
        "target_frr quantile of their MEPD (giving target_frr alone clears the default gamma)"))
    n_c_dmm: int = Field(80, ge=1, description="clean samples per class (labels flipped) for the DMM")
    n_c: int = Field(320, ge=1, description="clean samples per class for AKD trust distillation")
    n_p: int = Field(32, ge=1, description=(
        "at most this many identified poisoned samples (chosen by `selection`) for punish "
        "distillation. More remove more of a backdoor (R8 BadNet: ASR 48.1 with 32, 0.0 with "
        "160 in one pass each) but also teach the student to avoid the target class, which "
        "costs clean accuracy where that class is large (binary RT BadNet: CACC -5.5); "
        "benchmarks/results/bedkd_r8_badnet.md, bedkd_np.md"))
    dmm_epochs: int = Field(20, ge=1, description="DMM distillation epochs")
    akd_cycles: int = Field(50, ge=1, description=(
        "AKD epochs; each is one trust pass over the clean set and punish_passes passes over "
        "the identified poisoned set"))
    punish_passes: int = Field(5, ge=1, le=100, description=(
        "punish passes over the identified samples per AKD cycle (the paper: 1; default 5). With "
        "n_p much smaller than the clean set, one pass is a few optimizer steps against dozens "
        "of trust steps and the trust passes undo them; more passes rebalance the cycle "
        "(benchmarks/results/bedkd.md, RT BadNet: ASR 40.8 with 1 pass, 21.5 with 5)"))
    dmm_lr: float = Field(3e-5, gt=0, le=1, description="Adam learning rate of the DMM stage")
    akd_lr: float = Field(3e-5, gt=0, le=1, description="Adam learning rate of the AKD stage")
    batch_size: int = Field(16, ge=1, description="micro-batch size of both stages")
    max_length: int = Field(64, ge=8, le=8192, description="tokens per sample after truncation")
    punish: Literal["bounded", "unbounded"] = Field("bounded", description=(
        "punish loss: 'unbounded' is the paper's -(trust loss) (Eq. 6, the authors' code), "
        "which can diverge; 'bounded' (default) hinges every term at punish_margin so ascent "
        "stops once the student is as far from the teacher as an uninformative model"))
    punish_margin: float = Field(1.0, gt=0, description=(
        "bounded punish: CE and KL ascend up to punish_margin * log(C), the relative hidden "
        "MSE up to punish_margin"))
    selection: Literal["confident", "smallest", "random"] = Field("confident", description=(
        "which n_p of the candidates (MEPD < gamma, predicted as the target) are punished: "
        "'confident' (default) those both models give the highest probability of their "
        "predicted label (min of the two), 'smallest' the smallest MEPD, 'random' a seeded draw. "
        "The paper only says 'MEPD < gamma'; benchmarks/results/bedkd.md gives the "
        "precision of each"))
    require_target_prediction: bool = Field(True, description=(
        "identified samples must also be predicted as the suspected target label: the label the "
        "poisoned model predicts on the suspect training set more often than it occurs in the "
        "clean data (the authors' code takes the majority label, which is the same on balanced "
        "data; see suspected_target)"))
    seed: int = Field(0, description="seed of clean-subset sampling and training")

    @model_validator(mode="before")
    @classmethod
    def _target_frr_replaces_default_gamma(cls, data):
        if isinstance(data, dict) and data.get("target_frr") is not None and "gamma" not in data:
            data = {**data, "gamma": None}
        return data

    @model_validator(mode="after")
    def _one_threshold(self):
        if (self.gamma is None) == (self.target_frr is None):
            raise ValueError(
                "set exactly one of gamma (a fixed MEPD threshold) and target_frr (calibrate "
                f"gamma on clean data); got gamma={self.gamma!r}, target_frr={self.target_frr!r}"
                " - with target_frr, set gamma to null")
        return self




class FTConfig(_Settings):
    """``ft``: fine-tune the suspect model on ``n_c`` clean samples per class (BeDKD's Table 2
    baseline; the benchmarks give it the AKD budget of the BeDKD row it is compared with)."""

    n_c: int = Field(320, ge=1, description="clean samples per class")
    epochs: int = Field(50, ge=1, description="epochs over the clean set (BeDKD's akd_cycles)")
    lr: float = Field(3e-5, gt=0, le=1, description="Adam learning rate")
    batch_size: int = Field(16, ge=1, description="micro-batch size")
    max_length: int = Field(64, ge=8, le=8192, description="tokens per sample after truncation")
    seed: int = Field(0, description="seed of clean-subset sampling and training")


class KDConfig(FTConfig):
    """``kd``: distil the suspect model into a copy of itself on the clean set, no punishment
    (BeDKD's trust distillation alone: ``lam * CE + (1 - lam) * (KL_T + MSE)``)."""

    lam: float = Field(0.3, ge=0, le=1, description="weight of CE against (KL + MSE)")
    temperature: float = Field(2.5, gt=0, description="softmax temperature T of the KL term")
