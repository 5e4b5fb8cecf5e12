"""Checkpoint files: what a file holds (:func:`checkpoint_format`), reading one safely (:func:`load_state_dict_file`,
:func:`unwrap_state_dict`) and the safetensors weights ``finetune`` writes (:func:`save_weights`, :func:`weights_meta`).

:func:`~oversmooth_cli.reading.loading.load_model` builds a model from these; every name here is also importable
from :mod:`oversmooth_cli.reading.loading`.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..errors import UserError, first_line
from ..io import atomic_write

__all__ = [
    "STATE_DICT_KEYS",
    "checkpoint_format",
    "load_state_dict_file",
    "save_weights",
    "sha256_file",
    "unwrap_state_dict",
    "weights_meta",
]


STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")
"""Keys a wrapped checkpoint may hold its weights under, in order of preference (EMA first, as in timm)."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x93NUMPY", "a NumPy array file"),
    (b"\x89HDF", "an HDF5 file"),
)


def checkpoint_format(path: Path) -> str:
    """What a checkpoint file holds, judged from its bytes: ``'torch'`` (a ``torch.save`` zip), ``'pickle'`` (the
    legacy ``torch.save`` format), ``'safetensors'``, ``'empty'``, or a description of anything else ("a PNG image",
    "a zip archive without data.pkl", ...)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return "a truncated or damaged zip archive"
        return "torch" if any(n.endswith("data.pkl") for n in names) else "a zip archive without data.pkl"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors" if 8 + int.from_bytes(head[:8], "little") <= size else "a truncated safetensors file"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON text"
    try:
        head.decode("ascii")
    except UnicodeDecodeError:
        return "unrecognised binary data"
    return "text"


def load_state_dict_file(path: Path, trust_checkpoint: bool = False) -> Any:
    """Read a checkpoint file safely: safetensors, or ``torch.load(weights_only=True)``.

    The file's bytes are checked first, so an empty file, another format behind the extension (a safetensors file
    named ``.pth``, an image, JSON) or a damaged archive is one clear :class:`UserError`. A pickled whole model (or
    any arbitrary object) is refused unless ``trust_checkpoint``. Not timm's ``load_state_dict``: that one returns
    only the unwrapped tensors, and ``load_model`` also needs the wrapper (its ``arch``, which key held the weights).
    """
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder; give a weights file, or a folder with config.json + weights")
    kind = checkpoint_format(path)
    if kind == "empty":
        raise UserError(f"checkpoint {path} is empty (0 bytes); it was not written completely, save or copy it again")
    if kind.startswith("a truncated"):
        raise UserError(f"checkpoint {path} is {kind}; it was not written completely, save or copy it again")
    if path.suffix == ".safetensors":
        if kind in ("torch", "pickle"):
            raise UserError(f"checkpoint {path} was written by torch.save, not safetensors; rename it to .pth")
        if kind != "safetensors":
            raise UserError(f"checkpoint {path} is not a safetensors file (it looks like {kind})")
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise UserError(f"cannot read safetensors file {path} (truncated or damaged?): {first_line(e)}") from e
    if kind == "safetensors":
        renamed = path.with_suffix(".safetensors").name
        raise UserError(f"checkpoint {path} is a safetensors file; rename it to {renamed}")
    if kind not in ("torch", "pickle"):
        raise UserError(
            f"checkpoint {path} is not a PyTorch checkpoint (it looks like {kind}); expected the output of torch.save"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" not in str(e):  # not the weights-only unpickler refusing a class: a damaged file
            raise UserError(f"cannot read checkpoint {path} (truncated or damaged?): {first_line(e)}") from e
        if not trust_checkpoint:
            raise UserError(
                f"checkpoint {path} contains pickled Python objects (e.g. a whole model), which can run arbitrary "
                "code when loaded; save a state_dict instead, or pass --trust-checkpoint if you trust its source"
            ) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # the classes it names may be missing here, or the file may be damaged
        raise UserError(f"cannot unpickle checkpoint {path}: {type(e).__name__}: {first_line(e)}") from e


def _holds(obj: Any) -> str:
    """What a checkpoint holds instead of a state dict, in a few words."""
    if isinstance(obj, dict):
        if not obj:
            return "an empty dict"
        bad = next((v for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
        return f"a dict with {type(bad).__name__} values" if bad is not None else "a dict with non-text keys"
    return f"a {type(obj).__name__}"


def unwrap_state_dict(obj: Any, path: Path | str | None = None) -> tuple[dict[str, torch.Tensor], str | None]:
    """Find the tensor dict in a (possibly wrapped) checkpoint and strip ``module.`` / ``_orig_mod.`` prefixes
    (timm's ``clean_state_dict``); ``path`` names the file in the error.

    Returns:
        The state dict and the wrapper key it came from (None for a plain state dict).
    """
    source = None
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict) and obj[key]:
                obj, source = obj[key], key
                break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise UserError(
            f"checkpoint{f' {path}' if path else ''} holds no state dict: it holds {_holds(obj)}; expected a dict of "
            f"tensors, or one under {', '.join(repr(k) for k in STATE_DICT_KEYS)}"
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
