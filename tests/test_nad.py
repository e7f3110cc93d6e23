"""NAD's loss and the shared attention-map pieces, by hand. Fast, no Ray."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kdshield.defenses.losses import activation_map, map_distance
from kdshield.defenses.nad.losses import NADLoss


def test_activation_map_is_the_power_of_the_absolute_feature_summed_over_channels():
    h = torch.tensor([[[1.0, -2.0], [0.5, 0.0]]])  # [B=1, L=2, H=2]
    assert activation_map(h, 2).tolist() == [[5.0, 0.25]]
    assert activation_map(h, 1).tolist() == [[3.0, 0.5]]


def test_map_distance_normalises_each_map_and_ignores_padding():
    s = torch.tensor([[3.0, 4.0, 100.0]])
    t = torch.tensor([[6.0, 8.0, -7.0]])
    mask = torch.tensor([[1, 1, 0]])
    assert map_distance(s, t, mask).item() == pytest.approx(0.0, abs=1e-6)  # a multiple, once padding is out
    assert map_distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])).item() == pytest.approx(2 ** 0.5)


def _outputs(states, logits):
    return SimpleNamespace(hidden_states=tuple(states), logits=logits)


def test_nad_loss_is_ce_when_the_student_attends_like_the_teacher_and_grows_otherwise():
    torch.manual_seed(0)
    states = [torch.randn(2, 3, 4) for _ in range(3)]  # embeddings + 2 blocks
    teacher = torch.stack(states, 1)  # [B, N+1, L, H]
    batch = {"label": torch.tensor([0, 1]), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "teacher_layer_seq": teacher}
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    ce = torch.nn.functional.cross_entropy(logits, batch["label"]).item()
    loss, logs = NADLoss(beta=10.0, layers=[1, 2])(_outputs(states, logits), batch)
    assert logs["at"] == pytest.approx(0.0, abs=1e-6) and loss.item() == pytest.approx(ce, rel=1e-5)
    moved = [states[0], states[1] * torch.tensor([1.0, 0.0, 0.0, 3.0]), states[2]]
    loss2, logs2 = NADLoss(beta=10.0, layers=[1, 2])(_outputs(moved, logits), batch)
    assert logs2["at"] > 0 and loss2.item() == pytest.approx(ce + 10.0 * logs2["at"], rel=1e-5)
    only_last, logs3 = NADLoss(beta=10.0, layers=[2])(_outputs(moved, logits), batch)
    assert logs3["at"] == pytest.approx(0.0, abs=1e-6)  # the moved layer is not distilled


def test_nad_loss_refuses_bad_arguments():
    for kwargs in ({"beta": -1.0, "layers": [1]}, {"beta": 1.0, "layers": []}, {"beta": 1.0, "layers": [1], "p": 0}):
        with pytest.raises(ValueError):
            NADLoss(**kwargs)
