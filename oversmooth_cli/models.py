"""Moved in 0.2: ``oversmooth_cli.models`` is now :mod:`oversmooth_cli.reading.loading`.

This alias keeps code written for 0.1 (and its README) working; it warns once and goes in 0.3.
"""

from __future__ import annotations

from ._moved import moved
from .reading.loading import (
    CHECKPOINT_SUFFIXES,
    PRETRAINED_CFG_KEYS,
    TRAIN_ONLY_ARGS,
    LoadedModel,
    checkpoint_format,
    load_model,
    load_state_dict_file,
    model_config,
    one_line_reason,
    parse_model_args,
    parse_value,
    resolve_data_config,
    save_weights,
    sha256_file,
    unwrap_state_dict,
    weights_meta,
)

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "PRETRAINED_CFG_KEYS",
    "TRAIN_ONLY_ARGS",
    "LoadedModel",
    "checkpoint_format",
    "load_model",
    "load_state_dict_file",
    "model_config",
    "one_line_reason",
    "parse_model_args",
    "parse_value",
    "resolve_data_config",
    "save_weights",
    "sha256_file",
    "unwrap_state_dict",
    "weights_meta",
]

moved(__name__, "oversmooth_cli.reading.loading")
