"""Moved in 0.2: ``oversmooth_cli.losses`` is now :mod:`oversmooth_cli.training.losses`,
:mod:`oversmooth_cli.training.cutmix`, :mod:`oversmooth_cli.training.token_plan`.

This alias keeps code written for 0.1 (and its README) working; it warns once and goes in 0.3.
"""

from __future__ import annotations

from ._moved import moved
from .training.cutmix import CutMixBox, patch_area_fractions, patch_cutmix, rand_box, smooth_one_hot
from .training.losses import (
    LOSS_TERMS,
    SIMILARITIES,
    LossTerm,
    PatchDiversificationLoss,
    TermInputs,
    cosine_similarity,
    dot_similarity,
    l_cons,
    l_cos,
    l_token,
)
from .training.token_plan import TokenPlan, plan_tokens, token_head_logits

__all__ = [
    "LOSS_TERMS",
    "SIMILARITIES",
    "CutMixBox",
    "LossTerm",
    "PatchDiversificationLoss",
    "TermInputs",
    "TokenPlan",
    "cosine_similarity",
    "dot_similarity",
    "l_cons",
    "l_cos",
    "l_token",
    "patch_area_fractions",
    "patch_cutmix",
    "plan_tokens",
    "rand_box",
    "smooth_one_hot",
    "token_head_logits",
]

moved(__name__, "oversmooth_cli.training.losses, oversmooth_cli.training.cutmix, oversmooth_cli.training.token_plan")
