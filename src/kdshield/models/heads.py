"""A sequence classifier's head as a module of its own: pooled feature [B, H] -> logits [B, C].

RobustKD classifies *detoxified* last-layer features with the teacher's own classifier
(``B(F')`` in its Eq. 9), so the head has to be applied to a feature that did not come out of
the model's forward. :func:`classifier_head` returns a frozen copy of it for the two head
shapes kdshield's presets have, and checks that it reproduces the model's logits.
"""

from __future__ import annotations

import copy

import torch

from kdshield.errors import InputError
from kdshield.models.loading import model_family
from kdshield.models.pooling import pool


class _PoolerHead(torch.nn.Module):
    """BERT-style: ``classifier(tanh(dense(F)))`` (the pooler on [CLS], then the classifier;
    dropout left out: the head is used frozen and deterministic)."""

    def __init__(self, dense: torch.nn.Linear | None, classifier: torch.nn.Linear):
        super().__init__()
        self.dense, self.classifier = dense, classifier

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            feature = torch.tanh(self.dense(feature))
        return self.classifier(feature)


def classifier_head(model, *, check: bool = True) -> torch.nn.Module:
    """A frozen copy of ``model``'s classification head, as a module mapping the pooled last
    hidden state (:func:`kdshield.models.pooling.pool` of ``hidden_states[-1]``) [B, H] to
    logits [B, C].

    Supported: BERT-style classifiers (``base.pooler`` + ``classifier``) and decoder
    classifiers with a linear ``score`` (Llama, Qwen2 ...). With ``check`` the head must
    reproduce the model's logits on a short dummy input; InputError otherwise.
    """
    base = getattr(model, "base_model", None)
    if isinstance(getattr(model, "classifier", None), torch.nn.Linear):
        pooler = getattr(base, "pooler", None)
        dense = getattr(pooler, "dense", None) if pooler is not None else None
        head: torch.nn.Module = _PoolerHead(copy.deepcopy(dense), copy.deepcopy(model.classifier))
    elif isinstance(getattr(model, "score", None), torch.nn.Linear):
        head = copy.deepcopy(model.score)
    else:
        raise InputError(f"cannot use the classification head of a {type(model).__name__} "
                         "(supported: BERT-style pooler + classifier, or a linear score head)")
    head.requires_grad_(False).eval()
    if check:
        was_training = model.training
        model.eval()
        ids = torch.tensor([[min(101, model.config.get_text_config().vocab_size - 1), 7, 8, 9]])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            again = head(pool(out.hidden_states[-1], mask, model_family(model.config)))
        model.train(was_training)
        if not torch.allclose(again, out.logits, atol=1e-4, rtol=1e-4):
            raise InputError(f"the extracted head of a {type(model).__name__} does not reproduce its "
                             "logits; RobustKD cannot classify detoxified features with it")
    return head
