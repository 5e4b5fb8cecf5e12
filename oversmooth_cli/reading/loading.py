"""Build a timm model from a name, a checkpoint file or a timm / Hugging Face style folder.

The architecture and its arguments come from data: ``--arch``, a ``config.json`` beside the weights
(``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``) or the ``arch`` a timm ``train.py``
checkpoint carries. The input pipeline comes from the model's resolved data config, never hard-coded.

Both halves of the ``config.json`` format live here: :func:`model_config` writes what :func:`load_model` reads.
Checkpoint files themselves (formats, safe reading, the safetensors ``finetune`` saves) are
:mod:`~oversmooth_cli.reading.checkpoints`; their functions are importable from here too.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..errors import UserError, first_line
from .checkpoints import (
    STATE_DICT_KEYS,
    checkpoint_format,
    load_state_dict_file,
    save_weights,
    sha256_file,
    unwrap_state_dict,
    weights_meta,
)

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "PRETRAINED_CFG_KEYS",
    "STATE_DICT_KEYS",
    "TRAIN_ONLY_ARGS",
    "LoadedModel",
    "checkpoint_format",
    "load_model",
    "load_state_dict_file",
    "model_config",
    "parse_model_args",
    "parse_value",
    "resolve_data_config",
    "save_weights",
    "sha256_file",
    "unwrap_state_dict",
    "weights_meta",
]


CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
    "checkpoint-best.safetensors",
    "checkpoint-last.safetensors",
)
"""A folder's weights, in order of preference (a finetune run: the best checkpoint, else the last)."""


RUN_STATE = "train_state.pt"
"""A finetune run's optimizer and progress state: never model weights."""


TRAIN_ONLY_ARGS = ("drop_path_rate",)
"""create_model arguments used for training only, left out of a saved ``config.json``."""


PRETRAINED_CFG_KEYS = (
    "input_size",
    "fixed_input_size",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "mean",
    "std",
    "pool_size",
    "first_conv",
    "classifier",
)
"""``pretrained_cfg`` entries a saved ``config.json`` keeps (the data config and the classifier's name)."""


@dataclass
class LoadedModel:
    """A model ready for inference plus what is needed to reproduce how it was built."""

    model: nn.Module
    name: str
    architecture: str
    data_config: dict[str, Any]
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    load_report: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "architecture": self.architecture,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "model_args": self.model_args,
            "num_classes": getattr(self.model, "num_classes", None),
            "num_prefix_tokens": getattr(self.model, "num_prefix_tokens", None),
            "load": self.load_report,
        }


def parse_value(text: str) -> Any:
    """A ``--model-arg`` value: a Python literal (``64``, ``0.1``, ``(2, 2)``, ``[2, 2]``, ``True``, ``None``,
    ``'x'``), JSON (``true``, ``null``), or else the text itself (``gelu``)."""
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``['img_size=64', 'depths=(2,2)', 'act_layer=gelu']`` -> ``{'img_size': 64, 'depths': (2, 2), 'act_layer':
    'gelu'}``: each value a Python literal, JSON, or else the text (see :func:`parse_value`)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UserError(
                f"--model-arg {item!r} is not KEY=VALUE with a Python name as KEY "
                "(e.g. --model-arg img_size=64 or --model-arg 'depths=(2,2)')"
            )
        out[key] = parse_value(value)
    return out


def model_config(loaded: LoadedModel, label_names: list[str], training: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` for a trained model: what :func:`load_model` reads back to rebuild it (``architecture``,
    ``num_classes``, ``model_args`` without the training-only ones, ``pretrained_cfg``), plus the class names and
    ``training`` (how it was trained, under ``finetune``)."""
    base = dict(getattr(loaded.model, "pretrained_cfg", None) or {})
    pretrained_cfg = {k: base[k] for k in PRETRAINED_CFG_KEYS if k in base}
    pretrained_cfg.update({k: v for k, v in loaded.data_config.items() if k in PRETRAINED_CFG_KEYS})
    pretrained_cfg.update({"num_classes": len(label_names), "label_names": label_names})
    return {
        "architecture": loaded.architecture,
        "num_classes": len(label_names),
        "model_args": {k: v for k, v in loaded.model_args.items() if k not in TRAIN_ONLY_ARGS},
        "pretrained_cfg": pretrained_cfg,
        "label_names": label_names,
        "finetune": training,
    }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(value: Any, n: tuple[int, ...], positive: bool = False) -> bool:
    """A list of ``n`` numbers (each > 0 when ``positive``)."""
    return (
        isinstance(value, (list, tuple))
        and len(value) in n
        and all(_is_number(x) and (x > 0 or not positive) for x in value)
    )


_CONFIG_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "architecture": (lambda v: isinstance(v, str) and bool(v.strip()), "a timm model name"),
    "num_classes": (lambda v: _is_int(v) and v >= 0, "a whole number >= 0"),
    "model_args": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "an object of arguments"),
    "pretrained_cfg": (lambda v: isinstance(v, dict), "an object (timm's pretrained_cfg)"),
}
"""The ``config.json`` entries :func:`load_model` reads: a check of each value and what it must be."""


INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
"""The resampling names timm's eval transform accepts."""


CROP_MODES = ("center", "squash", "border")


_DATA_CFG_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "input_size": (
        lambda v: _numbers(v, (3,), positive=True) and all(_is_int(x) for x in v),
        "[channels, height, width] as positive whole numbers",
    ),
    "mean": (lambda v: _numbers(v, (1, 3)), "a list of 1 or 3 numbers"),
    "std": (lambda v: _numbers(v, (1, 3), positive=True), "a list of 1 or 3 positive numbers"),
    "crop_pct": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "interpolation": (lambda v: v in INTERPOLATIONS, f"one of {', '.join(INTERPOLATIONS)}"),
    "crop_mode": (lambda v: v in CROP_MODES, f"one of {', '.join(CROP_MODES)}"),
}
"""The data-config entries of ``pretrained_cfg`` that the input pipeline uses, checked the same way."""


def _read_config(path: Path) -> dict[str, Any]:
    """A ``config.json``, its entries checked: one :class:`UserError` line naming the first wrong one."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or first_line(e)}") from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"{path} is not valid JSON: {first_line(e)}") from e
    if not isinstance(cfg, dict):
        raise UserError(f"{path} holds a JSON {type(cfg).__name__}, not an object with 'architecture' and the rest")
    for key, (ok, want) in _CONFIG_TYPES.items():
        if cfg.get(key) is not None and not ok(cfg[key]):
            raise UserError(f"{path}: '{key}' must be {want}, got {json.dumps(cfg[key])[:60]}")
    for key, (ok, want) in _DATA_CFG_TYPES.items():
        value = (cfg.get("pretrained_cfg") or {}).get(key)
        if value is not None and not ok(value):
            raise UserError(f"{path}: 'pretrained_cfg.{key}' must be {want}, got {json.dumps(value)[:60]}")
    return cfg


def _weight_files(folder: Path) -> list[Path]:
    """The checkpoint files in a folder, without a finetune run's ``train_state.pt`` (optimizer state, no model)."""
    return sorted(p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.name != RUN_STATE)


def _locate(spec: Path) -> tuple[Path, dict[str, Any]]:
    """Weights file and config.json contents (empty when there is none) for a file or folder spec.

    A folder's weights are the first of :data:`WEIGHT_FILES` it holds (a finetune run: its best checkpoint, else its
    last), else its only checkpoint file.
    """
    if not spec.is_dir():
        sidecar = spec.parent / "config.json"
        return spec, _read_config(sidecar) if sidecar.exists() else {}
    cfg_path = spec / "config.json"
    run = (spec / RUN_STATE).is_file()
    weights = next((spec / n for n in WEIGHT_FILES if (spec / n).is_file()), None)
    if weights is None:
        found = _weight_files(spec)
        if run and not found:
            raise UserError(
                f"finetune run folder {spec} has no checkpoint-best.safetensors or checkpoint-last.safetensors "
                "(the run stopped before its first save); run it again"
            )
        if len(found) != 1:
            listed = f" ({', '.join(p.name for p in found[:4])}{', ...' if len(found) > 4 else ''})" if found else ""
            raise UserError(
                f"folder {spec} has {'several' if found else 'no'} weight files{listed}; expected one of "
                f"{', '.join(WEIGHT_FILES)}, or a single {'/'.join(CHECKPOINT_SUFFIXES)} file"
                + ("; give the file itself as MODEL" if found else "")
            )
        weights = found[0]
    if run and not cfg_path.is_file():
        raise UserError(
            f"finetune run folder {spec} has {weights.name} but no config.json (written by a version that saved it "
            f"only after the first epoch); finish the run with `oversmooth finetune ... --resume {spec}`, or give "
            f"{weights} with --arch and --model-arg"
        )
    return weights, _read_config(cfg_path) if cfg_path.exists() else {}


def hub_unreachable(timeout: float = 4.0) -> str | None:
    """Why the Hugging Face hub cannot be reached, or None when it answers: one request, no retries, ``timeout``
    seconds at most (huggingface_hub itself retries for about a minute before it falls back to its cache)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as e:
        return first_line(e)
    return None


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub's offline mode for the block: downloads read the local cache only (timm's cache is used)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def offline_message(spec: str, reason: str) -> str:
    from huggingface_hub import constants

    return (
        f"--pretrained: cannot download the weights of {spec}: the Hugging Face hub {constants.ENDPOINT} cannot be "
        f"reached ({reason}) and they are not in the cache {constants.HF_HUB_CACHE}; connect once to download them, "
        "or give a checkpoint file"
    )


def _check_name(name: str) -> None:
    base, _tag = timm.models.split_model_name_tag(name)
    if timm.is_model(base):
        return
    close = difflib.get_close_matches(base, timm.list_models(), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `oversmooth models PATTERN` lists them"
    raise UserError(f"unknown timm model '{name}'{hint}")


def _head_classes(state: dict[str, torch.Tensor], arch: str) -> int | None:
    """Number of classes of the checkpoint's classifier, read from the weight the architecture's cfg names."""
    cfg = timm.models.get_pretrained_cfg(timm.models.split_model_name_tag(arch)[0])
    classifier = (cfg.classifier if cfg is not None else None) or "head"
    names = classifier if isinstance(classifier, (list, tuple)) else (classifier,)
    for n in names:
        for key in (f"{n}.weight", f"{n}.fc.weight", f"{n}.linear.weight"):
            if key in state and state[key].ndim >= 1:
                return int(state[key].shape[0])
    return 0 if cfg is not None else None


def resolve_data_config(model: nn.Module) -> dict[str, Any]:
    """timm's eval data config for the model; a model built for a fixed input size uses that size."""
    cfg = timm.data.resolve_model_data_config(model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None and not getattr(model, "dynamic_img_size", False):
        cfg["input_size"] = (cfg["input_size"][0], *tuple(img_size))
    return cfg


def _filter_for(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the family's own ``checkpoint_filter_fn`` (timm key surgery, pos-embed resampling) when it has one."""
    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return state
    try:
        return fn(state, model)
    except Exception:
        return state


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], strict: bool, arch: str) -> dict[str, Any]:
    state = _filter_for(model, state)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    report = {"missing_keys": missing, "unexpected_keys": unexpected, "shape_mismatch": mismatched}
    if strict and (missing or unexpected or mismatched):

        def few(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

        parts = [
            f"{len(v)} {label} ({few(v)})"
            for label, v in (("missing", missing), ("unexpected", unexpected), ("with another shape", mismatched))
            if v
        ]
        raise UserError(
            f"checkpoint keys do not fit {arch}: {'; '.join(parts)}; check --arch/--model-arg, "
            "or pass --allow-key-mismatch (formerly --no-strict) to load what fits"
        )
    try:
        model.load_state_dict({k: v for k, v in state.items() if k in own and k not in mismatched}, strict=False)
    except (RuntimeError, TypeError, ValueError) as e:  # e.g. a tensor of a dtype that cannot be copied
        raise UserError(f"cannot load the checkpoint into {arch}: {first_line(e)}") from e
    return report


def load_model(
    spec: str,
    arch: str | None = None,
    pretrained: bool = False,
    model_args: dict[str, Any] | None = None,
    strict: bool = True,
    trust_checkpoint: bool = False,
    num_classes: int | None = None,
) -> LoadedModel:
    """Build a timm model from a name, a checkpoint file or a folder with ``config.json``.

    Args:
        spec: timm model name (``vit_small_patch16_224``, also ``hf-hub:`` / ``local-dir:``), a checkpoint file
            (.pth/.pt/.bin/.safetensors/.ckpt) or a folder holding ``config.json`` and weights.
        arch: architecture for a checkpoint; overrides the checkpoint's own.
        pretrained: for a model name, load timm's pretrained weights (timm's download and cache).
        model_args: extra ``create_model`` kwargs (``img_size``, ``depth``...); override the config's.
        strict: refuse a checkpoint whose keys do not fit the architecture exactly.
        trust_checkpoint: allow unpickling arbitrary objects (e.g. a whole saved model).
        num_classes: force the classifier size (default: the checkpoint's head).

    Returns:
        The model in eval mode on the CPU with its data config and load report.
    """
    model_args = dict(model_args or {})
    path = Path(spec).expanduser()
    looks_like_path = path.exists() or path.suffix in CHECKPOINT_SUFFIXES or ("/" in spec and ":" not in spec)
    if not looks_like_path:
        if ":" not in spec:
            _check_name(spec)
        kwargs = {k: v for k, v in {"num_classes": num_classes, **model_args}.items() if v is not None}
        offline = hub_unreachable() if pretrained else None
        try:
            with hub_offline() if offline else contextlib.nullcontext():
                model = timm.create_model(spec, pretrained=pretrained, **kwargs)
        except Exception as e:
            if offline and isinstance(e, OSError):  # huggingface_hub: not in the cache (LocalEntryNotFoundError)
                raise UserError(offline_message(spec, offline)) from e
            raise UserError(f"cannot build {spec}: {first_line(e)}") from e
        model.eval()
        return LoadedModel(model, spec, spec, resolve_data_config(model), model_args=model_args)

    if not path.exists():
        raise UserError(f"model path {spec} does not exist (give a timm model name, a checkpoint file or a folder)")
    weights, cfg = _locate(path)
    obj = load_state_dict_file(weights, trust_checkpoint=trust_checkpoint)
    report: dict[str, Any] = {"weights_file": str(weights)}
    if isinstance(obj, nn.Module):
        model = obj.eval()
        report["pickled_module"] = True
        name = arch or getattr(model, "default_cfg", {}).get("architecture") or type(model).__name__
        return LoadedModel(
            model, path.name, name, resolve_data_config(model), str(path), sha256_file(weights), {}, report
        )

    arch = arch or cfg.get("architecture") or (obj.get("arch") if isinstance(obj, dict) else None)
    if not arch:
        raise UserError(
            f"no architecture for {path}: pass --arch NAME, or put a config.json with 'architecture' beside the weights"
        )
    if not isinstance(arch, str):
        raise UserError(f"checkpoint {weights} names its architecture as {arch!r}, not a timm model name; pass --arch")
    _check_name(arch)
    state, source = unwrap_state_dict(obj, weights)
    report["state_dict_key"] = source
    args = {**(cfg.get("model_args") or {}), **model_args}
    if num_classes is None:
        num_classes = cfg["num_classes"] if cfg.get("num_classes") is not None else _head_classes(state, arch)
    kwargs = {k: v for k, v in {"num_classes": num_classes, **args}.items() if v is not None}
    if cfg.get("pretrained_cfg"):
        kwargs["pretrained_cfg_overlay"] = cfg["pretrained_cfg"]
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except Exception as e:
        raise UserError(f"cannot build {arch} with {args}: {first_line(e)}") from e
    report.update(_load_weights(model, state, strict, arch))
    model.eval()
    return LoadedModel(
        model, path.name, arch, resolve_data_config(model), str(path), sha256_file(weights), args, report
    )
