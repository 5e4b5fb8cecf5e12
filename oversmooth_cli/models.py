"""Build a timm model from a name, a checkpoint file or a timm / Hugging Face style folder.

The architecture and its arguments come from data: ``--arch``, a ``config.json`` beside the weights
(``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``) or the ``arch`` a timm ``train.py``
checkpoint carries. The input pipeline comes from the model's resolved data config, never hard-coded.

Both halves of the ``config.json`` format live here: :func:`model_config` writes what :func:`load_model` reads, and
:func:`save_weights` writes the safetensors files (with metadata, :func:`weights_meta`) that ``finetune`` saves.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .errors import UserError
from .report import atomic_write

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "PRETRAINED_CFG_KEYS",
    "TRAIN_ONLY_ARGS",
    "LoadedModel",
    "load_model",
    "load_state_dict_file",
    "model_config",
    "parse_model_args",
    "resolve_data_config",
    "save_weights",
    "sha256_file",
    "unwrap_state_dict",
    "weights_meta",
]

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "checkpoint-best.safetensors")
STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")
"""Keys a wrapped checkpoint may hold its weights under, in order of preference (EMA first, as in timm)."""
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


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``['img_size=64', 'depth=4']`` -> ``{'img_size': 64, 'depth': 4}`` (values parsed as JSON when possible)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--model-arg {item!r} is not KEY=VALUE (e.g. --model-arg img_size=64)")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _is_pickle_error(exc: Exception) -> bool:
    return isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc)


def load_state_dict_file(path: Path, trust_checkpoint: bool = False) -> Any:
    """Read a checkpoint file safely: safetensors, or ``torch.load(weights_only=True)``.

    A pickled whole model (or any arbitrary object) is refused unless ``trust_checkpoint``. Not timm's
    ``load_state_dict``: that one returns only the unwrapped tensors, and ``load_model`` also needs the wrapper (its
    ``arch``, which key held the weights) and a one-line error for a pickled checkpoint.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise UserError(f"cannot read safetensors file {path}: {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if not _is_pickle_error(e):
            raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from e
        if not trust_checkpoint:
            raise UserError(
                f"checkpoint {path} contains pickled Python objects (e.g. a whole model), which can run arbitrary "
                "code when loaded; save a state_dict instead, or pass --trust-checkpoint if you trust its source"
            ) from e
        return torch.load(path, map_location="cpu", weights_only=False)


def unwrap_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], str | None]:
    """Find the tensor dict in a (possibly wrapped) checkpoint and strip ``module.`` / ``_orig_mod.`` prefixes
    (timm's ``clean_state_dict``).

    Returns:
        The state dict and the wrapper key it came from (None for a plain state dict).
    """
    source = None
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict) and obj[key]:
                obj, source = obj[key], key
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(
            "checkpoint holds no state dict (expected tensors, or one under "
            f"{', '.join(repr(k) for k in STATE_DICT_KEYS)})"
        )
    return timm.models.clean_state_dict(obj), source


def save_weights(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write the model's state dict as safetensors (atomically), with ``meta`` as string metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda p: save_file(state, str(p), metadata={k: str(v) for k, v in meta.items()}))


def weights_meta(path: Path) -> dict[str, str]:
    """The string metadata :func:`save_weights` stored in a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


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


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise UserError(f"{path} is not a JSON object")
    return cfg


def _locate(spec: Path) -> tuple[Path, dict[str, Any]]:
    """Weights file and config.json contents (empty when there is none) for a file or folder spec."""
    if spec.is_dir():
        cfg_path = spec / "config.json"
        weights = next((spec / n for n in WEIGHT_FILES if (spec / n).is_file()), None)
        if weights is None:
            found = sorted(p for p in spec.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
            if len(found) != 1:
                raise UserError(
                    f"folder {spec} has {'no' if not found else 'several'} weight files; expected one of "
                    f"{', '.join(WEIGHT_FILES)} (or a single {'/'.join(CHECKPOINT_SUFFIXES)} file)"
                )
            weights = found[0]
        return weights, _read_config(cfg_path) if cfg_path.is_file() else {}
    sidecar = spec.parent / "config.json"
    return spec, _read_config(sidecar) if sidecar.is_file() else {}


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
            if key in state:
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
            "or pass --no-strict to load what fits"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in mismatched}, strict=False)
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
        try:
            model = timm.create_model(spec, pretrained=pretrained, **kwargs)
        except Exception as e:
            raise UserError(f"cannot build {spec}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
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
    _check_name(arch)
    state, source = unwrap_state_dict(obj)
    report["state_dict_key"] = source
    args = {**cfg.get("model_args", {}), **model_args}
    if num_classes is None:
        num_classes = cfg.get("num_classes", _head_classes(state, arch))
    kwargs = {k: v for k, v in {"num_classes": num_classes, **args}.items() if v is not None}
    if cfg.get("pretrained_cfg"):
        kwargs["pretrained_cfg_overlay"] = cfg["pretrained_cfg"]
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except Exception as e:
        raise UserError(f"cannot build {arch} with {args}: {str(e).splitlines()[0]}") from e
    report.update(_load_weights(model, state, strict, arch))
    model.eval()
    return LoadedModel(
        model, path.name, arch, resolve_data_config(model), str(path), sha256_file(weights), args, report
    )
