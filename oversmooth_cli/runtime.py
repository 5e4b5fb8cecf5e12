"""Where and how a run executes: device, torch.distributed, autocast, seeding and collectives.

Every command that runs a model goes through these few functions, so a device rule, a process-group rule or a seed
rule is written once: :func:`setup_device` (resolve ``--device`` and join torchrun's process group), :func:`autocast`
(bf16 on CUDA with ``--amp``), :func:`all_reduce` (sum or max of a small tensor over ranks), :func:`derive_seed` /
:func:`seed_everything` / :func:`seeded` and :func:`rng_state` / :func:`set_rng_state` (bit-identical resume).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .errors import UserError

__all__ = [
    "all_gather_objects",
    "all_reduce",
    "autocast",
    "collective_device",
    "derive_seed",
    "init_from_env",
    "is_distributed",
    "is_main",
    "rank",
    "resolve_device",
    "rng_state",
    "seed_everything",
    "seeded",
    "set_rng_state",
    "setup_device",
    "shutdown",
    "world_size",
]


# -- device ------------------------------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; refuses what is absent."""
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for CUDA, but no CUDA device is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps asked for Apple MPS, which is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def setup_device(name: str = "auto") -> torch.device:
    """Resolve ``--device`` and join torchrun's process group when there is one; under torchrun on CUDA each rank
    gets ``cuda:LOCAL_RANK``."""
    device = resolve_device(name)
    if init_from_env(device) and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``amp``; a no-op elsewhere (metrics and losses stay float32 either way)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- torch.distributed -------------------------------------------------------------------------------------------------
def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1): nccl on CUDA, gloo otherwise.

    Returns:
        True when running distributed. On CUDA each rank uses ``cuda:LOCAL_RANK``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def collective_device() -> torch.device:
    """Where tensors must live for a collective: the current CUDA device under nccl, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (``op="sum"``) or maximum (``"max"``) of a small tensor over ranks, returned on the CPU (identity in one
    process)."""
    if world_size() == 1:
        return t
    x = t.to(collective_device())
    dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x.cpu()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (just ``[obj]`` without a process group)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Leave the process group if one was joined."""
    if is_distributed():
        dist.destroy_process_group()


# -- seeds and random states -------------------------------------------------------------------------------------------
def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any values (the same on every machine and process)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python, NumPy and torch (CPU) inside the block and restore the previous states after it."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        seed_everything(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def rng_state(extra: random.Random | None = None) -> dict[str, Any]:
    """Python, NumPy, torch CPU and (initialised) CUDA generator states, plus ``extra``'s, as plain data."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {
        "python": random.getstate(),
        "numpy": (name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "mix": extra.getstate() if extra is not None else None,
    }


def set_rng_state(state: dict[str, Any], extra: random.Random | None = None) -> None:
    """Restore what :func:`rng_state` returned (also after a round trip through ``torch.save``)."""
    random.setstate(_as_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if extra is not None and state.get("mix") is not None:
        extra.setstate(_as_tuple(state["mix"]))


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
