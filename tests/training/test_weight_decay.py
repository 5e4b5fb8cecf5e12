"""AdamW's weight decay reaches weight matrices only: not biases, norms, position embeddings or the class token."""

from __future__ import annotations

import timm
import torch

from oversmooth_cli.training.trainer import weight_decay_groups

from .._helpers import TINY_ARCH, TINY_ARGS


def _decay_by_name(model: torch.nn.Module, weight_decay: float) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["weight_decay"] for g in weight_decay_groups(model, weight_decay) for p in g["params"]}


def test_decay_on_weight_matrices_only() -> None:
    model = timm.create_model(TINY_ARCH, pretrained=False, num_classes=4, **TINY_ARGS)
    decay = _decay_by_name(model, 0.05)
    assert set(decay) == {n for n, _ in model.named_parameters()}  # every parameter, once
    for name, p in model.named_parameters():
        expected = 0.05 if p.ndim > 1 and name not in ("pos_embed", "cls_token") else 0.0
        assert decay[name] == expected, name
    assert decay["pos_embed"] == 0.0 and decay["cls_token"] == 0.0 and decay["blocks.0.norm1.weight"] == 0.0


def test_a_model_without_no_weight_decay_still_spares_biases_and_norms() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    assert _decay_by_name(model, 0.1) == {
        "0.weight": 0.1,
        "0.bias": 0.0,
        "1.weight": 0.0,
        "1.bias": 0.0,
        "2.weight": 0.1,
        "2.bias": 0.0,
    }
